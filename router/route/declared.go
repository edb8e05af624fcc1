package route

import (
	"cmp"
	"slices"

	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/router/lora"
)

// DeclaredAdapter is a LoRA adapter a Service of a model declares.
type DeclaredAdapter struct {
	lora.Adapter
	// Service declares it; UID is the Service's, for Events.
	Service types.NamespacedName
	UID     types.UID
}

// declare reads st's adapter declaration and records an error that is new
// since the Service's previous snapshot, old (nil for a new Service).
func (b *Builder) declare(st, old *serviceState) {
	value, ok := st.svc.Annotations[lora.Annotation]
	if !ok {
		return
	}
	if old != nil && old.svc.Annotations[lora.Annotation] == value {
		st.adapters, st.adaptersErr = old.adapters, old.adaptersErr
		return
	}
	st.adapters, st.adaptersErr = lora.ParseAnnotation(value)
	if st.adaptersErr != nil && b.opts.Recorder != nil {
		b.opts.Recorder.AdaptersInvalid(st.svc.Key, st.svc.UID, st.adaptersErr)
	}
}

// declaredAdapters merges the adapters that a model's pooled Services
// declare: where two declare one name, the Service first by namespace and
// name wins.
func declaredAdapters(pooled []*serviceState) []DeclaredAdapter {
	var all []DeclaredAdapter
	for _, st := range slices.SortedFunc(slices.Values(pooled), func(a, b *serviceState) int {
		return cmp.Compare(a.svc.Key.String(), b.svc.Key.String())
	}) {
		for _, a := range st.adapters {
			if !slices.ContainsFunc(all, func(d DeclaredAdapter) bool { return d.Name == a.Name }) {
				all = append(all, DeclaredAdapter{Adapter: a, Service: st.svc.Key, UID: st.svc.UID})
			}
		}
	}
	slices.SortFunc(all, func(a, b DeclaredAdapter) int { return cmp.Compare(a.Name, b.Name) })
	return all
}
