package gateway

import (
	"fmt"
	"slices"

	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/gateway-api/pkg/features"
)

// SupportedFeatures are the Gateway API features the router implements, as
// its GatewayClasses report them and the conformance suite runs them.
var SupportedFeatures = []features.FeatureName{
	features.SupportGateway,
	features.SupportGatewayAddressEmpty,
	features.SupportGatewayHTTPListenerIsolation,
	features.SupportGatewayPort8080,
	features.SupportGatewayStaticAddresses,
	features.SupportHTTPRoute,
	features.SupportHTTPRoute303RedirectStatusCode,
	features.SupportHTTPRoute307RedirectStatusCode,
	features.SupportHTTPRoute308RedirectStatusCode,
	features.SupportHTTPRouteBackendRequestHeaderModification,
	features.SupportHTTPRouteDestinationPortMatching,
	features.SupportHTTPRouteHostRewrite,
	features.SupportHTTPRouteMethodMatching,
	features.SupportHTTPRouteNamedRouteRule,
	features.SupportHTTPRouteParentRefPort,
	features.SupportHTTPRoutePathRedirect,
	features.SupportHTTPRoutePathRewrite,
	features.SupportHTTPRoutePortRedirect,
	features.SupportHTTPRouteQueryParamMatching,
	features.SupportHTTPRouteResponseHeaderModification,
	features.SupportHTTPRouteSchemeRedirect,
	features.SupportReferenceGrant,
}

func supportedFeatures() []gatewayv1.SupportedFeature {
	out := make([]gatewayv1.SupportedFeature, len(SupportedFeatures))
	for i, f := range SupportedFeatures {
		out[i] = gatewayv1.SupportedFeature{Name: gatewayv1.FeatureName(f)}
	}
	slices.SortFunc(out, func(a, b gatewayv1.SupportedFeature) int {
		switch {
		case a.Name < b.Name:
			return -1
		case a.Name > b.Name:
			return 1
		}
		return 0
	})
	return out
}

// classStatus is the status an owned GatewayClass should have.
func classStatus(cr classResult, now metav1.Time) gatewayv1.GatewayClassStatus {
	st := *cr.class.Status.DeepCopy()
	st.Conditions = mergeConditions(st.Conditions, []metav1.Condition{cr.accepted.at(cr.class.Generation)}, classManaged, now)
	st.SupportedFeatures = supportedFeatures()
	return st
}

var (
	classManaged    = []string{string(gatewayv1.GatewayClassConditionStatusAccepted)}
	gatewayManaged  = []string{string(gatewayv1.GatewayConditionAccepted), string(gatewayv1.GatewayConditionProgrammed)}
	listenerManaged = []string{string(gatewayv1.ListenerConditionAccepted), string(gatewayv1.ListenerConditionProgrammed),
		string(gatewayv1.ListenerConditionResolvedRefs), string(gatewayv1.ListenerConditionConflicted),
		string(gatewayv1.ListenerConditionOverlappingTLSConfig)}
	routeManaged = []string{string(gatewayv1.RouteConditionAccepted), string(gatewayv1.RouteConditionResolvedRefs)}
)

// gatewayStatus is the status an owned Gateway should have, given which
// listen addresses could not be bound.
func gatewayStatus(gr *gatewayResult, bindErr func(address string) error, now metav1.Time) gatewayv1.GatewayStatus {
	gw := gr.gw
	gen := gw.Generation
	st := *gw.Status.DeepCopy()
	old := map[gatewayv1.SectionName][]metav1.Condition{}
	for _, l := range st.Listeners {
		old[l.Name] = l.Conditions
	}
	st.Listeners = nil
	valid, programmed := 0, 0
	for _, l := range gr.listeners {
		accepted := l.accepted
		prog := trueCond(string(gatewayv1.ListenerConditionProgrammed), string(gatewayv1.ListenerReasonProgrammed), "Programmed")
		switch {
		case gr.classProblem != "":
			prog = falseCond(string(gatewayv1.ListenerConditionProgrammed), string(gatewayv1.ListenerReasonInvalid), gr.classProblem)
		case !gr.assignment.ok():
			prog = falseCond(string(gatewayv1.ListenerConditionProgrammed), string(gatewayv1.ListenerReasonPending), "the Gateway has no address")
		case accepted.Status != metav1.ConditionTrue:
			prog = falseCond(string(gatewayv1.ListenerConditionProgrammed), string(gatewayv1.ListenerReasonInvalid), accepted.Message)
		case l.conflicted.Status == metav1.ConditionTrue:
			prog = falseCond(string(gatewayv1.ListenerConditionProgrammed), string(gatewayv1.ListenerReasonInvalid), l.conflicted.Message)
		case l.invalid != "":
			prog = falseCond(string(gatewayv1.ListenerConditionProgrammed), string(gatewayv1.ListenerReasonInvalid), l.invalid)
		default:
			if err := bindErr(l.address); err != nil {
				msg := fmt.Sprintf("listening on %s: %v", l.address, err)
				accepted = falseCond(string(gatewayv1.ListenerConditionAccepted), string(gatewayv1.ListenerReasonPortUnavailable), msg)
				prog = falseCond(string(gatewayv1.ListenerConditionProgrammed), string(gatewayv1.ListenerReasonInvalid), msg)
			}
		}
		if accepted.Status == metav1.ConditionTrue {
			valid++
		}
		if prog.Status == metav1.ConditionTrue {
			programmed++
		}
		want := []metav1.Condition{accepted.at(gen), prog.at(gen), l.resolved.at(gen), l.conflicted.at(gen)}
		if l.overlapping != nil {
			// A negative-polarity condition, present only when true.
			want = append(want, l.overlapping.at(gen))
		}
		st.Listeners = append(st.Listeners, gatewayv1.ListenerStatus{
			Name:           l.spec.Name,
			SupportedKinds: l.kinds,
			AttachedRoutes: int32(len(l.attached)),
			Conditions:     mergeConditions(old[l.spec.Name], want, listenerManaged, now),
		})
	}

	acceptedType, programmedType := string(gatewayv1.GatewayConditionAccepted), string(gatewayv1.GatewayConditionProgrammed)
	var accepted, prog condition
	switch {
	case gr.classProblem != "":
		accepted = falseCond(acceptedType, string(gatewayv1.GatewayReasonInvalid), gr.classProblem)
	case gr.assignment.unsupported != "":
		accepted = falseCond(acceptedType, string(gatewayv1.GatewayReasonUnsupportedAddress), gr.assignment.unsupported)
	case valid == 0 && len(gr.listeners) > 0:
		accepted = falseCond(acceptedType, string(gatewayv1.GatewayReasonListenersNotValid), "no listener is valid")
	case valid < len(gr.listeners):
		accepted = trueCond(acceptedType, string(gatewayv1.GatewayReasonListenersNotValid),
			fmt.Sprintf("%d of %d listeners are not valid", len(gr.listeners)-valid, len(gr.listeners)))
	default:
		accepted = trueCond(acceptedType, string(gatewayv1.GatewayReasonAccepted), "Accepted")
	}
	switch {
	case gr.assignment.problem != "":
		prog = falseCond(programmedType, string(gr.assignment.problemReason), gr.assignment.problem)
	case accepted.Status != metav1.ConditionTrue:
		prog = falseCond(programmedType, string(gatewayv1.GatewayReasonInvalid), accepted.Message)
	case programmed == 0:
		prog = falseCond(programmedType, string(gatewayv1.GatewayReasonInvalid), "no listener is programmed")
	default:
		prog = trueCond(programmedType, string(gatewayv1.GatewayReasonProgrammed),
			fmt.Sprintf("serving %d of %d listeners", programmed, len(gr.listeners)))
	}
	st.Conditions = mergeConditions(st.Conditions, []metav1.Condition{accepted.at(gen), prog.at(gen)}, gatewayManaged, now)
	st.Addresses = nil
	if gr.assignment.ok() {
		st.Addresses = []gatewayv1.GatewayStatusAddress{gr.assignment.status}
	}
	return st
}

// routeStatus is the status a route should have: the parents other
// controllers wrote, then this controller's, in spec order.
func routeStatus(rr routeResult, controller gatewayv1.GatewayController, now metav1.Time) gatewayv1.HTTPRouteStatus {
	st := *rr.route.Status.DeepCopy()
	var parents []gatewayv1.RouteParentStatus
	oldOurs := map[int]gatewayv1.RouteParentStatus{}
	for i, p := range st.Parents {
		if p.ControllerName != controller {
			parents = append(parents, p)
		} else {
			oldOurs[i] = p
		}
	}
	for _, p := range rr.parents {
		var prior []metav1.Condition
		for _, o := range oldOurs {
			if equality.Semantic.DeepEqual(o.ParentRef, p.ParentRef) {
				prior = o.Conditions
				break
			}
		}
		p.Conditions = mergeConditions(prior, p.Conditions, routeManaged, now)
		parents = append(parents, p)
	}
	st.Parents = parents
	return st
}

// mergeConditions returns the desired conditions, in order, each keeping
// its last transition time from existing when its status has not changed,
// followed by the existing conditions of types this controller does not
// manage (which it must not remove).
func mergeConditions(existing, desired []metav1.Condition, managed []string, now metav1.Time) []metav1.Condition {
	out := make([]metav1.Condition, 0, len(desired)+len(existing))
	for _, d := range desired {
		d.LastTransitionTime = now
		for _, e := range existing {
			if e.Type == d.Type && e.Status == d.Status {
				d.LastTransitionTime = e.LastTransitionTime
			}
		}
		out = append(out, d)
	}
	for _, e := range existing {
		if !slices.Contains(managed, e.Type) && !slices.ContainsFunc(desired, func(d metav1.Condition) bool { return d.Type == e.Type }) {
			out = append(out, e)
		}
	}
	return out
}

// staleCache reports whether some condition was written for a newer
// generation than the cached object has: the cache lags, and writing now
// would move the status backwards.
func staleCache(generation int64, conds ...[]metav1.Condition) bool {
	for _, cs := range conds {
		for _, c := range cs {
			if c.ObservedGeneration > generation {
				return true
			}
		}
	}
	return false
}
