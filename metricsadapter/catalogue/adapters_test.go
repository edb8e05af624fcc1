package catalogue_test

import (
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/exposition"
	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

// adapters parses a vLLM page through the catalogue's filter, as the
// scraper does, and returns the adapters each Adapters metric lists, by
// name; a metric without a value is absent.
func adapters(t *testing.T, page string) map[string][]string {
	t.Helper()
	c := catalogue.Builtin()
	var p exposition.Parser
	families, err := p.Parse(exposition.Text, []byte(page), c.Filter(modelserver.VLLM, nil))
	if err != nil {
		t.Fatal(err)
	}
	v := c.NewValues()
	c.Extract(modelserver.VLLM, families, v)
	out := map[string][]string{}
	for id, m := range c.Metrics() {
		if m.Kind == catalogue.Adapters && v.Has[id] {
			out[m.Name] = append([]string{}, v.Adapters[id]...)
		}
	}
	return out
}

// loraInfo is a page with one vllm:lora_requests_info series per line of
// labels, each valued with a time.
func loraInfo(series ...string) string {
	var b strings.Builder
	b.WriteString("# TYPE vllm:lora_requests_info gauge\n")
	for _, s := range series {
		b.WriteString("vllm:lora_requests_info{" + s + "\n")
	}
	return b.String()
}

func TestAdaptersComeFromTheNewestLoRARequestsInfo(t *testing.T) {
	// vLLM keeps a series for every combination of adapters it has seen;
	// the page's newest one is not its last.
	page, err := os.ReadFile("testdata/vllm-lora.prom")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{
		"lora_adapter_running_pods": {"support-bot-v3", "sql-bot"},
		"lora_adapter_waiting_pods": {"support-bot-v3", "summarizer"},
	}
	if diff := cmp.Diff(want, adapters(t, string(page))); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

func TestHostileLoRARequestsInfo(t *testing.T) {
	long := strings.Repeat("x", catalogue.MaxAdapterNameLength)
	many := make([]string, catalogue.MaxAdapters)
	for i := range many {
		many[i] = "a" + strconv.Itoa(i)
	}
	cases := map[string]struct {
		page string
		want map[string][]string
	}{
		"no adapter has requests: a value, of no adapters": {
			loraInfo(`max_lora="1",running_lora_adapters="",waiting_lora_adapters=""} 1.7e9`),
			map[string][]string{"lora_adapter_running_pods": {}, "lora_adapter_waiting_pods": {}},
		},
		"no lora_requests_info (LoRA off)": {"vllm:num_requests_waiting 3\n", map[string][]string{}},
		"empty names, spaces and repeats": {
			loraInfo(`running_lora_adapters=",a,, b ,a,b,",waiting_lora_adapters=" "} 1.7e9`),
			map[string][]string{"lora_adapter_running_pods": {"a", "b"}, "lora_adapter_waiting_pods": {}},
		},
		"names with quotes, braces and non-ASCII are names": {
			loraInfo(`running_lora_adapters="org/bot-v3,\"x\"{},日本",waiting_lora_adapters=""} 1.7e9`),
			map[string][]string{"lora_adapter_running_pods": {"org/bot-v3", `"x"{}`, "日本"}, "lora_adapter_waiting_pods": {}},
		},
		"a label missing leaves that metric without a value": {
			loraInfo(`running_lora_adapters="a"} 1.7e9`),
			map[string][]string{"lora_adapter_running_pods": {"a"}},
		},
		"NaN and infinite values are never the newest": {
			loraInfo(`running_lora_adapters="old",waiting_lora_adapters=""} 1.7e9`,
				`running_lora_adapters="nan",waiting_lora_adapters=""} NaN`,
				`running_lora_adapters="inf",waiting_lora_adapters=""} +Inf`),
			map[string][]string{"lora_adapter_running_pods": {"old"}, "lora_adapter_waiting_pods": {}},
		},
		"equal times: the first series": {
			loraInfo(`running_lora_adapters="first",waiting_lora_adapters=""} 5`,
				`running_lora_adapters="second",waiting_lora_adapters=""} 5`),
			map[string][]string{"lora_adapter_running_pods": {"first"}, "lora_adapter_waiting_pods": {}},
		},
		"the most adapters and the longest name allowed": {
			loraInfo(`running_lora_adapters="` + strings.Join(many, ",") + `",waiting_lora_adapters="` + long + `"} 1.7e9`),
			map[string][]string{"lora_adapter_running_pods": many, "lora_adapter_waiting_pods": {long}},
		},
		"one adapter too many gives no value": {
			loraInfo(`running_lora_adapters="` + strings.Join(many, ",") + `,one-more",waiting_lora_adapters="a"} 1.7e9`),
			map[string][]string{"lora_adapter_waiting_pods": {"a"}},
		},
		"a name too long gives no value": {
			loraInfo(`running_lora_adapters="a,` + long + `x",waiting_lora_adapters="a"} 1.7e9`),
			map[string][]string{"lora_adapter_waiting_pods": {"a"}},
		},
		"a name repeated past the bound gives no value": {
			loraInfo(`running_lora_adapters="` + strings.Repeat("a,", 100000) + `",waiting_lora_adapters="a"} 1.7e9`),
			map[string][]string{"lora_adapter_waiting_pods": {"a"}},
		},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			if diff := cmp.Diff(tc.want, adapters(t, tc.page)); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func TestAdaptersValuesAreReused(t *testing.T) {
	// The scraper reuses one Values per worker: a page's adapters must
	// not carry over to the next page.
	c := catalogue.Builtin()
	v := c.NewValues()
	id, _ := c.ID(catalogue.LoRAAdapterRunningPods)
	var p exposition.Parser
	for _, tc := range []struct {
		page string
		want []string
	}{
		{loraInfo(`running_lora_adapters="a,b,c",waiting_lora_adapters=""} 1`), []string{"a", "b", "c"}},
		{loraInfo(`running_lora_adapters="d",waiting_lora_adapters=""} 1`), []string{"d"}},
	} {
		families, err := p.Parse(exposition.Text, []byte(tc.page), nil)
		if err != nil {
			t.Fatal(err)
		}
		c.Extract(modelserver.VLLM, families, v)
		if !v.Has[id] || !cmp.Equal(v.Adapters[id], tc.want) {
			t.Errorf("after %q: %v %v, want %v", tc.page, v.Has[id], v.Adapters[id], tc.want)
		}
	}
}
