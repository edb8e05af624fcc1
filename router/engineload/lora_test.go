package engineload

import (
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/scrape"
	"github.com/capstan-dev/capstan/router/health"
)

// loraFamily parses a page's vllm:lora_requests_info lines.
func loraFamily(t *testing.T, lines string) *dto.MetricFamily {
	t.Helper()
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(strings.NewReader("# TYPE vllm:lora_requests_info gauge\n" + lines))
	if err != nil {
		t.Fatal(err)
	}
	return families[LoRAInfo]
}

func TestParseLoRAInfo(t *testing.T) {
	cases := map[string]struct {
		page string
		want *health.LoRAState
	}{
		"one series, as the simulator serves it": {
			page: `vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters="c"} 1.7e9` + "\n",
			want: health.NewLoRAState([]string{"a", "b"}, []string{"c"}, 2),
		},
		"no adapters in use": {
			page: `vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 1.7e9` + "\n",
			want: health.NewLoRAState(nil, nil, 4),
		},
		"vLLM's past states: the newest is the state now": {
			page: `vllm:lora_requests_info{max_lora="2",running_lora_adapters="a",waiting_lora_adapters=""} 1.700000003e9
vllm:lora_requests_info{max_lora="2",running_lora_adapters="b",waiting_lora_adapters="a"} 1.700000009e9
vllm:lora_requests_info{max_lora="2",running_lora_adapters="c",waiting_lora_adapters=""} 1.700000001e9
vllm:lora_requests_info{max_lora="2",running_lora_adapters="d",waiting_lora_adapters=""} NaN
`,
			want: health.NewLoRAState([]string{"b"}, []string{"a"}, 2),
		},
		"empty names are skipped": {
			page: `vllm:lora_requests_info{max_lora="2",running_lora_adapters=",a,,",waiting_lora_adapters=""} 1` + "\n",
			want: health.NewLoRAState([]string{"a"}, nil, 2),
		},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			got, err := ParseLoRAInfo(loraFamily(t, tc.page))
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, got, cmpopts.EquateEmpty(), cmp.AllowUnexported(health.LoRAState{})); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

// A pod's report is its own to write: one over a bound, or one that makes
// no sense, is refused whole.
func TestParseLoRAInfoRefusesHostileReports(t *testing.T) {
	many := strings.Repeat("x,", MaxLoRANames) + "y"
	cases := map[string]struct{ page, err string }{
		"too many running adapters": {`vllm:lora_requests_info{max_lora="2",running_lora_adapters="` + many + `"} 1`, "more than 256 adapters"},
		"too many waiting adapters": {`vllm:lora_requests_info{max_lora="2",waiting_lora_adapters="` + many + `"} 1`, "more than 256 adapters"},
		"a name too long":           {`vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,` + strings.Repeat("n", MaxLoRANameBytes+1) + `"} 1`, "more than 256 bytes"},
		"no slots":                  {`vllm:lora_requests_info{max_lora="0"} 1`, "max_lora 0 is not between"},
		"negative slots":            {`vllm:lora_requests_info{max_lora="-3"} 1`, "max_lora -3 is not between"},
		"too many slots":            {`vllm:lora_requests_info{max_lora="1000000"} 1`, "max_lora 1000000 is not between"},
		"slots not a number":        {`vllm:lora_requests_info{max_lora="two"} 1`, "invalid syntax"},
		"no max_lora":               {`vllm:lora_requests_info{running_lora_adapters="a"} 1`, "no max_lora"},
		"no finite value":           {`vllm:lora_requests_info{max_lora="2"} +Inf`, "no series with a finite value"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			got, err := ParseLoRAInfo(loraFamily(t, tc.page+"\n"))
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("ParseLoRAInfo = %+v, %v; want an error containing %q", got, err, tc.err)
			}
		})
	}
}

// The observer keeps the LoRA state of a page that has one, and none of a
// page whose report is refused.
func TestObserverKeepsLoRAState(t *testing.T) {
	c := catalogue.Builtin()
	o := NewObserver(c, time.Minute)
	pod := types.NamespacedName{Namespace: "ns", Name: "a"}
	target := scrape.Target{Key: pod}
	v := c.NewValues()
	page := func(lines string) map[string]*dto.MetricFamily {
		return map[string]*dto.MetricFamily{LoRAInfo: loraFamily(t, lines)}
	}
	o.ObservePage(target, time.Now(), v, page(`vllm:lora_requests_info{max_lora="2",running_lora_adapters="a"} 1`+"\n"))
	s, ok := o.Latest(pod)
	if !ok || s.LoRA == nil || !s.LoRA.Active("a") || s.LoRA.MaxLoRAs != 2 {
		t.Fatalf("Latest = %+v, %v; want adapter a active of 2 slots", s.LoRA, ok)
	}
	o.ObservePage(target, time.Now(), v, page(`vllm:lora_requests_info{max_lora="0",running_lora_adapters="a"} 1`+"\n"))
	if s, _ := o.Latest(pod); s.LoRA != nil {
		t.Errorf("a refused report left LoRA state %+v", s.LoRA)
	}
	o.ObservePage(target, time.Now(), v, nil)
	if s, _ := o.Latest(pod); s.LoRA != nil {
		t.Errorf("a page without the family left LoRA state %+v", s.LoRA)
	}
}

func FuzzParseLoRAInfo(f *testing.F) {
	f.Add("a,b", "c", "2")
	f.Add("", "", "1")
	f.Add(",,,", "x,,y", "65536")
	f.Fuzz(func(t *testing.T, running, waiting, slots string) {
		name := func(s string) *string { return &s }
		v := 1.0
		fam := &dto.MetricFamily{Name: name(LoRAInfo), Metric: []*dto.Metric{{Untyped: &dto.Untyped{Value: &v}, Label: []*dto.LabelPair{
			{Name: name("running_lora_adapters"), Value: &running}, {Name: name("waiting_lora_adapters"), Value: &waiting}, {Name: name("max_lora"), Value: &slots}}}}}
		s, err := ParseLoRAInfo(fam)
		if err != nil {
			return
		}
		if s.MaxLoRAs < 1 || s.MaxLoRAs > MaxLoRASlots || len(s.Running) > MaxLoRANames || len(s.Waiting) > MaxLoRANames {
			t.Fatalf("out of bounds: %+v", s)
		}
		for _, n := range append(append([]string{}, s.Running...), s.Waiting...) {
			if n == "" || len(n) > MaxLoRANameBytes || strings.Contains(n, ",") {
				t.Fatalf("bad name %q", n)
			}
		}
	})
}
