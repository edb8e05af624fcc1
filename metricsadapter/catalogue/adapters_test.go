package catalogue_test

import (
	"fmt"
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
// scraper does, with its default limits, and returns the adapters each
// Adapters metric lists, by name; a metric without a value is absent.
func adapters(t *testing.T, page string) map[string][]string {
	t.Helper()
	c, v := extractLoRA(t, page)
	out := map[string][]string{}
	for id, m := range c.Metrics() {
		if m.Kind == catalogue.Adapters && v.Has[id] {
			out[m.Name] = append([]string{}, v.Adapters[id]...)
		}
	}
	return out
}

func extractLoRA(t *testing.T, page string) (*catalogue.Catalogue, *catalogue.Values) {
	t.Helper()
	c := catalogue.Builtin()
	p := exposition.Parser{Limits: exposition.Limits{MaxSeriesPerFamily: 4096, MaxBucketsPerHistogram: 200}}
	families, err := p.Parse(exposition.Text, []byte(page), c.Filter(modelserver.VLLM, nil))
	if err != nil {
		t.Fatal(err)
	}
	v := c.NewValues()
	c.Extract(modelserver.VLLM, families, v)
	return c, v
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

// max_lora is read from the newest series as a number, or not at all.
func TestLoRAMaxAdapters(t *testing.T) {
	cases := map[string]struct {
		page string
		want float64 // -1 for no value
	}{
		"the simulator's page":  {loraInfo(`max_lora="2",running_lora_adapters="a",waiting_lora_adapters=""} 1.7e9`), 2},
		"of the newest series":  {loraInfo(`max_lora="2"} 1`, `max_lora="8"} 3`, `max_lora="4"} 2`), 8},
		"spaces around":         {loraInfo(`max_lora=" 3 "} 1`), 3},
		"a fraction is read":    {loraInfo(`max_lora="2.5"} 1`), 2.5}, // consumers judge what makes sense
		"no max_lora":           {loraInfo(`running_lora_adapters="a"} 1`), -1},
		"the newest lacks it":   {loraInfo(`max_lora="2"} 1`, `running_lora_adapters="a"} 2`), -1},
		"not a number":          {loraInfo(`max_lora="two"} 1`), -1},
		"hexadecimal":           {loraInfo(`max_lora="0x10"} 1`), -1},
		"infinite":              {loraInfo(`max_lora="+Inf"} 1`), -1},
		"not a number, NaN":     {loraInfo(`max_lora="NaN"} 1`), -1},
		"no lora_requests_info": {"vllm:num_requests_waiting 3\n", -1},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			c, v := extractLoRA(t, tc.page)
			id, _ := c.ID(catalogue.LoRAMaxAdapters)
			got := -1.0
			if v.Has[id] {
				got = v.Scalar[id]
			}
			if got != tc.want {
				t.Errorf("lora_max_adapters = %v, want %v", got, tc.want)
			}
		})
	}
}

// vLLM never removes a series of lora_requests_info, so a long-lived pod's
// page may hold more than the scraper's 4096 series per family: only the
// newest is parsed, and the page is read.
func TestTwentyThousandLoRARequestsInfoSeries(t *testing.T) {
	series := make([]string, 20_000)
	for i := range series {
		series[i] = fmt.Sprintf(`max_lora="%d",running_lora_adapters="a%d",waiting_lora_adapters=""} %d`, i%4+1, i, 1_700_000_000+i)
	}
	series[7_000] = `max_lora="16",running_lora_adapters="now",waiting_lora_adapters="then"} 1800000000`
	c, v := extractLoRA(t, loraInfo(series...)+"vllm:num_requests_waiting 3\n")
	want := map[string]any{
		catalogue.LoRAAdapterRunningPods: []string{"now"}, catalogue.LoRAAdapterWaitingPods: []string{"then"},
		catalogue.LoRAMaxAdapters: 16.0, catalogue.RequestsWaiting: 3.0,
	}
	got := map[string]any{}
	for name := range want {
		id, _ := c.ID(name)
		switch {
		case !v.Has[id]:
		case c.Metrics()[id].Kind == catalogue.Adapters:
			got[name] = v.Adapters[id]
		default:
			got[name] = v.Scalar[id]
		}
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

// The family is parsed whole only when something reads it whole.
func TestFilterNewest(t *testing.T) {
	c, err := catalogue.Load([]byte("metrics:\n- name: x\n  kind: gauge\n  engines: {vllm: [{series: vllm:lora_requests_info}]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		c      *catalogue.Catalogue
		newest bool
	}{{catalogue.Builtin(), true}, {c, false}} {
		f := tc.c.Filter(modelserver.VLLM, nil)
		if f.Newest["vllm:lora_requests_info"] != tc.newest || f.Samples["vllm:lora_requests_info"] == tc.newest {
			t.Errorf("filter %+v: want lora_requests_info newest-only %v", f, tc.newest)
		}
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
