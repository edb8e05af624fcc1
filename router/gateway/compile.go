package gateway

import (
	"fmt"
	"net/http"
	"slices"
	"strings"

	"k8s.io/apimachinery/pkg/types"
	inferencev1 "sigs.k8s.io/gateway-api-inference-extension/api/v1"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/capstan-dev/capstan/router/route"
)

// compiledRoute is an HTTPRoute's rules, compiled once whatever its parents.
type compiledRoute struct {
	// matches are every rule's matches, pointing at their rules.
	matches []*route.Match
	rules   []*pendingRule
	// resolved is the route's ResolvedRefs condition.
	resolved condition
	// notes say which rules or backends answer 500 and why, for the
	// Accepted condition's message.
	notes []string
	// pools are the InferencePools the route's backendRefs resolved to,
	// once each: the route's parents are theirs.
	pools []types.NamespacedName
}

// pendingRule is a rule whose backends are resolved to keys but not yet to
// Backends, which are made for all routes at once.
type pendingRule struct {
	rule     *route.Rule
	backends []pendingBackend
}

type pendingBackend struct {
	key    route.BackendKey
	weight int32
	// invalid, when set, is why requests for this backend get a 500.
	invalid   string
	req, resp *route.HeaderModifier
}

// finish gives the rule its Backends.
func (p *pendingRule) finish(backends map[route.BackendKey]*route.Backend) {
	rbs := make([]route.RuleBackend, len(p.backends))
	for i, b := range p.backends {
		rbs[i] = route.RuleBackend{Weight: b.weight, Invalid: b.invalid, RequestHeaders: b.req, ResponseHeaders: b.resp}
		if b.invalid == "" {
			rbs[i].Backend = backends[b.key]
		}
	}
	p.rule.SetBackends(rbs)
}

// compileRoute compiles a route's rules and resolves its backendRefs.
func (in *inputs) compileRoute(r *gatewayv1.HTTPRoute) *compiledRoute {
	rk := types.NamespacedName{Namespace: r.Namespace, Name: r.Name}
	cr := &compiledRoute{resolved: trueCond(string(gatewayv1.RouteConditionResolvedRefs), string(gatewayv1.RouteReasonResolvedRefs), "All references resolved")}
	var reason string
	var problems []string
	for ri, rule := range r.Spec.Rules {
		rr := &route.Rule{Route: rk, Index: ri}
		if rule.Name != nil {
			rr.Name = string(*rule.Name)
		}
		compileFilters(rr, rule.Filters)
		matches := rule.Matches
		if len(matches) == 0 {
			matches = []gatewayv1.HTTPRouteMatch{{}}
		}
		for mi, m := range matches {
			cm, err := compileMatch(m)
			if err != nil {
				rr.Fail = fmt.Sprintf("match %d: %v", mi, err)
				continue
			}
			cm.Rule = rr
			cm.Order = route.Order{Created: r.CreationTimestamp.Time, Route: rk, Rule: ri, Match: mi}
			cr.matches = append(cr.matches, cm)
		}
		pr := &pendingRule{rule: rr}
		for _, br := range rule.BackendRefs {
			pb, why, msg := in.resolveBackend(r, br)
			if why != "" {
				if reason == "" {
					reason = string(why)
				}
				problems = append(problems, msg)
			} else if pb.invalid != "" {
				cr.notes = append(cr.notes, fmt.Sprintf("rule %s: %s", ruleName(rr), pb.invalid))
			}
			if p := pb.key.Pool; p.Name != "" && !slices.Contains(cr.pools, p) {
				cr.pools = append(cr.pools, p)
			}
			pr.backends = append(pr.backends, pb)
		}
		if rr.Fail != "" {
			cr.notes = append(cr.notes, fmt.Sprintf("rule %s answers 500: %s", ruleName(rr), rr.Fail))
		}
		cr.rules = append(cr.rules, pr)
	}
	if reason != "" {
		cr.resolved = falseCond(string(gatewayv1.RouteConditionResolvedRefs), reason, strings.Join(problems, "; "))
	}
	return cr
}

func ruleName(r *route.Rule) string {
	if r.Name != "" {
		return r.Name
	}
	return fmt.Sprint(r.Index)
}

// compileFilters applies a rule's filters. A filter the router does not
// implement may not be skipped, so it makes the rule answer 500.
func compileFilters(rr *route.Rule, filters []gatewayv1.HTTPRouteFilter) {
	for _, f := range filters {
		switch f.Type {
		case gatewayv1.HTTPRouteFilterRequestHeaderModifier:
			rr.RequestHeaders = headerModifier(f.RequestHeaderModifier)
		case gatewayv1.HTTPRouteFilterResponseHeaderModifier:
			rr.ResponseHeaders = headerModifier(f.ResponseHeaderModifier)
		case gatewayv1.HTTPRouteFilterURLRewrite:
			if f.URLRewrite == nil {
				continue
			}
			rw := &route.Rewrite{Path: pathModifier(f.URLRewrite.Path)}
			if f.URLRewrite.Hostname != nil {
				rw.Hostname = string(*f.URLRewrite.Hostname)
			}
			rr.Rewrite = rw
		case gatewayv1.HTTPRouteFilterRequestRedirect:
			if f.RequestRedirect == nil {
				continue
			}
			rd := &route.Redirect{StatusCode: http.StatusFound, Path: pathModifier(f.RequestRedirect.Path)}
			if s := f.RequestRedirect.Scheme; s != nil {
				rd.Scheme = *s
			}
			if h := f.RequestRedirect.Hostname; h != nil {
				rd.Hostname = string(*h)
			}
			if p := f.RequestRedirect.Port; p != nil {
				rd.Port = int32(*p)
			}
			if c := f.RequestRedirect.StatusCode; c != nil {
				rd.StatusCode = *c
			}
			rr.Redirect = rd
		default:
			rr.Fail = fmt.Sprintf("the %s filter is not supported by capstan-router", f.Type)
		}
	}
}

func headerModifier(f *gatewayv1.HTTPHeaderFilter) *route.HeaderModifier {
	if f == nil {
		return nil
	}
	conv := func(hs []gatewayv1.HTTPHeader) []route.Header {
		out := make([]route.Header, len(hs))
		for i, h := range hs {
			out[i] = route.Header{Name: string(h.Name), Value: h.Value}
		}
		return out
	}
	return route.NewHeaderModifier(conv(f.Set), conv(f.Add), f.Remove)
}

func pathModifier(p *gatewayv1.HTTPPathModifier) *route.PathModifier {
	if p == nil {
		return nil
	}
	switch p.Type {
	case gatewayv1.FullPathHTTPPathModifier:
		if p.ReplaceFullPath != nil {
			return &route.PathModifier{Full: *p.ReplaceFullPath, ReplaceFull: true}
		}
	case gatewayv1.PrefixMatchHTTPPathModifier:
		if p.ReplacePrefixMatch != nil {
			return &route.PathModifier{Prefix: *p.ReplacePrefixMatch}
		}
	}
	return nil
}

// compileMatch compiles one HTTPRouteMatch. Of several header or query
// matches with the same name only the first counts, as the API specifies.
func compileMatch(m gatewayv1.HTTPRouteMatch) (*route.Match, error) {
	typ, value := gatewayv1.PathMatchPathPrefix, "/"
	if m.Path != nil {
		if m.Path.Type != nil {
			typ = *m.Path.Type
		}
		if m.Path.Value != nil {
			value = *m.Path.Value
		}
	}
	pm, err := route.NewPathMatch(route.PathMatchType(typ), value)
	if err != nil {
		return nil, fmt.Errorf("path %q: %w", value, err)
	}
	out := &route.Match{Path: pm}
	if m.Method != nil {
		out.Method = string(*m.Method)
	}
	seen := map[string]bool{}
	for _, h := range m.Headers {
		name := http.CanonicalHeaderKey(string(h.Name))
		if seen[name] {
			continue
		}
		seen[name] = true
		hm, err := route.NewHeaderMatch(name, h.Value, h.Type != nil && *h.Type == gatewayv1.HeaderMatchRegularExpression)
		if err != nil {
			return nil, fmt.Errorf("header %s: %w", name, err)
		}
		out.Headers = append(out.Headers, hm)
	}
	seen = map[string]bool{}
	for _, q := range m.QueryParams {
		name := string(q.Name)
		if seen[name] {
			continue
		}
		seen[name] = true
		qm, err := route.NewQueryMatch(name, q.Value, q.Type != nil && *q.Type == gatewayv1.QueryParamMatchRegularExpression)
		if err != nil {
			return nil, fmt.Errorf("query parameter %s: %w", name, err)
		}
		out.Query = append(out.Query, qm)
	}
	return out, nil
}

// resolveBackend checks one backendRef: a Service or an InferencePool, in
// the route's namespace or one whose ReferenceGrant allows it, that exists
// (a Service with the port). A reference that fails gets a reason for the
// route's ResolvedRefs condition; its share of requests gets a 500.
func (in *inputs) resolveBackend(r *gatewayv1.HTTPRoute, br gatewayv1.HTTPBackendRef) (pendingBackend, gatewayv1.RouteConditionReason, string) {
	pb := pendingBackend{weight: 1}
	if br.Weight != nil {
		pb.weight = *br.Weight
	}
	group, kind := "", kindService
	if br.Group != nil {
		group = string(*br.Group)
	}
	if br.Kind != nil {
		kind = string(*br.Kind)
	}
	ns := r.Namespace
	if br.Namespace != nil {
		ns = string(*br.Namespace)
	}
	name := fmt.Sprintf("%s/%s", ns, br.Name)
	fail := func(reason gatewayv1.RouteConditionReason, msg string) (pendingBackend, gatewayv1.RouteConditionReason, string) {
		pb.invalid = msg
		return pb, reason, msg
	}
	isPool := group == inferencev1.GroupName && kind == kindInferencePool
	switch {
	case isPool && !in.poolsServed:
		return fail(gatewayv1.RouteReasonInvalidKind, fmt.Sprintf("backendRef %s is an %s/%s, but the InferencePool API (%s) is not installed in the cluster",
			name, group, kind, inferencev1.GroupVersion))
	case !isPool && ((group != "" && group != "core") || kind != kindService):
		g := group
		if g == "" {
			g = "core"
		}
		return fail(gatewayv1.RouteReasonInvalidKind, fmt.Sprintf("backendRef %s is a %s/%s: capstan-router sends traffic to Services and InferencePools only", name, g, kind))
	}
	to := objectRef{"", kindService, ns, string(br.Name)}
	if isPool {
		to = objectRef{inferencev1.GroupName, kindInferencePool, ns, string(br.Name)}
	}
	if !in.grants.allowed(objectRef{groupName, kindHTTPRoute, r.Namespace, r.Name}, to) {
		return fail(gatewayv1.RouteReasonRefNotPermitted,
			fmt.Sprintf("backendRef %s: no ReferenceGrant in namespace %s allows HTTPRoutes in %s to refer to it", name, ns, r.Namespace))
	}
	if !in.watched(ns) {
		return fail(gatewayv1.RouteReasonBackendNotFound, fmt.Sprintf("backendRef %s: namespace %s is not watched by the router (--namespaces)", name, ns))
	}
	key := types.NamespacedName{Namespace: ns, Name: string(br.Name)}
	if isPool {
		// A pool has no port of its own to name: its targetPorts are its
		// endpoints' ports, so a port on the reference is not used.
		if in.pool(key) == nil {
			return fail(gatewayv1.RouteReasonBackendNotFound, fmt.Sprintf("backendRef %s: InferencePool not found", name))
		}
		pb.key = route.BackendKey{Pool: key}
	} else {
		svc := in.service(key)
		if svc == nil {
			return fail(gatewayv1.RouteReasonBackendNotFound, fmt.Sprintf("backendRef %s: Service not found", name))
		}
		if br.Port == nil {
			return fail(gatewayv1.RouteReasonBackendNotFound, fmt.Sprintf("backendRef %s: a port is required", name))
		}
		if svc.ServicePort(int32(*br.Port)) == nil {
			return fail(gatewayv1.RouteReasonBackendNotFound, fmt.Sprintf("backendRef %s: the Service has no TCP port %d", name, *br.Port))
		}
		pb.key = route.BackendKey{Service: svc.Key, Port: int32(*br.Port)}
	}
	for _, f := range br.Filters {
		switch f.Type {
		case gatewayv1.HTTPRouteFilterRequestHeaderModifier:
			pb.req = headerModifier(f.RequestHeaderModifier)
		case gatewayv1.HTTPRouteFilterResponseHeaderModifier:
			pb.resp = headerModifier(f.ResponseHeaderModifier)
		default:
			pb.invalid = fmt.Sprintf("backendRef %s: the %s filter is not supported on a backendRef, so its share of requests gets 500", name, f.Type)
		}
	}
	return pb, "", ""
}
