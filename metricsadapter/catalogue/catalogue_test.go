package catalogue_test

import (
	"math"
	"os"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/exposition"
	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

// hist summarises an extracted histogram for comparison.
type hist struct {
	Bounds []float64
	Counts []float64
	Count  float64
	Sum    float64
}

var inf = math.Inf(1)

// extract parses a testdata page and returns every metric the engine's
// mapping found on it, by catalogue name.
func extract(t *testing.T, c *catalogue.Catalogue, engine modelserver.Engine, file string) (map[string]float64, map[string]hist) {
	t.Helper()
	page, err := os.ReadFile("testdata/" + file)
	if err != nil {
		t.Fatal(err)
	}
	format := exposition.Text
	if strings.HasSuffix(file, ".openmetrics") {
		format = exposition.OpenMetrics
	}
	var p exposition.Parser
	families, err := p.Parse(format, page, nil)
	if err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	v := c.NewValues()
	c.Extract(engine, families, v)
	scalars, hists := map[string]float64{}, map[string]hist{}
	for id, m := range c.Metrics() {
		if !v.Has[id] {
			continue
		}
		if m.Kind == catalogue.Histogram {
			h := v.Hist[id]
			hists[m.Name] = hist{Bounds: h.Bounds, Counts: h.Counts, Count: h.Count, Sum: h.Sum}
		} else {
			scalars[m.Name] = v.Scalar[id]
		}
	}
	return scalars, hists
}

func TestBuiltinMappingsReadEachEnginesRealPages(t *testing.T) {
	ttftV1 := hist{
		Bounds: []float64{0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, inf},
		Counts: []float64{0, 0, 0, 0, 1, 2, 4, 18, 48, 58, 60, 60, 60}, Count: 60, Sum: 9,
	}
	cases := map[string]struct {
		engine  modelserver.Engine
		file    string
		scalars map[string]float64
		hists   map[string]hist // compared in full when Bounds is set, else by count and sum
	}{
		"vLLM v1 text, two data-parallel engine cores": {
			engine: modelserver.VLLM, file: "vllm-v1.prom",
			scalars: map[string]float64{
				"requests_running": 7, "requests_waiting": 7, "kv_cache_usage": 0.5,
				"prompt_tokens_per_second": 1500, "generation_tokens_per_second": 12000, "requests_completed_per_second": 60,
				"vllm_num_requests_running": 7, "vllm_num_requests_waiting": 7, "vllm_kv_cache_usage_perc": 0.5,
			},
			hists: map[string]hist{
				"time_to_first_token_seconds": ttftV1,
				"e2e_request_latency_seconds": {Bounds: []float64{0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, inf},
					Counts: []float64{0, 0, 0, 2, 30, 48, 58, 60, 60}, Count: 60, Sum: 114},
			},
		},
		"vLLM v1 OpenMetrics with exemplars, timestamps and an info metric": {
			engine: modelserver.VLLM, file: "vllm-v1.openmetrics",
			scalars: map[string]float64{
				"requests_running": 3, "requests_waiting": 7, "kv_cache_usage": 0.5,
				"prompt_tokens_per_second": 1500, "generation_tokens_per_second": 12000, "requests_completed_per_second": 60,
				"vllm_num_requests_running": 3, "vllm_num_requests_waiting": 7, "vllm_kv_cache_usage_perc": 0.5,
			},
			hists: map[string]hist{
				"time_to_first_token_seconds": {Bounds: []float64{0.04, 0.06, 0.08, 0.1, 0.25, 0.5, inf},
					Counts: []float64{1, 2, 4, 18, 48, 58, 60}, Count: 60, Sum: 9},
				"e2e_request_latency_seconds": {Count: 60, Sum: 114},
			},
		},
		"vLLM V0 names: gpu_cache_usage_perc, time_per_output_token_seconds": {
			engine: modelserver.VLLM, file: "vllm-v0.prom",
			scalars: map[string]float64{
				"requests_running": 6, "requests_waiting": 9, "kv_cache_usage": 0.875,
				"prompt_tokens_per_second": 25000, "generation_tokens_per_second": 110000,
				"vllm_num_requests_running": 6, "vllm_num_requests_waiting": 9, "vllm_num_requests_swapped": 1,
				"vllm_gpu_cache_usage_perc": 0.875,
			},
			hists: map[string]hist{"inter_token_latency_seconds": {Count: 110000, Sum: 3300}},
		},
		"SGLang": {
			engine: modelserver.SGLang, file: "sglang.prom",
			scalars: map[string]float64{
				"requests_running": 12, "requests_waiting": 2826, "kv_cache_usage": 0.28,
				"prompt_tokens_per_second": 8128902, "generation_tokens_per_second": 7557572, "requests_completed_per_second": 83,
				"sglang_num_running_reqs": 12, "sglang_num_queue_reqs": 2826, "sglang_token_usage": 0.28,
				"sglang_cache_hit_rate": 0.007507552643049313, "sglang_num_used_tokens": 123859, "sglang_gen_throughput": 86.50814177726902,
			},
			hists: map[string]hist{
				"time_to_first_token_seconds": {Count: 83, Sum: 21},
				"e2e_request_latency_seconds": {Count: 83, Sum: 250},
				"inter_token_latency_seconds": {Count: 1600, Sum: 30},
			},
		},
		"TGI: token rates from request-size histograms, no KV-cache usage": {
			engine: modelserver.TGI, file: "tgi.prom",
			scalars: map[string]float64{
				"requests_running": 16, "requests_waiting": 4,
				"prompt_tokens_per_second": 40960, "generation_tokens_per_second": 25600, "requests_completed_per_second": 128,
				"tgi_queue_size": 4, "tgi_batch_current_size": 16, "tgi_batch_current_max_tokens": 18432,
			},
			hists: map[string]hist{
				"e2e_request_latency_seconds": {Bounds: []float64{0.5, 1, 2, 4, inf}, Counts: []float64{0, 28, 100, 128, 128}, Count: 128, Sum: 205.5},
				"queue_time_seconds":          {Count: 128, Sum: 4.2},
				"inter_token_latency_seconds": {Count: 128, Sum: 2.1},
			},
		},
		"Triton TensorRT-LLM before the waiting request type: waiting = active - scheduled, usage = used / max": {
			engine: modelserver.Triton, file: "triton-trtllm.prom",
			scalars: map[string]float64{
				"requests_running": 6, "requests_waiting": 4, "kv_cache_usage": 0.25,
				"prompt_tokens_per_second": 9856, "generation_tokens_per_second": 4928,
				// The ensemble and tensorrt_llm both count each request.
				"requests_completed_per_second":      77,
				"nv_inference_pending_request_count": 3,
				"nv_trt_llm_requests_active":         10, "nv_trt_llm_requests_scheduled": 6, "nv_trt_llm_requests_context": 1, "nv_trt_llm_requests_max": 512,
				"nv_trt_llm_kv_cache_blocks_used": 1024, "nv_trt_llm_kv_cache_blocks_free": 3072, "nv_trt_llm_kv_cache_blocks_max": 4096,
			},
			hists: map[string]hist{
				// Milliseconds scaled to seconds.
				"time_to_first_token_seconds": {Bounds: []float64{0.01, 0.1, 0.25, inf}, Counts: []float64{0, 40, 77, 77}, Count: 77, Sum: 8.47},
			},
		},
		"Triton TensorRT-LLM with the waiting type and the fraction block type": {
			engine: modelserver.Triton, file: "triton-trtllm-waiting.prom",
			scalars: map[string]float64{
				"requests_running": 6, "requests_waiting": 2, "kv_cache_usage": 0.3,
				"nv_trt_llm_requests_active": 10, "nv_trt_llm_requests_waiting": 2, "nv_trt_llm_requests_scheduled": 6,
				"nv_trt_llm_requests_context": 1, "nv_trt_llm_requests_max": 512,
				"nv_trt_llm_kv_cache_blocks_used": 1024, "nv_trt_llm_kv_cache_blocks_max": 4096, "nv_trt_llm_kv_cache_blocks_fraction": 0.3,
			},
			hists: map[string]hist{},
		},
	}
	c := catalogue.Builtin()
	approx := cmpopts.EquateApprox(1e-12, 1e-9)
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			scalars, hists := extract(t, c, tc.engine, tc.file)
			if diff := cmp.Diff(tc.scalars, scalars, approx); diff != "" {
				t.Errorf("gauges and counters (-want +got):\n%s", diff)
			}
			for name, h := range hists {
				if tc.hists[name].Bounds == nil {
					hists[name] = hist{Count: h.Count, Sum: h.Sum}
				}
			}
			if diff := cmp.Diff(tc.hists, hists, approx); diff != "" {
				t.Errorf("histograms (-want +got):\n%s", diff)
			}
		})
	}
}

// The vLLM page read as another engine yields nothing: mappings are per
// engine, so a mislabelled pod has no values rather than wrong ones.
func TestAnotherEnginesPageYieldsNothing(t *testing.T) {
	scalars, hists := extract(t, catalogue.Builtin(), modelserver.SGLang, "vllm-v1.prom")
	if len(scalars)+len(hists) != 0 {
		t.Errorf("an SGLang mapping read a vLLM page: %v %v", scalars, hists)
	}
}

func TestServedNames(t *testing.T) {
	c := catalogue.Builtin()
	for _, name := range []string{
		"requests_running", "requests_waiting", "kv_cache_usage", "prompt_tokens_per_second", "generation_tokens_per_second",
		"time_to_first_token_seconds_p50", "time_to_first_token_seconds_p90", "time_to_first_token_seconds_p99",
		"e2e_request_latency_seconds_p50", "e2e_request_latency_seconds_p90", "vllm_num_requests_waiting", "nv_trt_llm_requests_waiting",
	} {
		if _, ok := c.Lookup(name); !ok {
			t.Errorf("%s is not served", name)
		}
	}
	if s, _ := c.Lookup("time_to_first_token_seconds_p90"); s.Quantile != 0.9 || c.Metrics()[s.Metric].Name != "time_to_first_token_seconds" {
		t.Errorf("time_to_first_token_seconds_p90 = %+v", s)
	}
	if _, ok := c.Lookup("time_to_first_token_seconds"); ok {
		t.Error("a histogram's base name is served")
	}
}

func TestOverrideMergesOverTheBuiltins(t *testing.T) {
	override := `
metrics:
- name: requests_waiting
  engines:
    # A newer vLLM renamed the metric; the old name stays as a fallback.
    vllm:
    - series: vllm:num_requests_queued
    - series: vllm:num_requests_waiting
    # Drop TGI's mapping.
    tgi: []
- name: spec_decode_acceptance
  kind: gauge
  unit: ratio
  engines:
    vllm:
    - series: vllm:spec_decode_draft_acceptance_rate
- name: time_to_first_token_seconds
  quantiles: [0.5, 0.95]
raw:
  tgi:
  - series: tgi_batch_next_size_sum
    name: tgi_next_batch_tokens
`
	c, err := catalogue.Load([]byte(override))
	if err != nil {
		t.Fatal(err)
	}
	id, _ := c.ID("requests_waiting")
	if got := c.Engines(id); !cmp.Equal(got, []modelserver.Engine{modelserver.SGLang, modelserver.Triton, modelserver.VLLM}) {
		t.Errorf("requests_waiting engines = %v, want sglang, triton and vllm (tgi removed)", got)
	}
	scalars, _ := extract(t, c, modelserver.VLLM, "vllm-v1.prom")
	if scalars["requests_waiting"] != 7 {
		t.Errorf("requests_waiting from the fallback name = %v, want 7", scalars["requests_waiting"])
	}
	if _, ok := scalars["spec_decode_acceptance"]; ok {
		t.Error("a metric absent from the page has a value")
	}
	for _, name := range []string{"spec_decode_acceptance", "time_to_first_token_seconds_p95", "tgi_next_batch_tokens", "requests_running"} {
		if _, ok := c.Lookup(name); !ok {
			t.Errorf("%s is not served after the override", name)
		}
	}
	if _, ok := c.Lookup("time_to_first_token_seconds_p90"); ok {
		t.Error("the override's quantiles did not replace the built-in ones")
	}
}

func TestInvalidCataloguesAreRejected(t *testing.T) {
	cases := map[string]struct{ yaml, errMatch string }{
		"unknown field":                {"metrics:\n- name: x\n  kind: gauge\n  sourcez: []\n", `unknown field "sourcez"`},
		"bad name":                     {"metrics:\n- name: Requests-Waiting\n  kind: gauge\n  engines: {vllm: [{series: a}]}\n", "override.metrics[0].name"},
		"unknown kind":                 {"metrics:\n- name: x\n  kind: summary\n  engines: {vllm: [{series: a}]}\n", `override.metrics[0].kind: Unsupported value: "summary"`},
		"new metric no kind":           {"metrics:\n- name: x\n  engines: {vllm: [{series: a}]}\n", "catalogue.metrics[13].kind: Required value"},
		"unknown engine":               {"metrics:\n- name: x\n  kind: gauge\n  engines: {llamacpp: [{series: a}]}\n", `override.metrics[0].engines[llamacpp]: Unsupported value: "llamacpp"`},
		"bad series":                   {"metrics:\n- name: x\n  kind: gauge\n  engines: {vllm: [{series: \"a b\"}]}\n", "override.metrics[0].engines[vllm][0].series: Invalid value"},
		"zero scale":                   {"metrics:\n- name: x\n  kind: gauge\n  engines: {vllm: [{series: a, scale: 0}]}\n", "scale: Invalid value: 0"},
		"quantile of one":              {"metrics:\n- name: x\n  kind: histogram\n  quantiles: [1]\n  engines: {vllm: [{series: a}]}\n", "quantiles[0]: Invalid value: 1"},
		"rate minus":                   {"metrics:\n- name: x\n  kind: rate\n  engines: {vllm: [{series: a, minus: {series: b}}]}\n", "minus: Forbidden"},
		"histogram max":                {"metrics:\n- name: x\n  kind: histogram\n  aggregation: max\n  engines: {vllm: [{series: a}]}\n", "aggregation: Invalid value"},
		"average clash":                {"metrics:\n- name: requests_running_avg\n  kind: gauge\n  engines: {vllm: [{series: a}]}\n", "average variant"},
		"raw name clash":               {"raw:\n  vllm:\n  - {series: x, name: time_to_first_token_seconds}\n", "taken by a histogram"},
		"adapters without their label": {"metrics:\n- name: x\n  kind: adapters\n  engines: {vllm: [{series: a}]}\n", "engines[vllm][0].adaptersLabel: Required value"},
		"adapters label invalid":       {"metrics:\n- name: x\n  kind: adapters\n  engines: {vllm: [{series: a, adaptersLabel: \"a-b\"}]}\n", "adaptersLabel: Invalid value"},
		"adapters label on a gauge":    {"metrics:\n- name: x\n  kind: gauge\n  engines: {vllm: [{series: a, adaptersLabel: b}]}\n", "adaptersLabel: Forbidden"},
		"adapters aggregated":          {"metrics:\n- name: x\n  kind: adapters\n  aggregation: sum\n  engines: {vllm: [{series: a, adaptersLabel: b}]}\n", "aggregation: Forbidden"},
		"adapters scaled":              {"metrics:\n- name: x\n  kind: adapters\n  engines: {vllm: [{series: a, adaptersLabel: b, scale: 2}]}\n", "scale: Forbidden"},
		"adapters minus":               {"metrics:\n- name: x\n  kind: adapters\n  engines: {vllm: [{series: a, adaptersLabel: b, minus: {series: c}}]}\n", "minus: Forbidden"},
		"value label invalid":          {"metrics:\n- name: x\n  kind: gauge\n  engines: {vllm: [{series: a, valueLabel: \"a-b\"}]}\n", "valueLabel: Invalid value"},
		"value label on a rate":        {"metrics:\n- name: x\n  kind: rate\n  engines: {vllm: [{series: a, valueLabel: b}]}\n", "valueLabel: Forbidden"},
		"value label aggregated":       {"metrics:\n- name: x\n  kind: gauge\n  engines: {vllm: [{series: a, valueLabel: b, aggregation: max}]}\n", "valueLabel: Forbidden"},
		"value label divided":          {"metrics:\n- name: x\n  kind: gauge\n  engines: {vllm: [{series: a, valueLabel: b, divideBy: {series: c}}]}\n", "valueLabel: Forbidden"},
		"duplicate served":             {"metrics:\n- name: x_p50\n  kind: gauge\n  engines: {vllm: [{series: a}]}\n- name: x\n  kind: histogram\n  quantiles: [0.5]\n  engines: {vllm: [{series: b}]}\n", "two metrics are served as x_p50"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := catalogue.Load([]byte(tc.yaml))
			if err == nil || !strings.Contains(err.Error(), tc.errMatch) {
				t.Fatalf("Load: %v; want an error containing %q", err, tc.errMatch)
			}
		})
	}
}

// docs/metricsadapter.md documents every served name and where it comes
// from; this keeps the two from drifting apart.
func TestDocsListTheCatalogue(t *testing.T) {
	doc, err := os.ReadFile("../../docs/metricsadapter.md")
	if err != nil {
		t.Fatal(err)
	}
	c := catalogue.Builtin()
	for id, m := range c.Metrics() {
		name := "`" + m.Name + "`"
		if m.Kind == catalogue.Histogram {
			name = "`" + m.Name + "_p50`"
		}
		if !strings.Contains(string(doc), name) {
			t.Errorf("docs/metricsadapter.md does not list %s", name)
		}
		for _, e := range c.Engines(id) {
			for _, s := range m.Engines[e] {
				if !strings.Contains(string(doc), "`"+s.Series.Series) {
					t.Errorf("docs/metricsadapter.md does not name %s, the %s source of %s", s.Series.Series, e, m.Name)
				}
			}
		}
	}
}
