package engineload

import (
	"fmt"
	"math"
	"slices"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/router/health"
)

// MaxLoRASlots bounds the adapter slots (vLLM's max_lora) a pod may report;
// the adapter lists are bounded by the catalogue (catalogue.MaxAdapters and
// catalogue.MaxAdapterNameLength). A report over a bound is dropped whole:
// the pod's endpoint is then treated as one that reports no adapters,
// neither preferred nor passed over.
const MaxLoRASlots = 1 << 16

// loraIDs are the catalogue IDs of the metrics a LoRA state is made of, -1
// when the catalogue lacks one.
type loraIDs struct {
	running, waiting, slots int
}

// state returns the LoRA state a page's values report, nil (and why) when
// they report none: the catalogue reads vLLM's vllm:lora_requests_info, of
// which it parses only the newest series, the state now. A report needs
// both lists and the slots, each within its bounds.
func (ids loraIDs) state(v *catalogue.Values) (*health.LoRAState, error) {
	has := func(id int) bool { return id >= 0 && v.Has[id] }
	switch {
	case !has(ids.running) && !has(ids.waiting) && !has(ids.slots):
		return nil, nil // LoRA is off, or not an engine that reports it
	case !has(ids.slots):
		return nil, fmt.Errorf("no %s (max_lora)", catalogue.LoRAMaxAdapters)
	case !has(ids.running) || !has(ids.waiting):
		return nil, fmt.Errorf("an adapter list is missing or over the bounds (%d names of %d bytes)",
			catalogue.MaxAdapters, catalogue.MaxAdapterNameLength)
	}
	slots := v.Scalar[ids.slots]
	if slots != math.Trunc(slots) || slots < 1 || slots > MaxLoRASlots {
		return nil, fmt.Errorf("max_lora %v is not a whole number between 1 and %d", slots, MaxLoRASlots)
	}
	// v is reused for the next page.
	return health.NewLoRAState(slices.Clone(v.Adapters[ids.running]), slices.Clone(v.Adapters[ids.waiting]), int(slots)), nil
}
