package gateway

import (
	"cmp"
	"fmt"
	"slices"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	inferencev1 "sigs.k8s.io/gateway-api-inference-extension/api/v1"

	"github.com/capstan-dev/capstan/router/balance"
	"github.com/capstan-dev/capstan/router/inferencepool"
)

// poolResult is one InferencePool that routes attached to owned Gateways
// send traffic to.
type poolResult struct {
	pool *inferencev1.InferencePool
	// parents maps each Gateway one of those routes has as a parent to
	// whether that Gateway accepted one of them.
	parents  map[types.NamespacedName]bool
	accepted string // the Accepted message when a parent accepted a route
	resolved condition
}

// notePools records, for the InferencePools a route's backendRefs resolved
// to, the Gateways the route has as parents and whether each accepted it.
func (t *translation) notePools(in *inputs, cr *compiledRoute, rr routeResult) {
	for _, key := range cr.pools {
		pr, ok := t.pools[key]
		if !ok {
			pool := in.pool(key)
			if pool == nil {
				continue // resolved, so cached; guards a cache that changed meanwhile
			}
			pr = &poolResult{pool: pool, parents: map[types.NamespacedName]bool{}}
			pr.accepted, pr.resolved = in.poolConditions(pool)
			t.pools[key] = pr
		}
		for _, ps := range rr.parents {
			gw := types.NamespacedName{Namespace: rr.route.Namespace, Name: string(ps.ParentRef.Name)}
			if ps.ParentRef.Namespace != nil {
				gw.Namespace = string(*ps.ParentRef.Namespace)
			}
			pr.parents[gw] = pr.parents[gw] || ps.Conditions[0].Status == metav1.ConditionTrue
		}
	}
}

// poolConditions returns the message of a pool's Accepted condition, when
// a parent accepted it, and its ResolvedRefs condition: whether its
// endpointPickerRef names a Service that exists. The Accepted message says
// who picks the endpoints and what happens when the picker fails.
func (in *inputs) poolConditions(pool *inferencev1.InferencePool) (string, condition) {
	resolvedType := string(inferencev1.InferencePoolConditionResolvedRefs)
	ref := pool.Spec.EndpointPickerRef
	if ref == nil {
		return "Accepted; balanced by " + balancedBy(pool) + " (no endpointPickerRef)",
			trueCond(resolvedType, string(inferencev1.InferencePoolReasonResolvedRefs), "no endpointPickerRef to resolve")
	}
	epp := inferencepool.EndpointPicker(pool)
	accepted := fmt.Sprintf("Accepted; each request asks the endpoint picker %s which Ready endpoints to use: "+
		"failureMode FailOpen, so when it fails the request is balanced by %s", epp, balancedBy(pool))
	if ref.FailureMode != inferencev1.EndpointPickerFailOpen {
		accepted = fmt.Sprintf("Accepted; each request asks the endpoint picker %s which Ready endpoints to use: "+
			"failureMode FailClose, so when it fails the request gets 503", epp)
	}
	group, kind := "", kindService
	if ref.Group != nil {
		group = string(*ref.Group)
	}
	if ref.Kind != "" {
		kind = string(ref.Kind)
	}
	invalid := func(msg string) (string, condition) {
		return accepted, falseCond(resolvedType, string(inferencev1.InferencePoolReasonInvalidExtensionRef), msg)
	}
	// The picker is in the pool's namespace, which the router watches (the
	// pool resolved).
	key := types.NamespacedName{Namespace: pool.Namespace, Name: string(ref.Name)}
	if group != "" || kind != kindService {
		return invalid(fmt.Sprintf("endpointPickerRef %s is a %s/%s: only a core Service can be an endpoint picker", key, group, kind))
	}
	svc := in.service(key)
	switch {
	case svc == nil:
		return invalid(fmt.Sprintf("endpointPickerRef %s: Service not found", key))
	case ref.Port == nil:
		return invalid(fmt.Sprintf("endpointPickerRef %s: a port is required", key))
	case svc.ServicePort(int32(ref.Port.Number)) == nil:
		return invalid(fmt.Sprintf("endpointPickerRef %s: the Service has no TCP port %d", key, ref.Port.Number))
	}
	return accepted, trueCond(resolvedType, string(inferencev1.InferencePoolReasonResolvedRefs), "endpointPickerRef resolved to Service "+epp)
}

// balancedBy says which of capstan-router's policies balances the pool:
// the one its capstan.dev/balancer annotation names, or the router's own,
// also when the annotation names none.
func balancedBy(pool *inferencev1.InferencePool) string {
	name, ok := pool.Annotations[inferencepool.BalancerAnnotation]
	switch {
	case !ok:
		return "capstan-router's --balancer policy"
	case slices.Contains(balance.Policies, balance.Policy(name)):
		return fmt.Sprintf("capstan-router's %s policy (%s)", name, inferencepool.BalancerAnnotation)
	}
	return fmt.Sprintf("capstan-router's --balancer policy: %s %q is not one of %v", inferencepool.BalancerAnnotation, name, balance.Policies)
}

// maxPoolParents is the most parents an InferencePool's status may list
// (the CRD's maxItems).
const maxPoolParents = 32

var poolManaged = []string{string(inferencev1.InferencePoolConditionAccepted), string(inferencev1.InferencePoolConditionResolvedRefs)}

// poolStatus is the status a pool should have: the parents other
// controllers wrote, then this controller's, one per Gateway in name
// order.
func poolStatus(pr *poolResult, controller inferencev1.ControllerName, now metav1.Time) inferencev1.InferencePoolStatus {
	st := *pr.pool.Status.DeepCopy()
	var parents []inferencev1.ParentStatus
	var oldOurs []inferencev1.ParentStatus
	for _, p := range st.Parents {
		if p.ControllerName != controller {
			parents = append(parents, p)
		} else {
			oldOurs = append(oldOurs, p)
		}
	}
	gateways := make([]types.NamespacedName, 0, len(pr.parents))
	for gw := range pr.parents {
		gateways = append(gateways, gw)
	}
	slices.SortFunc(gateways, func(a, b types.NamespacedName) int { return cmp.Compare(a.String(), b.String()) })
	gen := pr.pool.Generation
	for _, gw := range gateways {
		if len(parents) == maxPoolParents {
			break // the API server would refuse the whole status
		}
		ref := inferencev1.ParentReference{Group: ptrTo(inferencev1.Group(groupName)), Kind: kindGateway,
			Name: inferencev1.ObjectName(gw.Name), Namespace: inferencev1.Namespace(gw.Namespace)}
		accepted := trueCond(string(inferencev1.InferencePoolConditionAccepted), string(inferencev1.InferencePoolReasonAccepted), pr.accepted)
		if !pr.parents[gw] {
			accepted = falseCond(string(inferencev1.InferencePoolConditionAccepted), string(inferencev1.InferencePoolReasonHTTPRouteNotAccepted),
				fmt.Sprintf("Gateway %s accepts no HTTPRoute that refers to the pool; the routes' status says why", gw))
		}
		var prior []metav1.Condition
		for _, o := range oldOurs {
			if o.ParentRef.Name == ref.Name && o.ParentRef.Namespace == ref.Namespace {
				prior = o.Conditions
			}
		}
		parents = append(parents, inferencev1.ParentStatus{
			ParentRef:      ref,
			ControllerName: controller,
			Conditions:     mergeConditions(prior, []metav1.Condition{accepted.at(gen), pr.resolved.at(gen)}, poolManaged, now),
		})
	}
	st.Parents = parents
	return st
}

// poolHasOurs reports whether a pool's status has parents this controller
// wrote.
func poolHasOurs(pool *inferencev1.InferencePool, controller inferencev1.ControllerName) bool {
	return slices.ContainsFunc(pool.Status.Parents, func(p inferencev1.ParentStatus) bool { return p.ControllerName == controller })
}
