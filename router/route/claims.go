package route

import (
	"cmp"
	"fmt"
	"slices"
	"strings"

	"k8s.io/apimachinery/pkg/types"
)

// ShareAnnotation on a Service of the namespace that owns a model lists,
// comma-separated, the other namespaces whose Services of the model are
// pooled with it. Without it a model name belongs to one namespace.
const ShareAnnotation = "capstan.dev/share-model-with"

// RefusedClaim is a Service that claims a model another namespace owns and
// has not shared, so it gets no traffic.
type RefusedClaim struct {
	Service types.NamespacedName
	UID     types.UID
	// Owner is the namespace that owns the model.
	Owner string
}

// Reason says why the claim gets no traffic, for a person to read.
func (c RefusedClaim) Reason(model string) string {
	return fmt.Sprintf("model %s belongs to namespace %s, whose Services claimed it first; it shares the model with namespace %s only if one of its Services of the model lists it in the %s annotation",
		model, c.Owner, c.Service.Namespace, ShareAnnotation)
}

// Recorder is told what a Service's owners should see: every Service whose
// claim on a model became refused, and every new error in a Service's
// declaration of LoRA adapters. It is called with the Builder's lock held
// and must not block.
type Recorder interface {
	ClaimRefused(model string, claim RefusedClaim)
	AdaptersInvalid(svc types.NamespacedName, uid types.UID, err error)
}

// claimOrder puts the first claim first: the oldest Service, then by
// namespace and name, so that every router replica picks the same owner.
func claimOrder(a, b *serviceState) int {
	if c := a.svc.Created.Compare(b.svc.Created); c != 0 {
		return c
	}
	return cmp.Or(cmp.Compare(a.svc.Key.Namespace, b.svc.Key.Namespace), cmp.Compare(a.svc.Key.Name, b.svc.Key.Name))
}

// settleClaims splits a model's Services into those pooled and those
// refused: the namespace of the first claim owns the model, and the
// namespaces its own Services of the model share it with are pooled too.
// It returns the owner and the namespaces shared with, sorted.
func settleClaims(claims []*serviceState) (owner string, sharedWith []string, pooled, refused []*serviceState) {
	if len(claims) == 0 {
		return "", nil, nil, nil
	}
	owner = slices.MinFunc(claims, claimOrder).svc.Key.Namespace
	shared := map[string]bool{owner: true}
	for _, st := range claims {
		if st.svc.Key.Namespace != owner {
			continue
		}
		for ns := range strings.SplitSeq(st.svc.Annotations[ShareAnnotation], ",") {
			if ns = strings.TrimSpace(ns); ns != "" && !shared[ns] {
				shared[ns] = true
				sharedWith = append(sharedWith, ns)
			}
		}
	}
	slices.Sort(sharedWith)
	for _, st := range claims {
		if shared[st.svc.Key.Namespace] {
			pooled = append(pooled, st)
		} else {
			refused = append(refused, st)
		}
	}
	return owner, sharedWith, pooled, refused
}
