package gateway

import (
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	inferencev1 "sigs.k8s.io/gateway-api-inference-extension/api/v1"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/capstan-dev/capstan/router/inferencepool"
)

// withPools lets the fixture's routes send traffic to InferencePools,
// which addPool adds.
func (f *fixture) withPools() map[types.NamespacedName]*inferencev1.InferencePool {
	pools := map[types.NamespacedName]*inferencev1.InferencePool{}
	f.poolsServed = true
	f.pool = func(k types.NamespacedName) *inferencev1.InferencePool { return pools[k] }
	return pools
}

// addPool makes an InferencePool whose one Ready pod has ip, on port 8000,
// and hands its snapshot to the fixture's Builder.
func (f *fixture) addPool(pools map[types.NamespacedName]*inferencev1.InferencePool, ns, name, ip string, epp *inferencev1.EndpointPickerRef) *inferencev1.InferencePool {
	p := &inferencev1.InferencePool{ObjectMeta: meta(ns, name, 0)}
	p.Spec.Selector.MatchLabels = map[inferencev1.LabelKey]inferencev1.LabelValue{"app": inferencev1.LabelValue(name)}
	p.Spec.TargetPorts = []inferencev1.Port{{Number: 8000}}
	p.Spec.EndpointPickerRef = epp
	k := types.NamespacedName{Namespace: ns, Name: name}
	pools[k] = p
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name + "-0", Labels: map[string]string{"app": name}},
		Status: corev1.PodStatus{PodIP: ip, Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}}}
	f.builder.PoolChanged(k, inferencepool.Build(p, []*corev1.Pod{pod}))
	return p
}

func poolRef(ns, name string, weight int32) gatewayv1.HTTPBackendRef {
	b := gatewayv1.HTTPBackendRef{BackendRef: gatewayv1.BackendRef{
		BackendObjectReference: gatewayv1.BackendObjectReference{
			Group: ptrTo(gatewayv1.Group(inferencev1.GroupName)), Kind: ptrTo(gatewayv1.Kind(kindInferencePool)), Name: gatewayv1.ObjectName(name)},
		Weight: ptrTo(weight),
	}}
	if ns != "" {
		b.Namespace = ptrTo(gatewayv1.Namespace(ns))
	}
	return b
}

// A backendRef to an InferencePool resolves like one to a Service: in the
// route's namespace or where a ReferenceGrant allows it, when the pool
// exists, the namespace is watched and the cluster serves the API.
func TestInferencePoolBackendResolution(t *testing.T) {
	alphaGroup := poolRef("", "llama", 1)
	alphaGroup.Group = ptrTo(gatewayv1.Group("inference.networking.x-k8s.io"))
	otherKind := poolRef("", "llama", 1)
	otherKind.Kind = ptrTo(gatewayv1.Kind("InferenceModel"))
	grant := &gatewayv1.ReferenceGrant{ObjectMeta: meta("models", "allow", 0), Spec: gatewayv1.ReferenceGrantSpec{
		From: []gatewayv1.ReferenceGrantFrom{{Group: groupName, Kind: kindHTTPRoute, Namespace: "apps"}},
		To:   []gatewayv1.ReferenceGrantTo{{Group: inferencev1.GroupName, Kind: kindInferencePool}},
	}}
	serviceGrant := grant.DeepCopy()
	serviceGrant.Spec.To[0] = gatewayv1.ReferenceGrantTo{Group: "", Kind: kindService}
	for name, tc := range map[string]struct {
		ref gatewayv1.HTTPBackendRef
		// notServed: the cluster has no InferencePool API.
		notServed bool
		grant     *gatewayv1.ReferenceGrant
		unwatched string
		want      cond
		message   string
	}{
		"same namespace":                  {ref: poolRef("", "llama", 1), want: resolved},
		"missing":                         {ref: poolRef("", "nonexistent", 1), want: cond{"ResolvedRefs", "False", "BackendNotFound"}, message: "InferencePool not found"},
		"API not installed":               {ref: poolRef("", "llama", 1), notServed: true, want: cond{"ResolvedRefs", "False", "InvalidKind"}, message: "is not installed"},
		"alpha group":                     {ref: alphaGroup, want: cond{"ResolvedRefs", "False", "InvalidKind"}, message: "Services and InferencePools only"},
		"other kind of the group":         {ref: otherKind, want: cond{"ResolvedRefs", "False", "InvalidKind"}},
		"cross-namespace without a grant": {ref: poolRef("models", "shared", 1), want: cond{"ResolvedRefs", "False", "RefNotPermitted"}},
		"cross-namespace with a grant":    {ref: poolRef("models", "shared", 1), grant: grant, want: resolved},
		"a grant for Services only":       {ref: poolRef("models", "shared", 1), grant: serviceGrant, want: cond{"ResolvedRefs", "False", "RefNotPermitted"}},
		"namespace not watched": {ref: poolRef("models", "shared", 1), grant: grant, unwatched: "models",
			want: cond{"ResolvedRefs", "False", "BackendNotFound"}, message: "not watched"},
	} {
		t.Run(name, func(t *testing.T) {
			f := newFixture()
			pools := f.withPools()
			f.addPool(pools, "apps", "llama", "198.18.0.1", nil)
			f.addPool(pools, "models", "shared", "198.18.0.2", nil)
			f.poolsServed = !tc.notServed
			if tc.grant != nil {
				f.grants = newGrants([]*gatewayv1.ReferenceGrant{tc.grant})
			}
			f.watched = func(ns string) bool { return ns != tc.unwatched }
			f.gateways = []*gatewayv1.Gateway{gw("apps", "g", 1, listener("http", 80, gatewayv1.HTTPProtocolType, ""))}
			f.routes = []*gatewayv1.HTTPRoute{httpRoute("apps", "r", 1, []gatewayv1.ParentReference{parent("", "g")}, nil, rule(tc.ref))}
			tr := translate(&f.inputs)
			if diff := cmp.Diff([][]cond{{accepted, tc.want}}, routeConds(t, tr, "apps", "r")); diff != "" {
				t.Errorf("route conditions (-want +got):\n%s", diff)
			}
			msg := tr.routes[types.NamespacedName{Namespace: "apps", Name: "r"}].parents[0].Conditions[1].Message
			if !strings.Contains(msg, tc.message) {
				t.Errorf("ResolvedRefs message %q does not say %q", msg, tc.message)
			}
			// A bad reference's share of requests has no Backend (500); a
			// good one is the pool.
			pick := tr.table.Ports()[0].Listener("x").Route(httptest.NewRequest("GET", "/", nil), "x").Rule.Pick()
			if got := pick.Backend != nil; got != (tc.want == resolved) {
				t.Errorf("the reference has a Backend: %v, invalid %q", got, pick.Invalid)
			}
		})
	}
}

// Weights split a rule across pools and Services alike, and a pool's
// Backend has the pool's Ready pods as endpoints and names its endpoint
// picker and failure mode.
func TestInferencePoolBackends(t *testing.T) {
	f := newFixture()
	pools := f.withPools()
	f.addService("apps", "svc", 80, "198.18.0.9")
	f.addPool(pools, "apps", "llama", "198.18.0.1", nil)
	eppPort := &inferencev1.Port{Number: 9002}
	f.addPool(pools, "apps", "open", "198.18.0.2", &inferencev1.EndpointPickerRef{Name: "epp", Port: eppPort, FailureMode: inferencev1.EndpointPickerFailOpen})
	f.addPool(pools, "apps", "closed", "198.18.0.3", &inferencev1.EndpointPickerRef{Name: "epp", Port: eppPort, FailureMode: inferencev1.EndpointPickerFailClose})
	byPath := func(path string, refs ...gatewayv1.HTTPBackendRef) gatewayv1.HTTPRouteRule {
		r := rule(refs...)
		r.Matches = []gatewayv1.HTTPRouteMatch{{Path: &gatewayv1.HTTPPathMatch{Type: ptrTo(gatewayv1.PathMatchExact), Value: ptrTo(path)}}}
		return r
	}
	f.gateways = []*gatewayv1.Gateway{gw("apps", "g", 1, listener("http", 80, gatewayv1.HTTPProtocolType, ""))}
	f.routes = []*gatewayv1.HTTPRoute{httpRoute("apps", "r", 1, []gatewayv1.ParentReference{parent("", "g")}, nil,
		byPath("/split", poolRef("", "llama", 3), backend("", "svc", 80, 1)),
		byPath("/open", poolRef("", "open", 1)),
		byPath("/closed", poolRef("", "closed", 1)))}
	tr := translate(&f.inputs)
	l := tr.table.Ports()[0].Listener("x")
	pick := func(path string) backendView {
		t.Helper()
		m := l.Route(httptest.NewRequest("POST", path, nil), "x")
		if m == nil {
			t.Fatalf("%s: no route", path)
		}
		b := m.Rule.Pick().Backend
		st := b.Load()
		v := backendView{Name: b.Name(), Picker: st.EndpointPicker, FailOpen: st.FailOpen}
		for _, e := range st.Pool.Endpoints() {
			v.Endpoints = append(v.Endpoints, e.Address+" "+e.Pod)
		}
		return v
	}
	counts := map[string]int{}
	views := map[string]backendView{}
	for range 8 {
		v := pick("/split")
		counts[v.Name]++
		views[v.Name] = v
	}
	if diff := cmp.Diff(map[string]int{"InferencePool apps/llama": 6, "apps/svc:80": 2}, counts); diff != "" {
		t.Errorf("picks of a 3:1 split (-want +got):\n%s", diff)
	}
	want := backendView{Name: "InferencePool apps/llama", Endpoints: []string{"198.18.0.1:8000 apps/llama-0"}}
	if diff := cmp.Diff(want, views[want.Name]); diff != "" {
		t.Errorf("the pool's Backend (-want +got):\n%s", diff)
	}
	for path, want := range map[string]backendView{
		"/open":   {Name: "InferencePool apps/open", Picker: "apps/epp:9002", FailOpen: true, Endpoints: []string{"198.18.0.2:8000 apps/open-0"}},
		"/closed": {Name: "InferencePool apps/closed", Picker: "apps/epp:9002", Endpoints: []string{"198.18.0.3:8000 apps/closed-0"}},
	} {
		if diff := cmp.Diff(want, pick(path)); diff != "" {
			t.Errorf("%s: the Backend of a pool with a picker (-want +got):\n%s", path, diff)
		}
	}

	// Endpoint changes swap the Backend's pool without a new translation.
	b := l.Route(httptest.NewRequest("POST", "/open", nil), "x").Rule.Pick().Backend
	f.builder.PoolChanged(types.NamespacedName{Namespace: "apps", Name: "open"}, inferencepool.Build(pools[types.NamespacedName{Namespace: "apps", Name: "open"}], nil))
	if n := b.Load().Pool.Len(); n != 0 {
		t.Errorf("the pool's Backend has %d endpoints after its pod went", n)
	}
}

// backendView is what a test compares of a Backend.
type backendView struct {
	Name      string
	Picker    string
	FailOpen  bool
	Endpoints []string
}

// poolConds returns the conditions of this controller's parents of a pool,
// by Gateway, as its status would be written.
func poolConds(t *testing.T, tr *translation, pool *inferencev1.InferencePool) (map[string][]cond, map[string]string) {
	t.Helper()
	pr, ok := tr.pools[types.NamespacedName{Namespace: pool.Namespace, Name: pool.Name}]
	if !ok {
		return nil, nil
	}
	out, accepted := map[string][]cond{}, map[string]string{}
	for _, p := range poolStatus(pr, testController, metav1.NewTime(epoch)).Parents {
		if p.ControllerName != testController || *p.ParentRef.Group != groupName || p.ParentRef.Kind != kindGateway {
			t.Errorf("parent %+v", p)
		}
		gw := string(p.ParentRef.Namespace) + "/" + string(p.ParentRef.Name)
		out[gw] = conds(p.Conditions)
		accepted[gw] = p.Conditions[0].Message
	}
	return out, accepted
}

var (
	poolAccepted    = cond{"Accepted", "True", "Accepted"}
	poolNotAccepted = cond{"Accepted", "False", "HTTPRouteNotAccepted"}
	poolResolved    = cond{"ResolvedRefs", "True", "ResolvedRefs"}
	poolInvalidEPP  = cond{"ResolvedRefs", "False", "InvalidExtensionRef"}
)

// An InferencePool has a parent per Gateway whose routes send traffic to
// it, Accepted as the routes are, and ResolvedRefs as its endpointPickerRef
// resolves.
func TestInferencePoolStatus(t *testing.T) {
	epp := func(change func(*inferencev1.EndpointPickerRef)) *inferencev1.EndpointPickerRef {
		r := &inferencev1.EndpointPickerRef{Name: "epp", Port: &inferencev1.Port{Number: 9002}, FailureMode: inferencev1.EndpointPickerFailOpen}
		if change != nil {
			change(r)
		}
		return r
	}
	open := gw("apps", "open", 1, listener("http", 80, gatewayv1.HTTPProtocolType, ""))
	open.Spec.Listeners[0].AllowedRoutes = &gatewayv1.AllowedRoutes{Namespaces: &gatewayv1.RouteNamespaces{From: ptrTo(gatewayv1.NamespacesFromAll)}}
	// closed admits routes of its own namespace only.
	closed := gw("infra", "closed", 2, listener("http", 80, gatewayv1.HTTPProtocolType, ""))
	for name, tc := range map[string]struct {
		epp      *inferencev1.EndpointPickerRef
		balancer *string // the pool's capstan.dev/balancer
		parents  []gatewayv1.ParentReference
		want     map[string][]cond
		accepted string // in the Accepted messages
	}{
		"no endpoint picker": {
			parents:  []gatewayv1.ParentReference{parent("", "open")},
			want:     map[string][]cond{"apps/open": {poolAccepted, poolResolved}},
			accepted: "balanced by capstan-router's --balancer policy (no endpointPickerRef)",
		},
		"no endpoint picker, a policy of its own": {
			balancer: ptrTo("session-affinity"),
			parents:  []gatewayv1.ParentReference{parent("", "open")},
			want:     map[string][]cond{"apps/open": {poolAccepted, poolResolved}},
			accepted: "balanced by capstan-router's session-affinity policy (capstan.dev/balancer)",
		},
		"no endpoint picker, a policy that does not exist": {
			balancer: ptrTo("fastest"),
			parents:  []gatewayv1.ParentReference{parent("", "open")},
			want:     map[string][]cond{"apps/open": {poolAccepted, poolResolved}},
			accepted: `balanced by capstan-router's --balancer policy: capstan.dev/balancer "fastest" is not one of [least-requests`,
		},
		"a parent that does not accept the route": {
			parents: []gatewayv1.ParentReference{parent("", "open"), parent("infra", "closed")},
			want:    map[string][]cond{"apps/open": {poolAccepted, poolResolved}, "infra/closed": {poolNotAccepted, poolResolved}},
		},
		"an endpoint picker, FailOpen": {
			epp:      epp(nil),
			parents:  []gatewayv1.ParentReference{parent("", "open")},
			want:     map[string][]cond{"apps/open": {poolAccepted, poolResolved}},
			accepted: "asks the endpoint picker apps/epp:9002 which Ready endpoints to use: failureMode FailOpen, so when it fails the request is balanced by capstan-router's --balancer policy",
		},
		"an endpoint picker, FailClose": {
			epp:      epp(func(r *inferencev1.EndpointPickerRef) { r.FailureMode = inferencev1.EndpointPickerFailClose }),
			parents:  []gatewayv1.ParentReference{parent("", "open")},
			want:     map[string][]cond{"apps/open": {poolAccepted, poolResolved}},
			accepted: "asks the endpoint picker apps/epp:9002 which Ready endpoints to use: failureMode FailClose, so when it fails the request gets 503",
		},
		"a missing endpoint picker Service": {
			epp:     epp(func(r *inferencev1.EndpointPickerRef) { r.Name = "nonexistent" }),
			parents: []gatewayv1.ParentReference{parent("", "open")},
			want:    map[string][]cond{"apps/open": {poolAccepted, poolInvalidEPP}},
		},
		"an endpoint picker Service without the port": {
			epp:     epp(func(r *inferencev1.EndpointPickerRef) { r.Port.Number = 9999 }),
			parents: []gatewayv1.ParentReference{parent("", "open")},
			want:    map[string][]cond{"apps/open": {poolAccepted, poolInvalidEPP}},
		},
		"an endpoint picker of another kind": {
			epp: epp(func(r *inferencev1.EndpointPickerRef) {
				r.Group, r.Kind = ptrTo(inferencev1.Group("apps")), "Deployment"
			}),
			parents: []gatewayv1.ParentReference{parent("", "open")},
			want:    map[string][]cond{"apps/open": {poolAccepted, poolInvalidEPP}},
		},
		"a parent of another controller's class": {
			parents: []gatewayv1.ParentReference{parent("", "theirs")},
		},
	} {
		t.Run(name, func(t *testing.T) {
			f := newFixture()
			pools := f.withPools()
			f.addService("apps", "epp", 9002, "198.18.0.8")
			pool := f.addPool(pools, "apps", "llama", "198.18.0.1", tc.epp)
			if tc.balancer != nil {
				pool.Annotations = map[string]string{inferencepool.BalancerAnnotation: *tc.balancer}
			}
			theirs := gw("apps", "theirs", 3, listener("http", 80, gatewayv1.HTTPProtocolType, ""))
			theirs.Spec.GatewayClassName = "other"
			f.gateways = []*gatewayv1.Gateway{open, closed, theirs}
			f.routes = []*gatewayv1.HTTPRoute{httpRoute("apps", "r", 1, tc.parents, nil, rule(poolRef("", "llama", 1)))}
			got, messages := poolConds(t, translate(&f.inputs), pool)
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("pool parents (-want +got):\n%s", diff)
			}
			for gw, msg := range messages {
				if got[gw][0] == poolAccepted && !strings.Contains(msg, tc.accepted) {
					t.Errorf("Accepted message for %s %q does not say %q", gw, msg, tc.accepted)
				}
			}
		})
	}
}

// A pool no route of an owned Gateway refers to any more loses this
// controller's parents and keeps other controllers'.
func TestInferencePoolStatusRemovesOursOnly(t *testing.T) {
	pool := &inferencev1.InferencePool{ObjectMeta: meta("apps", "llama", 0)}
	gwRef := func(name string) inferencev1.ParentReference {
		return inferencev1.ParentReference{Group: ptrTo(inferencev1.Group(groupName)), Kind: kindGateway, Name: inferencev1.ObjectName(name), Namespace: "apps"}
	}
	theirs := inferencev1.ParentStatus{ParentRef: gwRef("theirs"), ControllerName: "example.com/other",
		Conditions: []metav1.Condition{{Type: "Accepted", Status: "True", Reason: "Accepted"}}}
	pool.Status.Parents = []inferencev1.ParentStatus{theirs, {ParentRef: gwRef("gone"), ControllerName: testController}}
	if !poolHasOurs(pool, testController) {
		t.Fatal("poolHasOurs missed this controller's parent")
	}
	got := poolStatus(&poolResult{pool: pool}, testController, metav1.NewTime(epoch))
	if diff := cmp.Diff([]inferencev1.ParentStatus{theirs}, got.Parents); diff != "" {
		t.Errorf("parents (-want +got):\n%s", diff)
	}
	pool.Status.Parents = pool.Status.Parents[:1]
	if poolHasOurs(pool, testController) {
		t.Error("poolHasOurs counted another controller's parent")
	}
}
