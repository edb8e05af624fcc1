package engineload

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	dto "github.com/prometheus/client_model/go"
	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/exposition"
	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/metricsadapter/scrape"
	"github.com/capstan-dev/capstan/router/health"
)

// observeLoRA reads a vLLM page as the router's scraper does (the
// catalogue's filter for Wants, the scraper's default limits) and returns
// the LoRA state the observer keeps of it.
func observeLoRA(t *testing.T, page string) *health.LoRAState {
	t.Helper()
	c := catalogue.Builtin()
	p := exposition.Parser{Limits: exposition.Limits{MaxSeriesPerFamily: 4096, MaxBucketsPerHistogram: 200}}
	families, err := p.Parse(exposition.Text, []byte(page), c.Filter(modelserver.VLLM, Wants))
	if err != nil {
		t.Fatal(err)
	}
	return observe(t, c, families)
}

func observe(t *testing.T, c *catalogue.Catalogue, families map[string]*dto.MetricFamily) *health.LoRAState {
	t.Helper()
	v := c.NewValues()
	c.Extract(modelserver.VLLM, families, v)
	o := NewObserver(c, time.Minute)
	pod := types.NamespacedName{Namespace: "ns", Name: "a"}
	o.Observe(scrape.Target{Key: pod}, time.Now(), v)
	s, ok := o.Latest(pod)
	if !ok {
		t.Fatal("no sample kept")
	}
	return s.LoRA
}

func loraPage(series ...string) string {
	var b strings.Builder
	b.WriteString("# TYPE vllm:lora_requests_info gauge\nvllm:num_requests_waiting 1\n")
	for _, s := range series {
		b.WriteString("vllm:lora_requests_info{" + s + "\n")
	}
	return b.String()
}

func TestObserverReadsLoRAState(t *testing.T) {
	many := make([]string, 20_000)
	for i := range many {
		many[i] = fmt.Sprintf(`max_lora="2",running_lora_adapters="a%d",waiting_lora_adapters=""} %d`, i, 1_700_000_000+i)
	}
	cases := map[string]struct {
		page string
		want *health.LoRAState
	}{
		"one series, as the simulator serves it": {
			loraPage(`max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters="c"} 1.7e9`),
			health.NewLoRAState([]string{"a", "b"}, []string{"c"}, 2),
		},
		"no adapters in use": {
			loraPage(`max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 1.7e9`),
			health.NewLoRAState(nil, nil, 4),
		},
		"vLLM's past states: the newest is the state now": {
			loraPage(`max_lora="2",running_lora_adapters="a",waiting_lora_adapters=""} 1.700000003e9`,
				`max_lora="2",running_lora_adapters="b",waiting_lora_adapters="a"} 1.700000009e9`,
				`max_lora="2",running_lora_adapters="c",waiting_lora_adapters=""} 1.700000001e9`,
				`max_lora="2",running_lora_adapters="d",waiting_lora_adapters=""} NaN`),
			health.NewLoRAState([]string{"b"}, []string{"a"}, 2),
		},
		"20,000 past states, more than a family's series bound": {
			loraPage(many...),
			health.NewLoRAState([]string{"a19999"}, nil, 2),
		},
		"empty names are skipped": {
			loraPage(`max_lora="2",running_lora_adapters=",a,,",waiting_lora_adapters=""} 1`),
			health.NewLoRAState([]string{"a"}, nil, 2),
		},
		"LoRA off": {loraPage(), nil},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			got := observeLoRA(t, tc.page)
			if diff := cmp.Diff(tc.want, got, cmpopts.EquateEmpty(), cmp.AllowUnexported(health.LoRAState{})); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

// A pod's report is its own to write: one over a bound, incomplete, or one
// that makes no sense is dropped whole, as if the pod reported no LoRA
// state.
func TestObserverDropsHostileLoRAReports(t *testing.T) {
	many := strings.Repeat("x,", catalogue.MaxAdapters) + "y"
	long := strings.Repeat("n", catalogue.MaxAdapterNameLength+1)
	cases := map[string]string{
		"too many running adapters": `max_lora="2",running_lora_adapters="` + many + `",waiting_lora_adapters=""} 1`,
		"too many waiting adapters": `max_lora="2",running_lora_adapters="",waiting_lora_adapters="` + many + `"} 1`,
		"a name too long":           `max_lora="2",running_lora_adapters="a,` + long + `",waiting_lora_adapters=""} 1`,
		"no waiting list":           `max_lora="2",running_lora_adapters="a"} 1`,
		"no slots":                  `max_lora="0",running_lora_adapters="",waiting_lora_adapters=""} 1`,
		"negative slots":            `max_lora="-3",running_lora_adapters="",waiting_lora_adapters=""} 1`,
		"too many slots":            `max_lora="1000000",running_lora_adapters="",waiting_lora_adapters=""} 1`,
		"a fraction of a slot":      `max_lora="2.5",running_lora_adapters="",waiting_lora_adapters=""} 1`,
		"slots not a number":        `max_lora="two",running_lora_adapters="",waiting_lora_adapters=""} 1`,
		"no max_lora":               `running_lora_adapters="a",waiting_lora_adapters=""} 1`,
		"no finite value":           `max_lora="2",running_lora_adapters="a",waiting_lora_adapters=""} +Inf`,
	}
	for name, series := range cases {
		t.Run(name, func(t *testing.T) {
			if got := observeLoRA(t, loraPage(series)); got != nil {
				t.Fatalf("LoRA state %+v; want none", got)
			}
		})
	}
}

func FuzzObserverLoRAState(f *testing.F) {
	f.Add("a,b", "c", "2")
	f.Add("", "", "1")
	f.Add(",,,", "x,,y", "65536")
	f.Add(" a , a ", "\"x\"{}", "1e3")
	c := catalogue.Builtin()
	f.Fuzz(func(t *testing.T, running, waiting, slots string) {
		name := func(s string) *string { return &s }
		v := 1.0
		families := map[string]*dto.MetricFamily{"vllm:lora_requests_info": {Name: name("vllm:lora_requests_info"), Type: dto.MetricType_UNTYPED.Enum(),
			Metric: []*dto.Metric{{Untyped: &dto.Untyped{Value: &v}, Label: []*dto.LabelPair{
				{Name: name("running_lora_adapters"), Value: &running}, {Name: name("waiting_lora_adapters"), Value: &waiting}, {Name: name("max_lora"), Value: &slots}}}}}}
		s := observe(t, c, families)
		if s == nil {
			return
		}
		if s.MaxLoRAs < 1 || s.MaxLoRAs > MaxLoRASlots || len(s.Running) > catalogue.MaxAdapters || len(s.Waiting) > catalogue.MaxAdapters {
			t.Fatalf("out of bounds: %+v", s)
		}
		for _, n := range append(append([]string{}, s.Running...), s.Waiting...) {
			if n == "" || len(n) > catalogue.MaxAdapterNameLength || strings.Contains(n, ",") {
				t.Fatalf("bad name %q", n)
			}
		}
	})
}
