package exposition

import (
	"bytes"
	"os"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestFormatOf(t *testing.T) {
	cases := map[string]struct {
		contentType string
		want        Format
		errMatch    string
	}{
		"no content type":         {"", Text, ""},
		"text 0.0.4":              {"text/plain; version=0.0.4; charset=utf-8", Text, ""},
		"text with escaping":      {"text/plain; version=0.0.4; charset=utf-8; escaping=underscores", Text, ""},
		"openmetrics 1.0.0":       {"application/openmetrics-text; version=1.0.0; charset=utf-8", OpenMetrics, ""},
		"openmetrics 0.0.1":       {"application/openmetrics-text; version=0.0.1", OpenMetrics, ""},
		"openmetrics 2.0":         {"application/openmetrics-text; version=2.0.0", "", "unsupported OpenMetrics version"},
		"an html error page":      {"text/html; charset=utf-8", "", `unsupported Content-Type "text/html"`},
		"protobuf":                {"application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited", "", "unsupported Content-Type"},
		"unreadable content type": {"text/plain; version", "", "unreadable Content-Type"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			got, err := FormatOf(tc.contentType)
			if tc.errMatch != "" {
				if err == nil || !strings.Contains(err.Error(), tc.errMatch) {
					t.Fatalf("FormatOf(%q) = %q, %v; want an error containing %q", tc.contentType, got, err, tc.errMatch)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("FormatOf(%q) = %q, %v; want %q", tc.contentType, got, err, tc.want)
			}
		})
	}
}

func TestOpenMetricsReducedToText(t *testing.T) {
	page := `# HELP x_seconds A histogram.
# TYPE x_seconds histogram
# UNIT x_seconds seconds
x_seconds_bucket{le="0.1",path="/a b # {c}"} 1 # {trace_id="abc"} 0.05 1.7e9
x_seconds_bucket{le="+Inf",path="/a b # {c}"} 2
x_seconds_count{path="/a b # {c}"} 2
x_seconds_sum{path="/a b # {c}"} 0.5
x_seconds_created{path="/a b # {c}"} 1.7e9
# TYPE build info
build_info{version="1"} 1
# TYPE state stateset
state{state="a"} 1
# TYPE mystery unknown
mystery 3 1700000000.5
# TYPE requests counter
requests_total{code="200",note="say \"hi\" # {x}"} 10 1700000000.125 # {id="1"} 1
# EOF
`
	want := `# HELP x_seconds A histogram.
# TYPE x_seconds histogram
# UNIT x_seconds seconds
x_seconds_bucket{le="0.1",path="/a b # {c}"} 1
x_seconds_bucket{le="+Inf",path="/a b # {c}"} 2
x_seconds_count{path="/a b # {c}"} 2
x_seconds_sum{path="/a b # {c}"} 0.5
x_seconds_created{path="/a b # {c}"} 1.7e9
build_info{version="1"} 1
state{state="a"} 1
mystery 3
# TYPE requests counter
requests_total{code="200",note="say \"hi\" # {x}"} 10
`
	var out bytes.Buffer
	if err := reduce([]byte(page), true, nil, &out); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, out.String()); diff != "" {
		t.Errorf("reduced page (-want +got):\n%s", diff)
	}
	var p Parser
	families, err := p.Parse(OpenMetrics, []byte(page), nil)
	if err != nil {
		t.Fatalf("parsing the reduced page: %v", err)
	}
	if got := families["requests_total"].GetMetric()[0].GetUntyped().GetValue(); got != 10 {
		t.Errorf("requests_total = %v, want 10", got)
	}
	if got := families["x_seconds"].GetMetric()[0].GetHistogram().GetSampleCount(); got != 2 {
		t.Errorf("x_seconds count = %v, want 2", got)
	}
}

func TestOpenMetricsWithoutEOFIsRejected(t *testing.T) {
	var p Parser
	_, err := p.Parse(OpenMetrics, []byte("# TYPE a gauge\na 1\n"), nil)
	if err == nil || !strings.Contains(err.Error(), "# EOF") {
		t.Fatalf("a truncated OpenMetrics page parsed (err %v)", err)
	}
}

func TestNothingAfterEOFIsRead(t *testing.T) {
	var p Parser
	families, err := p.Parse(OpenMetrics, []byte("# TYPE a gauge\na 1\n# EOF\n<html>garbage\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(families) != 1 || families["a"] == nil {
		t.Errorf("families = %v, want only a", families)
	}
}

func TestGarbageIsAnError(t *testing.T) {
	garbage := "<html><body>502 Bad Gateway</body></html>\nvllm:num_requests_waiting{model_name=\"x\" 3 \x00\n# TYPE broken histogram\n{}}}\n"
	var p Parser
	for _, f := range []Format{Text, OpenMetrics} {
		if _, err := p.Parse(f, []byte(garbage), nil); err == nil {
			t.Errorf("%s: garbage parsed without an error", f)
		}
	}
}

func TestEnginePagesParse(t *testing.T) {
	files, err := os.ReadDir("../catalogue/testdata")
	if err != nil {
		t.Fatal(err)
	}
	var p Parser
	for _, f := range files {
		page, err := os.ReadFile("../catalogue/testdata/" + f.Name())
		if err != nil {
			t.Fatal(err)
		}
		format := Text
		if strings.HasSuffix(f.Name(), ".openmetrics") {
			format = OpenMetrics
		}
		families, err := p.Parse(format, page, nil)
		if err != nil {
			t.Errorf("%s: %v", f.Name(), err)
		} else if len(families) == 0 {
			t.Errorf("%s: no metric families", f.Name())
		}
	}
}

// FuzzParse feeds arbitrary pages to both formats. Parsing must never panic,
// and reducing OpenMetrics is idempotent: a reduced page, with its # EOF put
// back, reduces to itself.
func FuzzParse(f *testing.F) {
	files, _ := os.ReadDir("../catalogue/testdata")
	for _, e := range files {
		page, err := os.ReadFile("../catalogue/testdata/" + e.Name())
		if err == nil {
			f.Add(page)
		}
	}
	f.Add([]byte("a{b=\"c # {d}\"} 1 # {e=\"f\"} 2 3\n# EOF\n"))
	f.Add([]byte("a{b=\"\\\"\"} 1\n# EOF"))
	filter := &Filter{Samples: map[string]bool{"vllm:num_requests_waiting": true, "a": true},
		Histograms: map[string]bool{"vllm:time_to_first_token_seconds": true}}
	f.Fuzz(func(t *testing.T, page []byte) {
		var p Parser
		for _, format := range []Format{Text, OpenMetrics} {
			_, _ = p.Parse(format, page, nil)
			_, _ = p.Parse(format, page, filter)
		}
		var once, twice bytes.Buffer
		if reduce(page, true, nil, &once) != nil {
			return
		}
		again := append(bytes.Clone(once.Bytes()), eofLine...)
		if err := reduce(again, true, nil, &twice); err != nil {
			t.Fatalf("a reduced page did not reduce again: %v", err)
		}
		if !bytes.Equal(once.Bytes(), twice.Bytes()) {
			t.Fatalf("reducing is not idempotent:\n%q\n%q", once.Bytes(), twice.Bytes())
		}
	})
}

func TestFilterKeepsOnlyWhatIsRead(t *testing.T) {
	page := `# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 3
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{model_name="m"} 9
# TYPE vllm:ttft histogram
vllm:ttft_bucket{le="0.1"} 1
vllm:ttft_bucket{le="+Inf"} 2
vllm:ttft_sum 0.3
vllm:ttft_count 2
# TYPE vllm:e2e histogram
vllm:e2e_bucket{le="+Inf"} 2
vllm:e2e_sum 4
vllm:e2e_count 2
# TYPE tgi_request_input_length histogram
tgi_request_input_length_bucket{le="+Inf"} 5
tgi_request_input_length_sum 640
tgi_request_input_length_count 5
`
	filter := &Filter{
		Samples:    map[string]bool{"vllm:num_requests_waiting": true, "tgi_request_input_length_sum": true},
		Histograms: map[string]bool{"vllm:ttft": true},
	}
	for _, format := range []Format{Text, OpenMetrics} {
		in := page
		if format == OpenMetrics {
			in += "# EOF\n"
		}
		var p Parser
		families, err := p.Parse(format, []byte(in), filter)
		if err != nil {
			t.Fatalf("%s: %v", format, err)
		}
		got := map[string]string{}
		for name, f := range families {
			got[name] = f.GetType().String()
		}
		want := map[string]string{
			"vllm:num_requests_waiting":    "UNTYPED",
			"vllm:ttft":                    "HISTOGRAM",
			"tgi_request_input_length_sum": "UNTYPED",
		}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("%s: families (-want +got):\n%s", format, diff)
		}
		if h := families["vllm:ttft"].GetMetric()[0].GetHistogram(); h.GetSampleCount() != 2 || len(h.Bucket) != 2 {
			t.Errorf("%s: the kept histogram lost lines: %v", format, h)
		}
	}
}

func BenchmarkParse(b *testing.B) {
	page, err := os.ReadFile("../catalogue/testdata/vllm-v1.prom")
	if err != nil {
		b.Fatal(err)
	}
	filters := map[string]*Filter{
		"everything": nil,
		"gauges and counters only": {Samples: map[string]bool{"vllm:num_requests_waiting": true,
			"vllm:num_requests_running": true, "vllm:kv_cache_usage_perc": true, "vllm:prompt_tokens_total": true}},
	}
	for name, f := range filters {
		b.Run(name, func(b *testing.B) {
			var p Parser
			b.SetBytes(int64(len(page)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := p.Parse(Text, page, f); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
