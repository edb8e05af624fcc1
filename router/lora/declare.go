package lora

import (
	"fmt"
	"strings"

	"sigs.k8s.io/yaml"
)

// Annotation declares, on a model's Service, the LoRA adapters the router
// keeps loaded on the model's pods: a YAML (or JSON) list of adapters, each
// with the name clients send as their model, the source the engine loads it
// from, and optionally how many Ready pods should have it (default all).
const Annotation = "capstan.dev/lora-adapters"

const (
	// MaxDeclared bounds the adapters one Service declares.
	MaxDeclared = 64
	// MaxSourceBytes bounds an adapter's source.
	MaxSourceBytes = 4096
	// maxAnnotationBytes bounds the annotation read.
	maxAnnotationBytes = 64 << 10
)

// Adapter is one declared adapter.
type Adapter struct {
	// Name is the model name clients send, and the lora_name the engine
	// loads it under.
	Name string `json:"name"`
	// Source is what the engine loads it from (vLLM's lora_path): a path
	// on the pod, or whatever the engine's resolvers accept.
	Source string `json:"source"`
	// Replicas is how many Ready pods of the model should have it loaded;
	// nil means all of them.
	Replicas *int32 `json:"replicas,omitempty"`
}

// Want is how many of ready endpoints should have a loaded.
func (a Adapter) Want(ready int) int {
	if a.Replicas == nil {
		return ready
	}
	return min(int(*a.Replicas), ready)
}

// ParseAnnotation reads the Annotation's value. Unknown fields, invalid or
// repeated names, empty sources and replicas below 1 are errors, so that a
// typo is reported rather than half applied.
func ParseAnnotation(value string) ([]Adapter, error) {
	if len(value) > maxAnnotationBytes {
		return nil, fmt.Errorf("%s: longer than %d bytes", Annotation, maxAnnotationBytes)
	}
	var adapters []Adapter
	if err := yaml.UnmarshalStrict([]byte(value), &adapters); err != nil {
		return nil, fmt.Errorf("%s: %w", Annotation, err)
	}
	if len(adapters) > MaxDeclared {
		return nil, fmt.Errorf("%s: %d adapters, at most %d", Annotation, len(adapters), MaxDeclared)
	}
	seen := map[string]bool{}
	for i, a := range adapters {
		switch {
		case !ValidName(a.Name):
			return nil, fmt.Errorf("%s[%d]: name %q must be 1 to %d printable characters without spaces", Annotation, i, a.Name, MaxNameBytes)
		case seen[a.Name]:
			return nil, fmt.Errorf("%s[%d]: adapter %s is declared twice", Annotation, i, a.Name)
		case strings.TrimSpace(a.Source) == "" || len(a.Source) > MaxSourceBytes:
			return nil, fmt.Errorf("%s[%d]: adapter %s needs a source of at most %d bytes", Annotation, i, a.Name, MaxSourceBytes)
		case a.Replicas != nil && *a.Replicas < 1:
			return nil, fmt.Errorf("%s[%d]: adapter %s: replicas must be at least 1 (leave it out for every pod)", Annotation, i, a.Name)
		}
		seen[a.Name] = true
	}
	return adapters, nil
}
