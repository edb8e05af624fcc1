package scrape

import (
	"bytes"
	"fmt"
	"math"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/exposition"
	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

// FuzzRead drives the whole parse path a scraped page takes, in both formats,
// for every engine's mapping, filtered and not: it must never panic, and
// whatever it accepts must be usable (see checkValues).
func FuzzRead(f *testing.F) {
	files, err := os.ReadDir("../catalogue/testdata")
	if err != nil {
		f.Fatal(err)
	}
	for _, e := range files {
		page, err := os.ReadFile("../catalogue/testdata/" + e.Name())
		if err != nil {
			f.Fatal(err)
		}
		f.Add(page)
	}
	f.Add([]byte("# TYPE vllm:e2e_request_latency_seconds histogram\nvllm:e2e_request_latency_seconds_bucket{le=\"2\"} 5\nvllm:e2e_request_latency_seconds_bucket{le=\"1\"} 9\n"))
	f.Add([]byte("vllm:num_requests_waiting NaN\nvllm:num_requests_running +Inf\n# EOF\n"))
	f.Add([]byte("vllm:lora_requests_info{running_lora_adapters=\" a,,a ,b\",waiting_lora_adapters=\"\\\"\"} 2\nvllm:lora_requests_info{running_lora_adapters=\"c\"} 1\n"))
	c := catalogue.Builtin()
	f.Fuzz(func(t *testing.T, page []byte) {
		// Without limits, and with limits low enough to be reached.
		limited := &worker{values: c.NewValues()}
		limited.parser.Limits = exposition.Limits{MaxSeriesPerFamily: 8, MaxBucketsPerHistogram: 16}
		for _, w := range []*worker{{values: c.NewValues()}, limited} {
			for _, format := range []exposition.Format{exposition.Text, exposition.OpenMetrics} {
				for _, engine := range modelserver.Engines {
					// Unfiltered, and filtered as a scrape does.
					if r, _ := w.read(c, engine, format, page, nil); r == Success {
						checkValues(t, c, w.values, format, engine)
					}
					if r, _ := w.read(c, engine, format, page, c.Filter(engine, nil)); r == Success {
						checkValues(t, c, w.values, format, engine)
					}
				}
			}
		}
	})
}

// checkValues fails unless every extracted value is usable: finite gauges
// and counters, histograms with ascending bounds ending at +Inf and counts
// that never fall, adapter lists within their bounds, without empty,
// untrimmed or repeated names.
func checkValues(t *testing.T, c *catalogue.Catalogue, v *catalogue.Values, format exposition.Format, engine modelserver.Engine) {
	t.Helper()
	for id, m := range c.Metrics() {
		if !v.Has[id] {
			continue
		}
		if m.Kind == catalogue.Adapters {
			names := v.Adapters[id]
			bad := len(names) > catalogue.MaxAdapters
			for i, a := range names {
				bad = bad || a == "" || a != strings.TrimSpace(a) || len(a) > catalogue.MaxAdapterNameLength || slices.Contains(names[:i], a)
			}
			if bad {
				t.Fatalf("%s %s: %s lists %q", format, engine, m.Name, names)
			}
			continue
		}
		if m.Kind != catalogue.Histogram {
			if x := v.Scalar[id]; math.IsNaN(x) || math.IsInf(x, 0) {
				t.Fatalf("%s %s: %s = %v", format, engine, m.Name, x)
			}
			continue
		}
		h := v.Hist[id]
		bad := len(h.Bounds) == 0 || len(h.Bounds) != len(h.Counts) || !math.IsInf(h.Bounds[len(h.Bounds)-1], 1)
		for i := 1; !bad && i < len(h.Bounds); i++ {
			bad = h.Bounds[i] <= h.Bounds[i-1] || h.Counts[i] < h.Counts[i-1]
		}
		if bad {
			t.Fatalf("%s %s: %s has bounds %v counts %v", format, engine, m.Name, h.Bounds, h.Counts)
		}
	}
}

// BenchmarkRead is the CPU cost of one scraped page: parsing and mapping.
func BenchmarkRead(b *testing.B) {
	page, err := os.ReadFile("../catalogue/testdata/vllm-v1.prom")
	if err != nil {
		b.Fatal(err)
	}
	// A long-lived vLLM with LoRA adapters: a lora_requests_info series
	// for each of the 20,000 states it has reported.
	b.Run("with 20,000 lora_requests_info series, what the catalogue reads, with limits", func(b *testing.B) {
		var lora bytes.Buffer
		lora.Write(page)
		for i := range 20_000 {
			fmt.Fprintf(&lora, "vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"a%05d\",waiting_lora_adapters=\"\"} %d\n", i, 1_700_000_000+i)
		}
		c := catalogue.Builtin()
		w := &worker{values: c.NewValues()}
		w.parser.Limits = exposition.Limits{MaxSeriesPerFamily: 4096, MaxBucketsPerHistogram: 200}
		filter := c.Filter(modelserver.VLLM, nil)
		b.SetBytes(int64(lora.Len()))
		b.ReportAllocs()
		for b.Loop() {
			if r, err := w.read(c, modelserver.VLLM, exposition.Text, lora.Bytes(), filter); r != Success {
				b.Fatal(err)
			}
		}
	})
	c := catalogue.Builtin()
	for name, filter := range map[string]*exposition.Filter{
		"whole page":               nil,
		"what the catalogue reads": c.Filter(modelserver.VLLM, nil),
		"without histograms":       c.Filter(modelserver.VLLM, func(m catalogue.Metric) bool { return m.Kind != catalogue.Histogram }),
	} {
		// Without limits, and with those a scraper parses with by default.
		for _, limits := range []exposition.Limits{{}, {MaxSeriesPerFamily: 4096, MaxBucketsPerHistogram: 200}} {
			if limits != (exposition.Limits{}) {
				name += ", with limits"
			}
			b.Run(name, func(b *testing.B) {
				w := &worker{values: c.NewValues()}
				w.parser.Limits = limits
				b.SetBytes(int64(len(page)))
				b.ReportAllocs()
				for b.Loop() {
					if r, err := w.read(c, modelserver.VLLM, exposition.Text, page, filter); r != Success {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
