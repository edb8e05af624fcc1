package gateway

import (
	"cmp"
	"crypto/tls"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	inferencev1 "sigs.k8s.io/gateway-api-inference-extension/api/v1"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/route"
)

const (
	groupName     = gatewayv1.GroupName
	kindGateway   = "Gateway"
	kindHTTPRoute = "HTTPRoute"
	kindService   = "Service"
	kindSecret    = "Secret"
	// kindInferencePool is the Gateway API Inference Extension's backend
	// kind, in group inferencev1.GroupName.
	kindInferencePool = "InferencePool"
)

// inputs is everything one translation reads. Objects come from informer
// caches and must not be modified.
type inputs struct {
	controllerName string
	addresses      Addresses
	classes        []*gatewayv1.GatewayClass
	gateways       []*gatewayv1.Gateway
	routes         []*gatewayv1.HTTPRoute
	grants         grants
	// namespaceLabels returns a namespace's labels, for allowedRoutes
	// selectors.
	namespaceLabels func(name string) (labels.Set, bool)
	// secret returns a TLS Secret.
	secret func(namespace, name string) (*corev1.Secret, bool)
	// secretNamespaces, when not empty, are the only namespaces the router
	// may read certificates in (--gateway-secret-namespaces).
	secretNamespaces []string
	// service returns a Service's snapshot, nil when it does not exist.
	service func(types.NamespacedName) *discovery.Service
	// poolsServed reports whether the cluster serves the InferencePool
	// API; without it a backendRef to a pool is of an unknown kind.
	poolsServed bool
	// pool returns a cached InferencePool, nil when it does not exist.
	pool func(types.NamespacedName) *inferencev1.InferencePool
	// watched reports whether the router watches a namespace.
	watched func(namespace string) bool
	// backends turns the backend keys in use into Backends (see
	// route.Builder.SyncBackends).
	backends func([]route.BackendKey) map[route.BackendKey]*route.Backend
}

// translation is what the Gateway API objects mean: a routing table and the
// status every owned object should have. Gateway statuses are finished by
// gatewayStatus once the listen addresses have been bound.
type translation struct {
	table    *route.HTTPTable
	classes  map[string]classResult
	gateways map[types.NamespacedName]*gatewayResult
	routes   map[types.NamespacedName]routeResult
	pools    map[types.NamespacedName]*poolResult
}

type classResult struct {
	class    *gatewayv1.GatewayClass
	accepted condition
}

type routeResult struct {
	route   *gatewayv1.HTTPRoute
	parents []gatewayv1.RouteParentStatus
}

// condition is a status condition before it gets its generation and time.
type condition struct {
	Type    string
	Status  metav1.ConditionStatus
	Reason  string
	Message string
}

func trueCond(typ, reason, msg string) condition {
	return condition{Type: typ, Status: metav1.ConditionTrue, Reason: reason, Message: msg}
}

func falseCond(typ, reason, msg string) condition {
	return condition{Type: typ, Status: metav1.ConditionFalse, Reason: reason, Message: msg}
}

func (c condition) at(generation int64) metav1.Condition {
	return metav1.Condition{Type: c.Type, Status: c.Status, Reason: c.Reason, Message: c.Message, ObservedGeneration: generation}
}

// gatewayResult is one owned Gateway as translated.
type gatewayResult struct {
	gw         *gatewayv1.Gateway
	assignment assignment
	// classProblem, when set, is why the Gateway's class keeps it from
	// being served.
	classProblem string
	listeners    []*listenerState
}

// listenerState is one listener of an owned Gateway as translated.
type listenerState struct {
	spec       gatewayv1.Listener
	kinds      []gatewayv1.RouteGroupKind
	httpRoutes bool
	accepted   condition
	resolved   condition
	conflicted condition
	// overlapping is set (True) when another HTTPS listener on the port
	// has a hostname that covers or is covered by this one's: a client
	// reusing a connection could reach the wrong listener.
	overlapping *condition
	// invalid, when set, is why the listener cannot be served even though
	// it may be Accepted (no usable certificate).
	invalid  string
	certs    []tls.Certificate
	attached map[types.NamespacedName]bool
	// hosts holds the matches attached to each effective hostname.
	hosts map[string][]*route.Match
	// address is where the router listens for the listener, "" when it
	// does not.
	address string
}

func (l *listenerState) hostname() string {
	if l.spec.Hostname == nil {
		return ""
	}
	return string(*l.spec.Hostname)
}

// servable reports whether the listener can be put on a socket.
func (l *listenerState) servable() bool {
	return l.accepted.Status == metav1.ConditionTrue && l.conflicted.Status != metav1.ConditionTrue && l.invalid == ""
}

// translate computes the routing table and statuses from the inputs.
func translate(in *inputs) *translation {
	t := &translation{
		classes:  map[string]classResult{},
		gateways: map[types.NamespacedName]*gatewayResult{},
		routes:   map[types.NamespacedName]routeResult{},
		pools:    map[types.NamespacedName]*poolResult{},
	}
	accepted := map[string]bool{}
	for _, c := range in.classes {
		if string(c.Spec.ControllerName) != in.controllerName {
			continue
		}
		cr := classResult{class: c, accepted: trueCond(string(gatewayv1.GatewayClassConditionStatusAccepted),
			string(gatewayv1.GatewayClassReasonAccepted), "Accepted by capstan-router")}
		if p := c.Spec.ParametersRef; p != nil {
			cr.accepted = falseCond(string(gatewayv1.GatewayClassConditionStatusAccepted), string(gatewayv1.GatewayClassReasonInvalidParameters),
				fmt.Sprintf("capstan-router takes no parameters, but the class refers to %s %s", p.Kind, p.Name))
		}
		t.classes[c.Name] = cr
		accepted[c.Name] = cr.accepted.Status == metav1.ConditionTrue
	}

	var owned []*gatewayv1.Gateway
	for _, gw := range in.gateways {
		if _, ok := t.classes[string(gw.Spec.GatewayClassName)]; ok {
			owned = append(owned, gw)
		}
	}
	slices.SortFunc(owned, olderFirst)
	var servable []*gatewayv1.Gateway
	for _, gw := range owned {
		if accepted[string(gw.Spec.GatewayClassName)] {
			servable = append(servable, gw)
		}
	}
	assigned := in.addresses.assign(servable)
	for _, gw := range owned {
		gr := &gatewayResult{gw: gw, assignment: assigned[key(gw)]}
		if !accepted[string(gw.Spec.GatewayClassName)] {
			gr.classProblem = fmt.Sprintf("GatewayClass %s is not accepted", gw.Spec.GatewayClassName)
		}
		for _, l := range gw.Spec.Listeners {
			gr.listeners = append(gr.listeners, in.validateListener(gw, l))
		}
		markConflicts(gr.listeners)
		t.gateways[key(gw)] = gr
	}
	if in.addresses.sharedMode() {
		markSharedConflicts(owned, t.gateways)
	}

	var keys []route.BackendKey
	var pending []*pendingRule
	routes := slices.Clone(in.routes)
	slices.SortFunc(routes, func(a, b *gatewayv1.HTTPRoute) int { return olderFirst(a, b) })
	for _, r := range routes {
		cr := in.compileRoute(r)
		rr := routeResult{route: r}
		attachedAnywhere := false
		for _, ref := range r.Spec.ParentRefs {
			ps, ok := in.attach(t, r, ref, cr)
			if !ok {
				continue
			}
			if ps.Conditions[0].Status == metav1.ConditionTrue {
				attachedAnywhere = true
			}
			rr.parents = append(rr.parents, ps)
		}
		if len(rr.parents) > 0 {
			t.routes[types.NamespacedName{Namespace: r.Namespace, Name: r.Name}] = rr
			t.notePools(in, cr, rr)
		}
		if attachedAnywhere {
			for _, p := range cr.rules {
				for _, b := range p.backends {
					if b.invalid == "" {
						keys = append(keys, b.key)
					}
				}
			}
			pending = append(pending, cr.rules...)
		}
	}
	backends := in.backends(keys)
	for _, p := range pending {
		p.finish(backends)
	}
	t.table = t.buildTable()
	return t
}

func olderFirst[T metav1.Object](a, b T) int {
	if c := a.GetCreationTimestamp().Compare(b.GetCreationTimestamp().Time); c != 0 {
		return c
	}
	if c := cmp.Compare(a.GetNamespace(), b.GetNamespace()); c != 0 {
		return c
	}
	return cmp.Compare(a.GetName(), b.GetName())
}

var httpRouteKind = gatewayv1.RouteGroupKind{Group: ptrTo(gatewayv1.Group(groupName)), Kind: kindHTTPRoute}

func ptrTo[T any](v T) *T { return &v }

// validateListener checks one listener: its protocol, route kinds and TLS
// certificates.
func (in *inputs) validateListener(gw *gatewayv1.Gateway, l gatewayv1.Listener) *listenerState {
	ls := &listenerState{
		spec:       l,
		accepted:   trueCond(string(gatewayv1.ListenerConditionAccepted), string(gatewayv1.ListenerReasonAccepted), "Accepted"),
		resolved:   trueCond(string(gatewayv1.ListenerConditionResolvedRefs), string(gatewayv1.ListenerReasonResolvedRefs), "All references resolved"),
		conflicted: falseCond(string(gatewayv1.ListenerConditionConflicted), string(gatewayv1.ListenerReasonNoConflicts), "No conflicts"),
		attached:   map[types.NamespacedName]bool{},
		hosts:      map[string][]*route.Match{},
	}
	switch l.Protocol {
	case gatewayv1.HTTPProtocolType, gatewayv1.HTTPSProtocolType:
	default:
		ls.accepted = falseCond(string(gatewayv1.ListenerConditionAccepted), string(gatewayv1.ListenerReasonUnsupportedProtocol),
			fmt.Sprintf("protocol %s is not supported: capstan-router serves HTTP and HTTPS listeners", l.Protocol))
		return ls
	}
	if l.AllowedRoutes != nil && len(l.AllowedRoutes.Kinds) > 0 {
		var bad []string
		for _, k := range l.AllowedRoutes.Kinds {
			group := groupName
			if k.Group != nil {
				group = string(*k.Group)
			}
			if group == groupName && k.Kind == kindHTTPRoute {
				if !ls.httpRoutes {
					ls.kinds, ls.httpRoutes = append(ls.kinds, httpRouteKind), true
				}
				continue
			}
			bad = append(bad, group+"/"+string(k.Kind))
		}
		if len(bad) > 0 {
			ls.resolved = falseCond(string(gatewayv1.ListenerConditionResolvedRefs), string(gatewayv1.ListenerReasonInvalidRouteKinds),
				fmt.Sprintf("route kinds %s are not supported: capstan-router serves HTTPRoutes", strings.Join(bad, ", ")))
		}
	} else {
		ls.kinds, ls.httpRoutes = []gatewayv1.RouteGroupKind{httpRouteKind}, true
	}
	if l.Protocol == gatewayv1.HTTPSProtocolType {
		in.resolveCertificates(gw, ls)
	}
	return ls
}

// resolveCertificates loads an HTTPS listener's certificates.
func (in *inputs) resolveCertificates(gw *gatewayv1.Gateway, ls *listenerState) {
	resolved := func(reason gatewayv1.ListenerConditionReason, msg string) {
		if ls.resolved.Status == metav1.ConditionTrue {
			ls.resolved = falseCond(string(gatewayv1.ListenerConditionResolvedRefs), string(reason), msg)
		}
	}
	cfg := ls.spec.TLS
	switch {
	case cfg == nil:
		resolved(gatewayv1.ListenerReasonInvalidCertificateRef, "an HTTPS listener needs tls.certificateRefs")
	case cfg.Mode != nil && *cfg.Mode != gatewayv1.TLSModeTerminate:
		ls.accepted = falseCond(string(gatewayv1.ListenerConditionAccepted), string(gatewayv1.ListenerReasonUnsupportedValue),
			fmt.Sprintf("TLS mode %s is not supported: capstan-router terminates TLS", *cfg.Mode))
		return
	case gw.Spec.TLS != nil && gw.Spec.TLS.Frontend != nil:
		ls.accepted = falseCond(string(gatewayv1.ListenerConditionAccepted), string(gatewayv1.ListenerReasonUnsupportedValue),
			"client certificate validation (spec.tls.frontend) is not supported by capstan-router")
		return
	default:
		for _, ref := range cfg.CertificateRefs {
			cert, reason, msg := in.certificate(gw, ref)
			if reason != "" {
				resolved(reason, msg)
				continue
			}
			ls.certs = append(ls.certs, cert)
		}
	}
	if len(ls.certs) == 0 {
		ls.invalid = "no valid TLS certificate: " + ls.resolved.Message
	}
}

// certificate loads one certificateRef, or says why it cannot.
func (in *inputs) certificate(gw *gatewayv1.Gateway, ref gatewayv1.SecretObjectReference) (tls.Certificate, gatewayv1.ListenerConditionReason, string) {
	group, kind := "", kindSecret
	if ref.Group != nil {
		group = string(*ref.Group)
	}
	if ref.Kind != nil {
		kind = string(*ref.Kind)
	}
	ns := gw.Namespace
	if ref.Namespace != nil {
		ns = string(*ref.Namespace)
	}
	name := fmt.Sprintf("%s/%s", ns, ref.Name)
	if group != "" || kind != kindSecret {
		return tls.Certificate{}, gatewayv1.ListenerReasonInvalidCertificateRef,
			fmt.Sprintf("certificateRef %s is a %s/%s: only core Secrets are supported", name, group, kind)
	}
	if !in.grants.allowed(objectRef{groupName, kindGateway, gw.Namespace, gw.Name}, objectRef{"", kindSecret, ns, string(ref.Name)}) {
		return tls.Certificate{}, gatewayv1.ListenerReasonRefNotPermitted,
			fmt.Sprintf("no ReferenceGrant in namespace %s allows Gateways in %s to refer to Secret %s", ns, gw.Namespace, name)
	}
	if len(in.secretNamespaces) > 0 && !slices.Contains(in.secretNamespaces, ns) {
		// The router has no informer (and no RBAC) there: say so rather
		// than "not found", and never serve the listener without TLS.
		return tls.Certificate{}, gatewayv1.ListenerReasonInvalidCertificateRef,
			fmt.Sprintf("Secret %s is outside the namespaces capstan-router may read certificates in: %s (--gateway-secret-namespaces)",
				name, strings.Join(in.secretNamespaces, ", "))
	}
	s, ok := in.secret(ns, string(ref.Name))
	if !ok {
		return tls.Certificate{}, gatewayv1.ListenerReasonInvalidCertificateRef,
			fmt.Sprintf("Secret %s of type kubernetes.io/tls not found", name)
	}
	cert, err := tls.X509KeyPair(s.Data[corev1.TLSCertKey], s.Data[corev1.TLSPrivateKeyKey])
	if err != nil {
		return tls.Certificate{}, gatewayv1.ListenerReasonInvalidCertificateRef,
			fmt.Sprintf("Secret %s does not hold a valid certificate and key: %v", name, err)
	}
	return cert, "", ""
}

// markConflicts marks listeners of one Gateway that share a port with a
// different protocol, or a port and hostname.
func markConflicts(ls []*listenerState) {
	for i, a := range ls {
		for j, b := range ls {
			if i == j || a.spec.Port != b.spec.Port {
				continue
			}
			switch {
			case a.spec.Protocol != b.spec.Protocol:
				a.conflicted = trueCond(string(gatewayv1.ListenerConditionConflicted), string(gatewayv1.ListenerReasonProtocolConflict),
					fmt.Sprintf("listener %s uses port %d for %s", b.spec.Name, b.spec.Port, b.spec.Protocol))
			case a.hostname() == b.hostname() && a.conflicted.Status != metav1.ConditionTrue:
				a.conflicted = trueCond(string(gatewayv1.ListenerConditionConflicted), string(gatewayv1.ListenerReasonHostnameConflict),
					fmt.Sprintf("listener %s uses port %d with the same hostname", b.spec.Name, b.spec.Port))
			case a.spec.Protocol == gatewayv1.HTTPSProtocolType && a.overlapping == nil &&
				(route.HostnameMatches(a.hostname(), b.hostname()) || route.HostnameMatches(b.hostname(), a.hostname())):
				c := trueCond(string(gatewayv1.ListenerConditionOverlappingTLSConfig), string(gatewayv1.ListenerReasonOverlappingHostnames),
					fmt.Sprintf("listener %s on port %d has an overlapping hostname %q", b.spec.Name, b.spec.Port, b.hostname()))
				a.overlapping = &c
			}
		}
	}
}

// markSharedConflicts marks, when all Gateways share one address, the
// listeners of newer Gateways that would take a port for another protocol
// or a port and hostname an older Gateway already serves.
func markSharedConflicts(owned []*gatewayv1.Gateway, results map[types.NamespacedName]*gatewayResult) {
	type use struct {
		gateway  types.NamespacedName
		protocol gatewayv1.ProtocolType
	}
	ports := map[gatewayv1.PortNumber]use{}
	hosts := map[string]types.NamespacedName{}
	for _, gw := range owned {
		gr := results[key(gw)]
		if gr.classProblem != "" || !gr.assignment.ok() {
			continue
		}
		for _, l := range gr.listeners {
			if !l.servable() {
				continue
			}
			if u, ok := ports[l.spec.Port]; ok && u.gateway != key(gw) && u.protocol != l.spec.Protocol {
				l.accepted = falseCond(string(gatewayv1.ListenerConditionAccepted), string(gatewayv1.ListenerReasonPortUnavailable),
					fmt.Sprintf("port %d serves %s for Gateway %s; Gateways share the router's address", l.spec.Port, u.protocol, u.gateway))
				continue
			}
			hk := strconv.Itoa(int(l.spec.Port)) + "/" + l.hostname()
			if owner, ok := hosts[hk]; ok && owner != key(gw) {
				l.conflicted = trueCond(string(gatewayv1.ListenerConditionConflicted), string(gatewayv1.ListenerReasonHostnameConflict),
					fmt.Sprintf("Gateway %s already serves port %d for hostname %q; Gateways share the router's address", owner, l.spec.Port, l.hostname()))
				continue
			}
			if _, ok := ports[l.spec.Port]; !ok {
				ports[l.spec.Port] = use{key(gw), l.spec.Protocol}
			}
			hosts[hk] = key(gw)
		}
	}
}

// attach evaluates one parentRef of a route: whether it names an owned
// Gateway (ok), and if so, which of its listeners take the route, and the
// route's status for that parent.
func (in *inputs) attach(t *translation, r *gatewayv1.HTTPRoute, ref gatewayv1.ParentReference, cr *compiledRoute) (gatewayv1.RouteParentStatus, bool) {
	if (ref.Group != nil && string(*ref.Group) != groupName) || (ref.Kind != nil && string(*ref.Kind) != kindGateway) {
		return gatewayv1.RouteParentStatus{}, false
	}
	ns := r.Namespace
	if ref.Namespace != nil {
		ns = string(*ref.Namespace)
	}
	gr, ok := t.gateways[types.NamespacedName{Namespace: ns, Name: string(ref.Name)}]
	if !ok {
		return gatewayv1.RouteParentStatus{}, false
	}
	gen := r.Generation
	status := gatewayv1.RouteParentStatus{ParentRef: ref, ControllerName: gatewayv1.GatewayController(in.controllerName)}
	accept := func(c condition) gatewayv1.RouteParentStatus {
		status.Conditions = []metav1.Condition{c.at(gen), cr.resolved.at(gen)}
		return status
	}
	acceptedType := string(gatewayv1.RouteConditionAccepted)
	if gr.classProblem != "" {
		return accept(falseCond(acceptedType, string(gatewayv1.RouteReasonPending), "Gateway "+ns+"/"+string(ref.Name)+": "+gr.classProblem)), true
	}
	var candidates []*listenerState
	for _, l := range gr.listeners {
		if (ref.SectionName == nil || l.spec.Name == *ref.SectionName) && (ref.Port == nil || l.spec.Port == *ref.Port) {
			candidates = append(candidates, l)
		}
	}
	if len(candidates) == 0 {
		what := "no listeners"
		switch {
		case ref.SectionName != nil && ref.Port != nil:
			what = fmt.Sprintf("no listener named %s on port %d", *ref.SectionName, *ref.Port)
		case ref.SectionName != nil:
			what = fmt.Sprintf("no listener named %s", *ref.SectionName)
		case ref.Port != nil:
			what = fmt.Sprintf("no listener on port %d", *ref.Port)
		}
		return accept(falseCond(acceptedType, string(gatewayv1.RouteReasonNoMatchingParent), fmt.Sprintf("Gateway %s/%s has %s", ns, ref.Name, what))), true
	}
	var allowed []*listenerState
	for _, l := range candidates {
		if l.httpRoutes && in.namespaceAllowed(gr.gw, l, r.Namespace) {
			allowed = append(allowed, l)
		}
	}
	if len(allowed) == 0 {
		return accept(falseCond(acceptedType, string(gatewayv1.RouteReasonNotAllowedByListeners),
			fmt.Sprintf("no listener of Gateway %s/%s allows HTTPRoutes from namespace %s", ns, ref.Name, r.Namespace))), true
	}
	routeHosts := make([]string, len(r.Spec.Hostnames))
	for i, h := range r.Spec.Hostnames {
		routeHosts[i] = string(h)
	}
	rk := types.NamespacedName{Namespace: r.Namespace, Name: r.Name}
	attached := 0
	for _, l := range allowed {
		hosts, ok := route.IntersectHostnames(l.hostname(), routeHosts)
		if !ok {
			continue
		}
		attached++
		if l.attached[rk] {
			continue // another parentRef already attached the route here
		}
		l.attached[rk] = true
		for _, h := range hosts {
			l.hosts[h] = append(l.hosts[h], cr.matches...)
		}
	}
	if attached == 0 {
		return accept(falseCond(acceptedType, string(gatewayv1.RouteReasonNoMatchingListenerHostname),
			fmt.Sprintf("none of the route's hostnames %v matches a listener of Gateway %s/%s", routeHosts, ns, ref.Name))), true
	}
	msg := "Accepted"
	if len(cr.notes) > 0 {
		msg = "Accepted; " + strings.Join(cr.notes, "; ")
	}
	return accept(trueCond(acceptedType, string(gatewayv1.RouteReasonAccepted), msg)), true
}

// namespaceAllowed reports whether a listener's allowedRoutes admit routes
// from a namespace.
func (in *inputs) namespaceAllowed(gw *gatewayv1.Gateway, l *listenerState, ns string) bool {
	from := gatewayv1.NamespacesFromSame
	var selector *metav1.LabelSelector
	if ar := l.spec.AllowedRoutes; ar != nil && ar.Namespaces != nil {
		if ar.Namespaces.From != nil {
			from = *ar.Namespaces.From
		}
		selector = ar.Namespaces.Selector
	}
	switch from {
	case gatewayv1.NamespacesFromAll:
		return true
	case gatewayv1.NamespacesFromSame:
		return ns == gw.Namespace
	case gatewayv1.NamespacesFromSelector:
		if selector == nil {
			return false
		}
		sel, err := metav1.LabelSelectorAsSelector(selector)
		if err != nil {
			return false
		}
		set, ok := in.namespaceLabels(ns)
		return ok && sel.Matches(set)
	}
	return false
}

// buildTable assembles the routing table from the servable listeners of
// Gateways that have an address.
func (t *translation) buildTable() *route.HTTPTable {
	type portSpec struct {
		tls       bool
		listeners []*route.Listener
	}
	byAddr := map[string]*portSpec{}
	for _, gr := range t.gateways {
		if gr.classProblem != "" || !gr.assignment.ok() {
			continue
		}
		for _, l := range gr.listeners {
			if !l.servable() {
				continue
			}
			l.address = net.JoinHostPort(gr.assignment.bindHost, strconv.Itoa(int(l.spec.Port)))
			https := l.spec.Protocol == gatewayv1.HTTPSProtocolType
			ps, ok := byAddr[l.address]
			if !ok {
				ps = &portSpec{tls: https}
				byAddr[l.address] = ps
			}
			scheme := "http"
			if https {
				scheme = "https"
			}
			rl := &route.Listener{Gateway: key(gr.gw), Name: string(l.spec.Name), Hostname: l.hostname(),
				Port: int32(l.spec.Port), Scheme: scheme, Certificates: l.certs}
			for h, ms := range l.hosts {
				rl.AddHost(h, ms)
			}
			ps.listeners = append(ps.listeners, rl)
		}
	}
	var ports []*route.Port
	for addr, ps := range byAddr {
		ports = append(ports, route.NewPort(addr, ps.tls, ps.listeners))
	}
	return route.NewHTTPTable(ports)
}
