package gateway

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/health"
	"github.com/capstan-dev/capstan/router/route"
)

const testController = "capstan.dev/gateway-controller"

var epoch = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func meta(ns, name string, ageRank int) metav1.ObjectMeta {
	return metav1.ObjectMeta{Namespace: ns, Name: name, Generation: 3,
		CreationTimestamp: metav1.NewTime(epoch.Add(time.Duration(ageRank) * time.Minute))}
}

func class(name, controller string) *gatewayv1.GatewayClass {
	return &gatewayv1.GatewayClass{ObjectMeta: meta("", name, 0), Spec: gatewayv1.GatewayClassSpec{ControllerName: gatewayv1.GatewayController(controller)}}
}

func listener(name string, port int32, proto gatewayv1.ProtocolType, hostname string) gatewayv1.Listener {
	l := gatewayv1.Listener{Name: gatewayv1.SectionName(name), Port: port, Protocol: proto}
	if hostname != "" {
		l.Hostname = ptrTo(gatewayv1.Hostname(hostname))
	}
	return l
}

func gw(ns, name string, age int, ls ...gatewayv1.Listener) *gatewayv1.Gateway {
	return &gatewayv1.Gateway{ObjectMeta: meta(ns, name, age), Spec: gatewayv1.GatewaySpec{GatewayClassName: "capstan", Listeners: ls}}
}

func parent(ns, name string) gatewayv1.ParentReference {
	p := gatewayv1.ParentReference{Name: gatewayv1.ObjectName(name)}
	if ns != "" {
		p.Namespace = ptrTo(gatewayv1.Namespace(ns))
	}
	return p
}

func backend(ns, name string, port int32, weight int32) gatewayv1.HTTPBackendRef {
	b := gatewayv1.HTTPBackendRef{BackendRef: gatewayv1.BackendRef{
		BackendObjectReference: gatewayv1.BackendObjectReference{Name: gatewayv1.ObjectName(name), Port: ptrTo(gatewayv1.PortNumber(port))},
		Weight:                 ptrTo(weight),
	}}
	if ns != "" {
		b.Namespace = ptrTo(gatewayv1.Namespace(ns))
	}
	return b
}

func httpRoute(ns, name string, age int, parents []gatewayv1.ParentReference, hostnames []string, rules ...gatewayv1.HTTPRouteRule) *gatewayv1.HTTPRoute {
	r := &gatewayv1.HTTPRoute{ObjectMeta: meta(ns, name, age)}
	r.Spec.ParentRefs = parents
	for _, h := range hostnames {
		r.Spec.Hostnames = append(r.Spec.Hostnames, gatewayv1.Hostname(h))
	}
	r.Spec.Rules = rules
	return r
}

func rule(backends ...gatewayv1.HTTPBackendRef) gatewayv1.HTTPRouteRule {
	return gatewayv1.HTTPRouteRule{BackendRefs: backends}
}

// fixture is a translation's inputs with Services and Secrets of its own.
type fixture struct {
	inputs
	services   map[types.NamespacedName]*discovery.Service
	secrets    map[string]*corev1.Secret
	namespaces map[string]labels.Set
	builder    *route.Builder
}

func newFixture() *fixture {
	f := &fixture{
		services:   map[types.NamespacedName]*discovery.Service{},
		secrets:    map[string]*corev1.Secret{},
		namespaces: map[string]labels.Set{},
		builder:    route.NewBuilder(health.NewRegistry(health.EjectionPolicy{}), route.Options{}),
	}
	f.inputs = inputs{
		controllerName: testController,
		addresses:      Addresses{Pool: netip.MustParsePrefix("198.18.254.0/24")},
		classes:        []*gatewayv1.GatewayClass{class("capstan", testController), class("other", "example.com/other")},
		grants:         grants{},
		namespaceLabels: func(name string) (labels.Set, bool) {
			l, ok := f.namespaces[name]
			return l, ok
		},
		secret: func(ns, name string) (*corev1.Secret, bool) {
			s, ok := f.secrets[ns+"/"+name]
			return s, ok
		},
		service:  func(k types.NamespacedName) *discovery.Service { return f.services[k] },
		watched:  func(string) bool { return true },
		backends: f.builder.SyncBackends,
	}
	return f
}

// addService makes a Service with one port and one ready endpoint.
func (f *fixture) addService(ns, name string, port int32, ip string) {
	k := types.NamespacedName{Namespace: ns, Name: name}
	eps := []discovery.Endpoint{{Address: ip + ":3000", Pod: types.NamespacedName{Namespace: ns, Name: name + "-pod"}, Ready: true}}
	svc := &discovery.Service{Key: k, Port: "http", Endpoints: eps, Ports: []discovery.Port{{Name: "http", Number: port, Endpoints: eps}}}
	f.services[k] = svc
	f.builder.ServiceChanged(k, svc)
}

// cond is a condition's type, status and reason.
type cond struct{ Type, Status, Reason string }

func conds(cs []metav1.Condition) []cond {
	var out []cond
	for _, c := range cs {
		out = append(out, cond{c.Type, string(c.Status), c.Reason})
	}
	return out
}

func noBindErrors(string) error { return nil }

func gatewayConds(t *testing.T, tr *translation, ns, name string) (gatewayv1.GatewayStatus, []cond) {
	t.Helper()
	gr, ok := tr.gateways[types.NamespacedName{Namespace: ns, Name: name}]
	if !ok {
		t.Fatalf("Gateway %s/%s not translated", ns, name)
	}
	st := gatewayStatus(gr, noBindErrors, metav1.NewTime(epoch))
	return st, conds(st.Conditions)
}

func routeConds(t *testing.T, tr *translation, ns, name string) [][]cond {
	t.Helper()
	rr, ok := tr.routes[types.NamespacedName{Namespace: ns, Name: name}]
	if !ok {
		return nil
	}
	var out [][]cond
	for _, p := range routeStatus(rr, testController, metav1.NewTime(epoch)).Parents {
		out = append(out, conds(p.Conditions))
	}
	return out
}

var (
	accepted        = cond{"Accepted", "True", "Accepted"}
	programmed      = cond{"Programmed", "True", "Programmed"}
	resolved        = cond{"ResolvedRefs", "True", "ResolvedRefs"}
	noConflicts     = cond{"Conflicted", "False", "NoConflicts"}
	listenerHealthy = []cond{accepted, programmed, resolved, noConflicts}
)

func TestClassesAndGateways(t *testing.T) {
	f := newFixture()
	withParams := class("with-params", testController)
	withParams.Spec.ParametersRef = &gatewayv1.ParametersReference{Group: "example.com", Kind: "Config", Name: "x"}
	f.classes = append(f.classes, withParams)
	f.gateways = []*gatewayv1.Gateway{
		gw("ns", "ok", 1, listener("http", 80, gatewayv1.HTTPProtocolType, "")),
		gw("ns", "mixed", 2, listener("http", 80, gatewayv1.HTTPProtocolType, ""), listener("tcp", 9000, gatewayv1.TCPProtocolType, "")),
		gw("ns", "invalid", 3, listener("udp", 53, gatewayv1.UDPProtocolType, "")),
		{ObjectMeta: meta("ns", "foreign", 4), Spec: gatewayv1.GatewaySpec{GatewayClassName: "other"}},
		{ObjectMeta: meta("ns", "unaccepted-class", 5), Spec: gatewayv1.GatewaySpec{GatewayClassName: "with-params",
			Listeners: []gatewayv1.Listener{listener("http", 80, gatewayv1.HTTPProtocolType, "")}}},
	}
	tr := translate(&f.inputs)

	if _, ok := tr.classes["other"]; ok {
		t.Error("a GatewayClass of another controller was claimed")
	}
	if got := conds([]metav1.Condition{tr.classes["capstan"].accepted.at(1)}); cmp.Diff([]cond{accepted}, got) != "" {
		t.Errorf("class capstan: %v", got)
	}
	if got := tr.classes["with-params"].accepted; got.Status != metav1.ConditionFalse || got.Reason != "InvalidParameters" {
		t.Errorf("class with parametersRef: %+v", got)
	}
	if _, ok := tr.gateways[types.NamespacedName{Namespace: "ns", Name: "foreign"}]; ok {
		t.Error("a Gateway of another class was claimed")
	}

	st, got := gatewayConds(t, tr, "ns", "ok")
	if diff := cmp.Diff([]cond{accepted, programmed}, got); diff != "" {
		t.Errorf("Gateway ok (-want +got):\n%s", diff)
	}
	if len(st.Addresses) != 1 || *st.Addresses[0].Type != gatewayv1.IPAddressType || !netip.MustParsePrefix("198.18.254.0/24").Contains(netip.MustParseAddr(st.Addresses[0].Value)) {
		t.Errorf("Gateway ok addresses: %+v", st.Addresses)
	}
	if diff := cmp.Diff(listenerHealthy, conds(st.Listeners[0].Conditions)); diff != "" {
		t.Errorf("listener (-want +got):\n%s", diff)
	}
	for _, c := range st.Conditions {
		if c.ObservedGeneration != 3 {
			t.Errorf("condition %s has observedGeneration %d, want 3", c.Type, c.ObservedGeneration)
		}
	}

	st, got = gatewayConds(t, tr, "ns", "mixed")
	if diff := cmp.Diff([]cond{{"Accepted", "True", "ListenersNotValid"}, programmed}, got); diff != "" {
		t.Errorf("Gateway mixed (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]cond{{"Accepted", "False", "UnsupportedProtocol"}, {"Programmed", "False", "Invalid"}, resolved, noConflicts},
		conds(st.Listeners[1].Conditions)); diff != "" {
		t.Errorf("TCP listener (-want +got):\n%s", diff)
	}
	if len(st.Listeners[1].SupportedKinds) != 0 {
		t.Errorf("an unsupported protocol lists kinds %v", st.Listeners[1].SupportedKinds)
	}
	_, got = gatewayConds(t, tr, "ns", "invalid")
	if diff := cmp.Diff([]cond{{"Accepted", "False", "ListenersNotValid"}, {"Programmed", "False", "Invalid"}}, got); diff != "" {
		t.Errorf("Gateway invalid (-want +got):\n%s", diff)
	}
	_, got = gatewayConds(t, tr, "ns", "unaccepted-class")
	if diff := cmp.Diff([]cond{{"Accepted", "False", "Invalid"}, {"Programmed", "False", "Invalid"}}, got); diff != "" {
		t.Errorf("Gateway of an unaccepted class (-want +got):\n%s", diff)
	}
}

func TestListenerValidation(t *testing.T) {
	f := newFixture()
	cert, key := selfSigned(t, "example.com")
	f.secrets["ns/good"] = &corev1.Secret{ObjectMeta: meta("ns", "good", 0), Data: map[string][]byte{"tls.crt": cert, "tls.key": key}}
	f.secrets["ns/malformed"] = &corev1.Secret{ObjectMeta: meta("ns", "malformed", 0), Data: map[string][]byte{"tls.crt": []byte("Hello"), "tls.key": []byte("Hello")}}
	f.secrets["certs/shared"] = &corev1.Secret{ObjectMeta: meta("certs", "shared", 0), Data: map[string][]byte{"tls.crt": cert, "tls.key": key}}
	https := func(name string, refs ...gatewayv1.SecretObjectReference) gatewayv1.Listener {
		l := listener(name, 443, gatewayv1.HTTPSProtocolType, name+".example.com")
		l.TLS = &gatewayv1.ListenerTLSConfig{CertificateRefs: refs}
		return l
	}
	secretRef := func(ns, name string) gatewayv1.SecretObjectReference {
		r := gatewayv1.SecretObjectReference{Name: gatewayv1.ObjectName(name)}
		if ns != "" {
			r.Namespace = ptrTo(gatewayv1.Namespace(ns))
		}
		return r
	}
	kinds := listener("kinds", 8080, gatewayv1.HTTPProtocolType, "")
	kinds.AllowedRoutes = &gatewayv1.AllowedRoutes{Kinds: []gatewayv1.RouteGroupKind{{Kind: "TCPRoute"}, {Kind: "HTTPRoute"}}}
	wrongKind := secretRef("", "good")
	wrongKind.Kind = ptrTo(gatewayv1.Kind("ConfigMap"))
	passthrough := https("passthrough", secretRef("", "good"))
	passthrough.TLS.Mode = ptrTo(gatewayv1.TLSModePassthrough)
	f.gateways = []*gatewayv1.Gateway{gw("ns", "g", 1,
		https("good", secretRef("", "good")),
		https("missing", secretRef("", "missing")),
		https("malformed", secretRef("", "malformed")),
		https("wrongkind", wrongKind),
		https("crossns", secretRef("certs", "shared")),
		passthrough,
		kinds,
		listener("conflict-http", 9443, gatewayv1.HTTPProtocolType, ""),
		func() gatewayv1.Listener {
			l := https("conflict-https", secretRef("", "good"))
			l.Port = 9443
			return l
		}(),
		func() gatewayv1.Listener {
			l := https("wild", secretRef("", "good"))
			l.Hostname, l.Port = ptrTo(gatewayv1.Hostname("*.example.com")), 10443
			return l
		}(),
		func() gatewayv1.Listener {
			l := https("specific", secretRef("", "good"))
			l.Hostname, l.Port = ptrTo(gatewayv1.Hostname("a.example.com")), 10443
			return l
		}(),
	)}
	check := func(tr *translation, want map[string][]cond) {
		t.Helper()
		st, _ := gatewayConds(t, tr, "ns", "g")
		for _, l := range st.Listeners {
			w, ok := want[string(l.Name)]
			if !ok {
				continue
			}
			if diff := cmp.Diff(w, conds(l.Conditions)); diff != "" {
				t.Errorf("listener %s (-want +got):\n%s", l.Name, diff)
			}
		}
	}
	invalidCert := cond{"ResolvedRefs", "False", "InvalidCertificateRef"}
	notProgrammed := cond{"Programmed", "False", "Invalid"}
	tr := translate(&f.inputs)
	overlap := cond{"OverlappingTLSConfig", "True", "OverlappingHostnames"}
	check(tr, map[string][]cond{
		"good":           listenerHealthy,
		"wild":           append(listenerHealthy[:4:4], overlap),
		"specific":       append(listenerHealthy[:4:4], overlap),
		"missing":        {accepted, notProgrammed, invalidCert, noConflicts},
		"malformed":      {accepted, notProgrammed, invalidCert, noConflicts},
		"wrongkind":      {accepted, notProgrammed, invalidCert, noConflicts},
		"crossns":        {accepted, notProgrammed, {"ResolvedRefs", "False", "RefNotPermitted"}, noConflicts},
		"passthrough":    {{"Accepted", "False", "UnsupportedValue"}, notProgrammed, resolved, noConflicts},
		"kinds":          {accepted, programmed, {"ResolvedRefs", "False", "InvalidRouteKinds"}, noConflicts},
		"conflict-http":  {accepted, notProgrammed, resolved, {"Conflicted", "True", "ProtocolConflict"}},
		"conflict-https": {accepted, notProgrammed, resolved, {"Conflicted", "True", "ProtocolConflict"}},
	})
	st, _ := gatewayConds(t, tr, "ns", "g")
	if k := st.Listeners[6].SupportedKinds; len(k) != 1 || k[0].Kind != "HTTPRoute" {
		t.Errorf("supportedKinds with one invalid kind: %v", k)
	}

	// A ReferenceGrant for the Secret resolves the cross-namespace one.
	f.grants = newGrants([]*gatewayv1.ReferenceGrant{{ObjectMeta: meta("certs", "allow", 0), Spec: gatewayv1.ReferenceGrantSpec{
		From: []gatewayv1.ReferenceGrantFrom{{Group: groupName, Kind: kindGateway, Namespace: "ns"}},
		To:   []gatewayv1.ReferenceGrantTo{{Group: "", Kind: kindSecret}},
	}}})
	check(translate(&f.inputs), map[string][]cond{"crossns": listenerHealthy})

	// Only the served listeners reach the table, each HTTPS port with TLS.
	var addrs []string
	for _, p := range translate(&f.inputs).table.Ports() {
		for _, l := range p.Listeners() {
			addrs = append(addrs, l.Name)
		}
		if (strings.HasSuffix(p.Address, ":443") || strings.HasSuffix(p.Address, ":10443")) != p.TLS {
			t.Errorf("port %s TLS=%v", p.Address, p.TLS)
		}
	}
	if diff := cmp.Diff([]string{"good", "crossns", "kinds", "wild", "specific"}, addrs, sortStrings); diff != "" {
		t.Errorf("served listeners (-want +got):\n%s", diff)
	}
}

// TestScopedSecretNamespaces: with --gateway-secret-namespaces a listener
// whose certificate is in another namespace is not served (never without
// TLS), and says which namespaces the router may read.
func TestScopedSecretNamespaces(t *testing.T) {
	f := newFixture()
	cert, key := selfSigned(t, "example.com")
	data := map[string][]byte{"tls.crt": cert, "tls.key": key}
	// The fixture's secret func would find both: the restriction must not
	// depend on the informers alone.
	f.secrets["certs/allowed"] = &corev1.Secret{ObjectMeta: meta("certs", "allowed", 0), Data: data}
	f.secrets["ns/local"] = &corev1.Secret{ObjectMeta: meta("ns", "local", 0), Data: data}
	f.secretNamespaces = []string{"certs", "more-certs"}
	f.grants = newGrants([]*gatewayv1.ReferenceGrant{{ObjectMeta: meta("certs", "allow", 0), Spec: gatewayv1.ReferenceGrantSpec{
		From: []gatewayv1.ReferenceGrantFrom{{Group: groupName, Kind: kindGateway, Namespace: "ns"}},
		To:   []gatewayv1.ReferenceGrantTo{{Group: "", Kind: kindSecret}},
	}}})
	https := func(name string, port int32, ref gatewayv1.SecretObjectReference) gatewayv1.Listener {
		l := listener(name, port, gatewayv1.HTTPSProtocolType, name+".example.com")
		l.TLS = &gatewayv1.ListenerTLSConfig{CertificateRefs: []gatewayv1.SecretObjectReference{ref}}
		return l
	}
	f.gateways = []*gatewayv1.Gateway{gw("ns", "g", 1,
		https("allowed", 443, gatewayv1.SecretObjectReference{Name: "allowed", Namespace: ptrTo(gatewayv1.Namespace("certs"))}),
		https("outside", 8443, gatewayv1.SecretObjectReference{Name: "local"}),
	)}
	tr := translate(&f.inputs)
	st, _ := gatewayConds(t, tr, "ns", "g")
	got := map[string][]cond{}
	var msg string
	for _, l := range st.Listeners {
		got[string(l.Name)] = conds(l.Conditions)
		if l.Name == "outside" {
			for _, c := range l.Conditions {
				if c.Type == "ResolvedRefs" {
					msg = c.Message
				}
			}
		}
	}
	want := map[string][]cond{
		"allowed": listenerHealthy,
		"outside": {accepted, {"Programmed", "False", "Invalid"}, {"ResolvedRefs", "False", "InvalidCertificateRef"}, noConflicts},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("listener conditions (-want +got):\n%s", diff)
	}
	if wantMsg := "Secret ns/local is outside the namespaces capstan-router may read certificates in: certs, more-certs (--gateway-secret-namespaces)"; msg != wantMsg {
		t.Errorf("ResolvedRefs message = %q, want %q", msg, wantMsg)
	}
	var served []string
	for _, p := range tr.table.Ports() {
		if !p.TLS {
			t.Errorf("port %s served without TLS", p.Address)
		}
		for _, l := range p.Listeners() {
			served = append(served, l.Name)
		}
	}
	if diff := cmp.Diff([]string{"allowed"}, served); diff != "" {
		t.Errorf("served listeners (-want +got):\n%s", diff)
	}
}

var sortStrings = cmp.Transformer("sort", func(in []string) []string {
	out := append([]string(nil), in...)
	for i := range out {
		for j := i + 1; j < len(out); j++ {
			if out[j] < out[i] {
				out[i], out[j] = out[j], out[i]
			}
		}
	}
	return out
})

func TestRouteAttachment(t *testing.T) {
	f := newFixture()
	f.addService("apps", "echo", 8080, "198.18.0.1")
	f.addService("other", "echo", 8080, "198.18.0.2")
	f.namespaces["apps"] = labels.Set{"team": "a"}
	f.namespaces["other"] = labels.Set{"team": "b"}
	selector := listener("selector", 8000, gatewayv1.HTTPProtocolType, "")
	selector.AllowedRoutes = &gatewayv1.AllowedRoutes{Namespaces: &gatewayv1.RouteNamespaces{
		From: ptrTo(gatewayv1.NamespacesFromSelector), Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": "a"}}}}
	all := listener("all", 80, gatewayv1.HTTPProtocolType, "*.example.com")
	all.AllowedRoutes = &gatewayv1.AllowedRoutes{Namespaces: &gatewayv1.RouteNamespaces{From: ptrTo(gatewayv1.NamespacesFromAll)}}
	f.gateways = []*gatewayv1.Gateway{
		gw("infra", "same", 1, listener("http", 80, gatewayv1.HTTPProtocolType, "")),
		gw("infra", "shared", 2, all, selector),
	}
	withSection := func(p gatewayv1.ParentReference, section string) gatewayv1.ParentReference {
		p.SectionName = ptrTo(gatewayv1.SectionName(section))
		return p
	}
	withPort := func(p gatewayv1.ParentReference, port int32) gatewayv1.ParentReference {
		p.Port = ptrTo(gatewayv1.PortNumber(port))
		return p
	}
	echo := rule(backend("", "echo", 8080, 1))
	f.routes = []*gatewayv1.HTTPRoute{
		httpRoute("apps", "not-allowed", 1, []gatewayv1.ParentReference{parent("infra", "same")}, nil, echo),
		httpRoute("apps", "no-section", 2, []gatewayv1.ParentReference{withSection(parent("infra", "same"), "nope")}, nil, echo),
		httpRoute("apps", "no-port", 3, []gatewayv1.ParentReference{withPort(parent("infra", "same"), 81)}, nil, echo),
		httpRoute("apps", "wrong-host", 4, []gatewayv1.ParentReference{withSection(parent("infra", "shared"), "all")}, []string{"example.org"}, echo),
		httpRoute("apps", "attached", 5, []gatewayv1.ParentReference{parent("infra", "shared")}, []string{"api.example.com"}, echo),
		httpRoute("other", "selector-only-a", 6, []gatewayv1.ParentReference{withSection(parent("infra", "shared"), "selector")}, nil, echo),
		httpRoute("apps", "foreign", 7, []gatewayv1.ParentReference{parent("infra", "nonexistent")}, nil, echo),
	}
	tr := translate(&f.inputs)
	for name, want := range map[string]cond{
		"not-allowed":     {"Accepted", "False", "NotAllowedByListeners"},
		"no-section":      {"Accepted", "False", "NoMatchingParent"},
		"no-port":         {"Accepted", "False", "NoMatchingParent"},
		"wrong-host":      {"Accepted", "False", "NoMatchingListenerHostname"},
		"attached":        accepted,
		"selector-only-a": {"Accepted", "False", "NotAllowedByListeners"},
	} {
		ns := "apps"
		if name == "selector-only-a" {
			ns = "other"
		}
		got := routeConds(t, tr, ns, name)
		if diff := cmp.Diff([][]cond{{want, resolved}}, got); diff != "" {
			t.Errorf("route %s (-want +got):\n%s", name, diff)
		}
	}
	if got := routeConds(t, tr, "apps", "foreign"); got != nil {
		t.Errorf("a route of a Gateway that does not exist got status %v", got)
	}
	st, _ := gatewayConds(t, tr, "infra", "shared")
	if st.Listeners[0].AttachedRoutes != 1 || st.Listeners[1].AttachedRoutes != 1 {
		t.Errorf("attachedRoutes %d (all), %d (selector), want 1 and 1", st.Listeners[0].AttachedRoutes, st.Listeners[1].AttachedRoutes)
	}
	st, _ = gatewayConds(t, tr, "infra", "same")
	if st.Listeners[0].AttachedRoutes != 0 {
		t.Errorf("a listener counts %d routes that were not accepted", st.Listeners[0].AttachedRoutes)
	}
}

func TestBackendResolution(t *testing.T) {
	f := newFixture()
	f.addService("apps", "v1", 8080, "198.18.0.1")
	f.addService("models", "llama", 80, "198.18.0.2")
	f.gateways = []*gatewayv1.Gateway{gw("apps", "g", 1, listener("http", 80, gatewayv1.HTTPProtocolType, ""))}
	p := []gatewayv1.ParentReference{parent("", "g")}
	unknownKind := backend("", "v1", 8080, 1)
	unknownKind.Group = ptrTo(gatewayv1.Group("example.com"))
	unknownKind.Kind = ptrTo(gatewayv1.Kind("Thing"))
	f.routes = []*gatewayv1.HTTPRoute{
		httpRoute("apps", "ok", 1, p, nil, rule(backend("", "v1", 8080, 1))),
		httpRoute("apps", "missing", 2, p, nil, rule(backend("", "v9", 8080, 1))),
		httpRoute("apps", "no-port", 3, p, nil, rule(backend("", "v1", 9999, 1))),
		httpRoute("apps", "kind", 4, p, nil, rule(unknownKind)),
		httpRoute("apps", "cross", 5, p, nil, rule(backend("models", "llama", 80, 1))),
	}
	check := func(want map[string]cond) {
		t.Helper()
		tr := translate(&f.inputs)
		for name, w := range want {
			if diff := cmp.Diff([][]cond{{accepted, w}}, routeConds(t, tr, "apps", name)); diff != "" {
				t.Errorf("route %s (-want +got):\n%s", name, diff)
			}
		}
	}
	check(map[string]cond{
		"ok":      resolved,
		"missing": {"ResolvedRefs", "False", "BackendNotFound"},
		"no-port": {"ResolvedRefs", "False", "BackendNotFound"},
		"kind":    {"ResolvedRefs", "False", "InvalidKind"},
		"cross":   {"ResolvedRefs", "False", "RefNotPermitted"},
	})
	grant := &gatewayv1.ReferenceGrant{ObjectMeta: meta("models", "allow", 0), Spec: gatewayv1.ReferenceGrantSpec{
		From: []gatewayv1.ReferenceGrantFrom{{Group: groupName, Kind: kindHTTPRoute, Namespace: "apps"}},
		To:   []gatewayv1.ReferenceGrantTo{{Group: "", Kind: kindService, Name: ptrTo(gatewayv1.ObjectName("llama"))}},
	}}
	f.grants = newGrants([]*gatewayv1.ReferenceGrant{grant})
	check(map[string]cond{"cross": resolved})
}

func TestReferenceGrants(t *testing.T) {
	from := objectRef{groupName, kindHTTPRoute, "apps", "r"}
	to := objectRef{"", kindService, "models", "llama"}
	grant := func(fromGroup, fromKind, fromNS, toGroup, toKind, toName string) *gatewayv1.ReferenceGrant {
		g := &gatewayv1.ReferenceGrant{ObjectMeta: meta("models", "g", 0), Spec: gatewayv1.ReferenceGrantSpec{
			From: []gatewayv1.ReferenceGrantFrom{{Group: gatewayv1.Group(fromGroup), Kind: gatewayv1.Kind(fromKind), Namespace: gatewayv1.Namespace(fromNS)}},
			To:   []gatewayv1.ReferenceGrantTo{{Group: gatewayv1.Group(toGroup), Kind: gatewayv1.Kind(toKind)}},
		}}
		if toName != "" {
			g.Spec.To[0].Name = ptrTo(gatewayv1.ObjectName(toName))
		}
		return g
	}
	for name, tc := range map[string]struct {
		grant *gatewayv1.ReferenceGrant
		want  bool
	}{
		"specific":         {grant(groupName, kindHTTPRoute, "apps", "", kindService, "llama"), true},
		"whole namespace":  {grant(groupName, kindHTTPRoute, "apps", "", kindService, ""), true},
		"other name":       {grant(groupName, kindHTTPRoute, "apps", "", kindService, "qwen"), false},
		"other from ns":    {grant(groupName, kindHTTPRoute, "elsewhere", "", kindService, ""), false},
		"other from kind":  {grant(groupName, kindGateway, "apps", "", kindService, ""), false},
		"other from group": {grant("example.com", kindHTTPRoute, "apps", "", kindService, ""), false},
		"other to kind":    {grant(groupName, kindHTTPRoute, "apps", "", kindSecret, ""), false},
		"other to group":   {grant(groupName, kindHTTPRoute, "apps", "example.com", kindService, ""), false},
		"none":             {nil, false},
	} {
		t.Run(name, func(t *testing.T) {
			var list []*gatewayv1.ReferenceGrant
			if tc.grant != nil {
				list = append(list, tc.grant)
			}
			if got := newGrants(list).allowed(from, to); got != tc.want {
				t.Errorf("allowed = %v, want %v", got, tc.want)
			}
		})
	}
	// A grant in the referring namespace does not count.
	wrongNS := grant(groupName, kindHTTPRoute, "apps", "", kindService, "")
	wrongNS.Namespace = "apps"
	if newGrants([]*gatewayv1.ReferenceGrant{wrongNS}).allowed(from, to) {
		t.Error("a grant in the referring namespace allowed the reference")
	}
	if !newGrants(nil).allowed(from, objectRef{"", kindService, "apps", "x"}) {
		t.Error("a reference within one namespace needs no grant")
	}
}

// The translated table routes requests, and an invalid backend's share of
// a rule gets no Backend.
func TestTranslatedTableRoutes(t *testing.T) {
	f := newFixture()
	f.addService("apps", "llama", 80, "198.18.0.1")
	f.addService("apps", "qwen", 80, "198.18.0.2")
	f.gateways = []*gatewayv1.Gateway{gw("apps", "g", 1, listener("http", 80, gatewayv1.HTTPProtocolType, ""))}
	byModel := func(model, svc string) gatewayv1.HTTPRouteRule {
		r := rule(backend("", svc, 80, 1))
		r.Matches = []gatewayv1.HTTPRouteMatch{{Headers: []gatewayv1.HTTPHeaderMatch{{Name: "x-capstan-model", Value: model}}}}
		return r
	}
	split := rule(backend("", "llama", 80, 3), backend("", "gone", 80, 1))
	split.Matches = []gatewayv1.HTTPRouteMatch{{Path: &gatewayv1.HTTPPathMatch{Type: ptrTo(gatewayv1.PathMatchExact), Value: ptrTo("/split")}}}
	f.routes = []*gatewayv1.HTTPRoute{httpRoute("apps", "models", 1, []gatewayv1.ParentReference{parent("", "g")}, nil,
		byModel("llama", "llama"), byModel("qwen", "qwen"), split)}
	tr := translate(&f.inputs)
	ports := tr.table.Ports()
	if len(ports) != 1 {
		t.Fatalf("%d ports", len(ports))
	}
	l := ports[0].Listener("anything")
	for model, want := range map[string]string{"llama": "apps/llama:80", "qwen": "apps/qwen:80"} {
		r := httptest.NewRequest("POST", "/v1/chat/completions", nil)
		r.Header.Set("X-Capstan-Model", model)
		m := l.Route(r, "anything")
		if m == nil {
			t.Fatalf("model %s: no route", model)
		}
		if got := m.Rule.Pick().Backend.Name(); got != want {
			t.Errorf("model %s routed to %s, want %s", model, got, want)
		}
	}
	m := l.Route(httptest.NewRequest("GET", "/split", nil), "anything")
	invalid := 0
	for range 4 {
		if m.Rule.Pick().Backend == nil {
			invalid++
		}
	}
	if invalid != 1 {
		t.Errorf("%d of 4 picks went to the missing backend, want 1", invalid)
	}
}

func TestAddressAssignment(t *testing.T) {
	pool := Addresses{Pool: netip.MustParsePrefix("198.18.254.0/24")}
	withAddr := func(g *gatewayv1.Gateway, typ gatewayv1.AddressType, value string) *gatewayv1.Gateway {
		g.Spec.Addresses = append(g.Spec.Addresses, gatewayv1.GatewaySpecAddress{Type: &typ, Value: value})
		return g
	}
	withStatus := func(g *gatewayv1.Gateway, value string) *gatewayv1.Gateway {
		g.Status.Addresses = []gatewayv1.GatewayStatusAddress{{Type: &ipAddressType, Value: value}}
		return g
	}
	gws := []*gatewayv1.Gateway{
		withStatus(gw("ns", "kept", 1), "198.18.254.7"),
		withAddr(gw("ns", "asks", 2), gatewayv1.IPAddressType, "198.18.254.20"),
		withAddr(gw("ns", "asks-taken", 3), gatewayv1.IPAddressType, "198.18.254.20"),
		withAddr(gw("ns", "outside", 4), gatewayv1.IPAddressType, "10.0.0.1"),
		withAddr(gw("ns", "hostname", 5), gatewayv1.HostnameAddressType, "gw.example.com"),
		withStatus(gw("ns", "holder", 6), "198.18.254.30"),
		withAddr(gw("ns", "asks-held", 5), gatewayv1.IPAddressType, "198.18.254.30"),
		gw("ns", "fresh", 7),
		withAddr(gw("ns", "empty-value", 8), gatewayv1.IPAddressType, ""),
	}
	got := pool.assign(gws)
	addr := func(name string) string { return got[types.NamespacedName{Namespace: "ns", Name: name}].status.Value }
	problem := func(name string) string {
		a := got[types.NamespacedName{Namespace: "ns", Name: name}]
		return string(a.problemReason) + a.unsupported
	}
	if addr("kept") != "198.18.254.7" || addr("asks") != "198.18.254.20" {
		t.Errorf("kept %s, asks %s", addr("kept"), addr("asks"))
	}
	// A Gateway keeps the address it has, even from an older one that asks
	// for it later.
	if problem("asks-taken") != "AddressNotAssigned" || problem("asks-held") != "AddressNotAssigned" || addr("holder") != "198.18.254.30" {
		t.Errorf("asks-taken %q, asks-held %q, holder %s", problem("asks-taken"), problem("asks-held"), addr("holder"))
	}
	if problem("outside") != "AddressNotUsable" || problem("hostname") == "" {
		t.Errorf("outside %q, hostname %q", problem("outside"), problem("hostname"))
	}
	seen := map[string]string{}
	for _, name := range []string{"kept", "asks", "holder", "fresh", "empty-value"} {
		a := addr(name)
		ip, err := netip.ParseAddr(a)
		if err != nil || !pool.usable(ip) {
			t.Errorf("%s got unusable address %q", name, a)
		}
		if other, dup := seen[a]; dup {
			t.Errorf("%s and %s share %s", name, other, a)
		}
		seen[a] = name
	}
	// The same objects give the same answer (every replica agrees), and
	// the first and last addresses of the pool are never handed out.
	again := pool.assign(gws)
	if diff := cmp.Diff(got, again, cmp.AllowUnexported(assignment{})); diff != "" {
		t.Errorf("a second assignment differs:\n%s", diff)
	}
	tiny := Addresses{Pool: netip.MustParsePrefix("198.18.254.0/30")}
	res := tiny.assign([]*gatewayv1.Gateway{gw("ns", "a", 1), gw("ns", "b", 2), gw("ns", "c", 3)})
	var free []string
	for _, k := range []string{"a", "b", "c"} {
		a := res[types.NamespacedName{Namespace: "ns", Name: k}]
		if a.ok() {
			free = append(free, a.status.Value)
		} else if a.problemReason != gatewayv1.GatewayReasonAddressNotAssigned {
			t.Errorf("%s: %+v", k, a)
		}
	}
	if diff := cmp.Diff([]string{"198.18.254.1", "198.18.254.2"}, free, sortStrings); diff != "" {
		t.Errorf("a /30 pool (-want +got):\n%s", diff)
	}

	shared := Addresses{Shared: "203.0.113.10"}
	sh := shared.assign([]*gatewayv1.Gateway{gw("ns", "a", 1), withAddr(gw("ns", "b", 2), gatewayv1.IPAddressType, "203.0.113.11")})
	if a := sh[types.NamespacedName{Namespace: "ns", Name: "a"}]; a.status.Value != "203.0.113.10" || *a.status.Type != gatewayv1.IPAddressType {
		t.Errorf("shared address: %+v", a.status)
	}
	if a := sh[types.NamespacedName{Namespace: "ns", Name: "b"}]; a.problemReason != gatewayv1.GatewayReasonAddressNotUsable {
		t.Errorf("a Gateway asking for another address: %+v", a)
	}
	if a := (Addresses{Shared: "gw.example.com"}).shared(gw("ns", "h", 1)); *a.status.Type != gatewayv1.HostnameAddressType {
		t.Errorf("a hostname address has type %s", *a.status.Type)
	}
	pending := Addresses{PublishService: types.NamespacedName{Namespace: "capstan-system", Name: "gw"}}.shared(gw("ns", "p", 1))
	if pending.ok() || pending.problemReason != gatewayv1.GatewayReasonAddressNotAssigned {
		t.Errorf("a Service without an address: %+v", pending)
	}
}

func TestServiceAddress(t *testing.T) {
	lb := func(ingress ...corev1.LoadBalancerIngress) *corev1.Service {
		return &corev1.Service{Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, ClusterIP: "198.19.0.10"},
			Status: corev1.ServiceStatus{LoadBalancer: corev1.LoadBalancerStatus{Ingress: ingress}}}
	}
	for name, tc := range map[string]struct {
		svc  *corev1.Service
		want string
	}{
		"load balancer IP":       {lb(corev1.LoadBalancerIngress{IP: "203.0.113.7"}), "203.0.113.7"},
		"load balancer hostname": {lb(corev1.LoadBalancerIngress{Hostname: "lb.example.com"}), "lb.example.com"},
		"load balancer pending":  {lb(), ""},
		"external IP": {&corev1.Service{Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP, ClusterIP: "198.19.0.10",
			ExternalIPs: []string{"203.0.113.8"}}}, "203.0.113.8"},
		"cluster IP": {&corev1.Service{Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP, ClusterIP: "198.19.0.10"}}, "198.19.0.10"},
		"headless":   {&corev1.Service{Spec: corev1.ServiceSpec{ClusterIP: corev1.ClusterIPNone}}, ""},
	} {
		if got := ServiceAddress(tc.svc); got != tc.want {
			t.Errorf("%s: %q, want %q", name, got, tc.want)
		}
	}
}

// Gateways sharing one address are told apart by port and hostname; a
// newer one that would take an older one's port for another protocol, or
// its port and hostname, is refused.
func TestSharedAddressConflicts(t *testing.T) {
	f := newFixture()
	f.addresses = Addresses{Shared: "203.0.113.10", BindHost: "0.0.0.0"}
	cert, key := selfSigned(t, "d.example.com")
	f.secrets["d/cert"] = &corev1.Secret{ObjectMeta: meta("d", "cert", 0), Data: map[string][]byte{"tls.crt": cert, "tls.key": key}}
	f.gateways = []*gatewayv1.Gateway{
		gw("a", "first", 1, listener("http", 80, gatewayv1.HTTPProtocolType, "a.example.com")),
		gw("b", "second", 2, listener("http", 80, gatewayv1.HTTPProtocolType, "b.example.com")),
		gw("c", "same-host", 3, listener("http", 80, gatewayv1.HTTPProtocolType, "a.example.com")),
		gw("d", "other-protocol", 4, func() gatewayv1.Listener {
			l := listener("https", 80, gatewayv1.HTTPSProtocolType, "d.example.com")
			l.TLS = &gatewayv1.ListenerTLSConfig{CertificateRefs: []gatewayv1.SecretObjectReference{{Name: "cert"}}}
			return l
		}()),
	}
	tr := translate(&f.inputs)
	listenerConds := func(ns, name string) []cond {
		st, _ := gatewayConds(t, tr, ns, name)
		return conds(st.Listeners[0].Conditions)
	}
	if diff := cmp.Diff(listenerHealthy, listenerConds("b", "second")); diff != "" {
		t.Errorf("second (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]cond{accepted, {"Programmed", "False", "Invalid"}, resolved, {"Conflicted", "True", "HostnameConflict"}},
		listenerConds("c", "same-host")); diff != "" {
		t.Errorf("same-host (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]cond{{"Accepted", "False", "PortUnavailable"}, {"Programmed", "False", "Invalid"}, resolved, noConflicts},
		listenerConds("d", "other-protocol")); diff != "" {
		t.Errorf("other-protocol (-want +got):\n%s", diff)
	}
	ports := tr.table.Ports()
	if len(ports) != 1 || ports[0].Address != "0.0.0.0:80" || len(ports[0].Listeners()) != 2 {
		t.Fatalf("shared table: %d ports", len(ports))
	}
}

func TestStatusKeepsTransitionTimesAndOthers(t *testing.T) {
	then := metav1.NewTime(epoch.Add(-time.Hour))
	existing := []metav1.Condition{
		{Type: "Accepted", Status: "True", Reason: "Accepted", LastTransitionTime: then},
		{Type: "Programmed", Status: "False", Reason: "Pending", LastTransitionTime: then},
		{Type: "example.com/Custom", Status: "True", Reason: "Theirs", LastTransitionTime: then},
	}
	now := metav1.NewTime(epoch)
	got := mergeConditions(existing, []metav1.Condition{
		{Type: "Accepted", Status: "True", Reason: "Accepted"},
		{Type: "Programmed", Status: "True", Reason: "Programmed"},
	}, gatewayManaged, now)
	want := []metav1.Condition{
		{Type: "Accepted", Status: "True", Reason: "Accepted", LastTransitionTime: then},
		{Type: "Programmed", Status: "True", Reason: "Programmed", LastTransitionTime: now},
		{Type: "example.com/Custom", Status: "True", Reason: "Theirs", LastTransitionTime: then},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("conditions (-want +got):\n%s", diff)
	}

	// A route keeps other controllers' parents and drops its own stale
	// ones.
	r := httpRoute("ns", "r", 1, nil, nil)
	r.Status.Parents = []gatewayv1.RouteParentStatus{
		{ParentRef: parent("", "theirs"), ControllerName: "example.com/other"},
		{ParentRef: parent("", "gone"), ControllerName: testController},
	}
	st := routeStatus(routeResult{route: r, parents: []gatewayv1.RouteParentStatus{{ParentRef: parent("", "g"), ControllerName: testController}}}, testController, now)
	var names []string
	for _, p := range st.Parents {
		names = append(names, string(p.ParentRef.Name))
	}
	if diff := cmp.Diff([]string{"theirs", "g"}, names); diff != "" {
		t.Errorf("parents (-want +got):\n%s", diff)
	}
	if !staleCache(2, []metav1.Condition{{ObservedGeneration: 3}}) || staleCache(3, []metav1.Condition{{ObservedGeneration: 3}}) {
		t.Error("staleCache")
	}
}

// selfSigned returns a PEM certificate and key for a host.
func selfSigned(t *testing.T, host string) (cert, key []byte) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: host}, DNSNames: []string{host},
		NotBefore: epoch, NotAfter: epoch.Add(100 * 365 * 24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kd, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kd})
}
