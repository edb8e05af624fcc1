package gateway

import (
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// objectRef names one end of a reference for ReferenceGrant checks.
type objectRef struct {
	Group, Kind, Namespace, Name string
}

// grants answers whether a ReferenceGrant allows a reference across
// namespaces. A reference within one namespace needs none.
type grants map[string][]*gatewayv1.ReferenceGrant // by the grant's namespace

func newGrants(list []*gatewayv1.ReferenceGrant) grants {
	g := grants{}
	for _, rg := range list {
		g[rg.Namespace] = append(g[rg.Namespace], rg)
	}
	return g
}

// allowed reports whether from may refer to to: they are in the same
// namespace, or a ReferenceGrant in to's namespace lists from's group, kind
// and namespace and to's group, kind and name (an unnamed "to" entry allows
// every object of the kind).
func (g grants) allowed(from, to objectRef) bool {
	if from.Namespace == to.Namespace {
		return true
	}
	for _, rg := range g[to.Namespace] {
		if grantsFrom(rg, from) && grantsTo(rg, to) {
			return true
		}
	}
	return false
}

func grantsFrom(rg *gatewayv1.ReferenceGrant, from objectRef) bool {
	for _, f := range rg.Spec.From {
		if string(f.Group) == from.Group && string(f.Kind) == from.Kind && string(f.Namespace) == from.Namespace {
			return true
		}
	}
	return false
}

func grantsTo(rg *gatewayv1.ReferenceGrant, to objectRef) bool {
	for _, t := range rg.Spec.To {
		if string(t.Group) == to.Group && string(t.Kind) == to.Kind && (t.Name == nil || *t.Name == "" || string(*t.Name) == to.Name) {
			return true
		}
	}
	return false
}
