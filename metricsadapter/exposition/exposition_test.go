package exposition

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
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
	if err := reduce([]byte(page), true, nil, nil, new(newest), &out); err != nil {
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
	f.Add([]byte("n{x=\"a\"} 2\nn{x=\"b\"} NaN\nn{x=\"c\"} 3 17\nn 0x1p4\n"))
	filter := &Filter{Samples: map[string]bool{"vllm:num_requests_waiting": true, "a": true},
		Histograms: map[string]bool{"vllm:time_to_first_token_seconds": true},
		Newest:     map[string]bool{"n": true, "vllm:lora_requests_info": true}}
	f.Fuzz(func(t *testing.T, page []byte) {
		for _, p := range []*Parser{{}, {Limits: Limits{MaxSeriesPerFamily: 4, MaxBucketsPerHistogram: 8}}} {
			for _, format := range []Format{Text, OpenMetrics} {
				_, _ = p.Parse(format, page, nil)
				families, err := p.Parse(format, page, filter)
				for name := range filter.Newest {
					if n := len(families[name].GetMetric()); err == nil && n > 1 {
						t.Fatalf("%s: %d series of %s, a Newest sample", format, n, name)
					}
				}
			}
		}
		var once, twice bytes.Buffer
		if reduce(page, true, nil, nil, new(newest), &once) != nil {
			return
		}
		again := append(bytes.Clone(once.Bytes()), eofLine...)
		if err := reduce(again, true, nil, nil, new(newest), &twice); err != nil {
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
		for _, limits := range []Limits{{}, {MaxSeriesPerFamily: 4096, MaxBucketsPerHistogram: 200}} {
			if limits != (Limits{}) {
				name += ", with limits"
			}
			b.Run(name, func(b *testing.B) {
				p := Parser{Limits: limits}
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
}

func TestLimits(t *testing.T) {
	lines := func(n int, f func(i int) string) string {
		var b strings.Builder
		for i := range n {
			b.WriteString(f(i))
		}
		return b.String()
	}
	hist := "# TYPE h histogram\n"
	bucket := func(series, le int) string { return fmt.Sprintf("h_bucket{s=\"%d\",le=\"%d\"} 1\n", series, le) }
	limits := Limits{MaxSeriesPerFamily: 10, MaxBucketsPerHistogram: 5}
	cases := map[string]struct {
		page string
		want error // nil: parses
	}{
		"ten series":                     {lines(10, func(i int) string { return fmt.Sprintf("g{i=\"%d\"} 1\n", i) }), nil},
		"eleven series":                  {lines(11, func(i int) string { return fmt.Sprintf("g{i=\"%d\"} 1\n", i) }), ErrTooManySeries},
		"eleven samples of one series":   {lines(11, func(int) string { return "g 1\n" }), ErrTooManySeries},
		"ten series in each of two":      {lines(20, func(i int) string { return fmt.Sprintf("g%d{i=\"%d\"} 1\n", i%2, i) }), nil},
		"ten histograms of five buckets": {hist + lines(50, func(i int) string { return bucket(i/5, i%5) }) + lines(10, func(i int) string { return fmt.Sprintf("h_sum{s=\"%d\"} 1\nh_count{s=\"%d\"} 1\n", i, i) }), nil},
		"eleven histograms":              {hist + lines(11, func(i int) string { return bucket(i, 0) }), ErrTooManySeries},
		"eleven histograms by their sum": {hist + lines(11, func(i int) string { return fmt.Sprintf("h_sum{s=\"%d\"} 1\n", i) }), ErrTooManySeries},
		"six buckets":                    {hist + lines(6, func(i int) string { return bucket(0, i) }) + "h_sum{s=\"0\"} 1\nh_count{s=\"0\"} 1\n", ErrTooManyBuckets},
		"six buckets interleaved":        {hist + lines(12, func(i int) string { return bucket(i%2, i/2) }), ErrTooManyBuckets},
		"labels in another order":        {hist + lines(6, func(i int) string { return fmt.Sprintf("h_bucket{le=\"%d\",s=\"0\"} 1\n", i) }), ErrTooManyBuckets},
		"a le in a value":                {hist + lines(6, func(i int) string { return fmt.Sprintf("h_bucket{s=\"le=\\\"x\\\",\",le=\"%d\"} 1\n", i) }), ErrTooManyBuckets},
		"a histogram's sum repeated":     {hist + lines(20, func(int) string { return "h_sum 1\n" }), nil}, // expfmt keeps the last
		"buckets of a gauge":             {"# TYPE h gauge\n" + lines(11, func(int) string { return "h_bucket{le=\"1\"} 1\n" }), ErrTooManySeries},
		"six quantiles":                  {"# TYPE q summary\n" + lines(6, func(i int) string { return fmt.Sprintf("q{quantile=\"0.%d\"} 1\n", i) }), ErrTooManyBuckets},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			for _, format := range []Format{Text, OpenMetrics} {
				page := tc.page
				if format == OpenMetrics {
					page += "# EOF\n"
				}
				p := Parser{Limits: limits}
				// Twice: the counts start afresh on each page.
				for range 2 {
					_, err := p.Parse(format, []byte(page), nil)
					if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
						t.Fatalf("%s: err = %v, want %v", format, err, tc.want)
					}
				}
				var unlimited Parser
				if _, err := unlimited.Parse(format, []byte(page), nil); err != nil && !strings.Contains(name, "quantiles") {
					t.Errorf("%s: without limits: %v", format, err)
				}
			}
		})
	}
}

// Only what the filter keeps is counted.
func TestLimitsCountWhatTheFilterKeeps(t *testing.T) {
	var b strings.Builder
	b.WriteString("# TYPE vllm:ttft histogram\n")
	for i := range 1000 {
		fmt.Fprintf(&b, "other{i=\"%d\"} 1\nvllm:ttft_bucket{other=\"%d\"} 1\n", i, i)
	}
	b.WriteString("vllm:num_requests_waiting 3\n")
	filter := &Filter{Samples: map[string]bool{"vllm:num_requests_waiting": true}, Histograms: map[string]bool{"vllm:ttft": true}}
	p := Parser{Limits: Limits{MaxSeriesPerFamily: 10, MaxBucketsPerHistogram: 5}}
	scalars := &Filter{Samples: filter.Samples}
	if _, err := p.Parse(Text, []byte(b.String()), scalars); err != nil {
		t.Errorf("without the histogram: %v", err)
	}
	if _, err := p.Parse(Text, []byte(b.String()), filter); !errors.Is(err, ErrTooManySeries) {
		t.Errorf("with the histogram: %v, want %v", err, ErrTooManySeries)
	}
}

// A parser keeps no buffer grown for an unusually large page.
func TestParserDropsLargeBuffers(t *testing.T) {
	page := strings.Repeat("# padding\n", 100_000) + "a 1\n# EOF\n" // 1 MB
	var p Parser
	if _, err := p.Parse(OpenMetrics, []byte(page), nil); err != nil {
		t.Fatal(err)
	}
	if c := p.buf.Cap(); c > keepBytes {
		t.Errorf("after a %d-byte page the parser keeps a %d-byte buffer, want at most %d", len(page), c, keepBytes)
	}
	if _, err := p.Parse(OpenMetrics, []byte("a 1\n# EOF\n"), nil); err != nil {
		t.Errorf("parsing again: %v", err)
	}
}

// Of a Newest sample only the line with the largest finite value is parsed,
// so a family of which an engine keeps every state it ever reported parses
// in memory that does not grow with its series, and counts as one series.
func TestNewestKeepsOneLine(t *testing.T) {
	filter := &Filter{Samples: map[string]bool{"g": true}, Newest: map[string]bool{"info": true}}
	p := Parser{Limits: Limits{MaxSeriesPerFamily: 2}}
	cases := map[string]struct {
		format Format
		page   string
		want   string // the label of the info series parsed, "" for none
	}{
		"the largest value":              {Text, "# TYPE info gauge\ninfo{s=\"a\"} 3\ng 1\ninfo{s=\"b\"} 9\ninfo{s=\"c\"} 5\n", "b"},
		"the first of equals":            {Text, "info{s=\"a\"} 9\ninfo{s=\"b\"} 9\n", "a"},
		"not a value that is not finite": {Text, "info{s=\"a\"} 1\ninfo{s=\"b\"} NaN\ninfo{s=\"c\"} +Inf\n", "a"},
		"none finite":                    {Text, "info{s=\"a\"} NaN\ng 1\n", ""},
		"not the timestamp":              {Text, "info{s=\"a\"} 2 9000\ninfo{s=\"b\"} 3 1000\n", "b"},
		"labels with spaces and braces":  {Text, "info{s=\"a 99\"} 2\ninfo{s=\"} 98\"} 1\n", "a 99"},
		"OpenMetrics":                    {OpenMetrics, "# TYPE info gauge\ninfo{s=\"a\"} 2 1.7e9\ninfo{s=\"b\"} 3 1.6e9 # {t=\"x\"} 1\n# EOF\n", "b"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			families, err := p.Parse(tc.format, []byte(tc.page), filter)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, m := range families["info"].GetMetric() {
				got = append(got, m.GetLabel()[0].GetValue())
			}
			if want := []string{tc.want}; tc.want != "" && !slices.Equal(got, want) || tc.want == "" && got != nil {
				t.Errorf("info series %q, want %q", got, tc.want)
			}
		})
	}
	// A value that does not parse is left for expfmt to refuse.
	if _, err := p.Parse(Text, []byte("info{s=\"a\"} 1\ninfo{s=\"b\"} one\n"), filter); err == nil {
		t.Error("a page with an unparseable value parsed")
	}
	if _, err := p.Parse(Text, []byte("info{s=\"a\"} 1\ninfo{s=\"b\"} 0x1p4\n"), filter); err == nil {
		t.Error("a page with a hexadecimal value parsed")
	}
}

func infoPage(series int) []byte {
	var b bytes.Buffer
	b.WriteString("# TYPE vllm:lora_requests_info gauge\n")
	for i := range series {
		fmt.Fprintf(&b, "vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"a%d\",waiting_lora_adapters=\"\"} %d\n", i, 1_700_000_000+i)
	}
	b.WriteString("vllm:num_requests_waiting 2\n")
	return b.Bytes()
}

func TestNewestOfTwentyThousandSeries(t *testing.T) {
	filter := &Filter{Samples: map[string]bool{"vllm:num_requests_waiting": true}, Newest: map[string]bool{"vllm:lora_requests_info": true}}
	p := Parser{Limits: Limits{MaxSeriesPerFamily: 4096, MaxBucketsPerHistogram: 200}}
	large := infoPage(20_000)
	families, err := p.Parse(Text, large, filter)
	if err != nil {
		t.Fatal(err)
	}
	ms := families["vllm:lora_requests_info"].GetMetric()
	if len(ms) != 1 || ms[0].GetLabel()[1].GetValue() != "a19999" {
		t.Fatalf("parsed %v; want the newest series alone, running a19999", ms)
	}
	// What parsing allocates does not grow with the family's series: the
	// 2 MB page costs what a page over keepBytes costs (shrink), a few
	// KiB, where parsing every series would cost several MiB.
	allocated := func(page []byte) uint64 {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		for range 10 {
			if _, err := p.Parse(Text, page, filter); err != nil {
				t.Fatal(err)
			}
		}
		runtime.ReadMemStats(&after)
		return (after.TotalAlloc - before.TotalAlloc) / 10
	}
	if got := allocated(large); got > 64<<10 {
		t.Errorf("parsing 20,000 series allocates %d bytes", got)
	}
	if p.newest.lines[:cap(p.newest.lines)][0].line != nil {
		t.Error("the parser keeps a line of the last page")
	}
}
