package engineload

import (
	"fmt"
	"math"
	"strconv"
	"strings"

	dto "github.com/prometheus/client_model/go"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/router/health"
)

// LoRAInfo is vLLM's info series of the adapters its requests use: its
// labels name the running and waiting requests' adapters (comma-separated)
// and the adapter slots (max_lora); its value is when they were current.
const LoRAInfo = "vllm:lora_requests_info"

// Families is the scraper's Options.Families for an Observer.
var Families = map[modelserver.Engine][]string{modelserver.VLLM: {LoRAInfo}}

// Bounds of a LoRA report, which is a pod's own to write. A report over
// one is dropped whole: the pod's endpoint is then treated as one that
// reports no adapters, neither preferred nor passed over.
const (
	// MaxLoRANames bounds the adapters of one list; as many as the router
	// takes from an endpoint's /v1/models.
	MaxLoRANames = 256
	// MaxLoRANameBytes bounds an adapter's name.
	MaxLoRANameBytes = 256
	// MaxLoRASlots bounds max_lora.
	MaxLoRASlots = 1 << 16
)

// ParseLoRAInfo reads the engine's LoRA state from its LoRAInfo family.
// vLLM keeps a series for every combination of labels it ever reported,
// each valued with the time it was last current, so the series with the
// largest value is the state now.
func ParseLoRAInfo(f *dto.MetricFamily) (*health.LoRAState, error) {
	var latest *dto.Metric
	newest := math.Inf(-1)
	for _, m := range f.GetMetric() {
		v, ok := value(m)
		if ok && v > newest {
			latest, newest = m, v
		}
	}
	if latest == nil {
		return nil, fmt.Errorf("%s has no series with a finite value", LoRAInfo)
	}
	var (
		running, waiting []string
		slots            = -1
		err              error
	)
	for _, l := range latest.GetLabel() {
		switch l.GetName() {
		case "running_lora_adapters":
			running, err = loraNames(l.GetValue())
		case "waiting_lora_adapters":
			waiting, err = loraNames(l.GetValue())
		case "max_lora":
			slots, err = strconv.Atoi(l.GetValue())
			if err == nil && (slots < 1 || slots > MaxLoRASlots) {
				err = fmt.Errorf("max_lora %d is not between 1 and %d", slots, MaxLoRASlots)
			}
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", LoRAInfo, err)
		}
	}
	if slots < 0 {
		return nil, fmt.Errorf("%s has no max_lora label", LoRAInfo)
	}
	return health.NewLoRAState(running, waiting, slots), nil
}

func value(m *dto.Metric) (float64, bool) {
	var v float64
	switch {
	case m.Gauge != nil:
		v = m.Gauge.GetValue()
	case m.Untyped != nil:
		v = m.Untyped.GetValue()
	default:
		return 0, false
	}
	return v, !math.IsNaN(v) && !math.IsInf(v, 0)
}

// loraNames splits a comma-separated list of adapter names, reading no
// further than its bounds allow.
func loraNames(list string) ([]string, error) {
	var names []string
	for list != "" {
		if len(names) == MaxLoRANames {
			return nil, fmt.Errorf("more than %d adapters in a list", MaxLoRANames)
		}
		name, rest, _ := strings.Cut(list, ",")
		if len(name) > MaxLoRANameBytes {
			return nil, fmt.Errorf("an adapter name of more than %d bytes", MaxLoRANameBytes)
		}
		if name != "" {
			names = append(names, name)
		}
		list = rest
	}
	return names, nil
}
