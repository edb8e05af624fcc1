package scrape

import (
	"math"
	"os"
	"testing"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/exposition"
	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

// FuzzRead drives the whole parse path a scraped page takes, in both formats
// and for every engine's mapping: it must never panic, and whatever it
// accepts must be usable: finite gauges and rates, and histograms with
// ascending bounds ending at +Inf and counts that never fall.
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
	c := catalogue.Builtin()
	f.Fuzz(func(t *testing.T, page []byte) {
		w := &worker{values: c.NewValues()}
		for _, format := range []exposition.Format{exposition.Text, exposition.OpenMetrics} {
			for _, engine := range modelserver.Engines {
				if r, _ := w.read(c, engine, format, page); r != Success {
					continue
				}
				for id, m := range c.Metrics() {
					if !w.values.Has[id] {
						continue
					}
					if m.Kind != catalogue.Histogram {
						if x := w.values.Scalar[id]; math.IsNaN(x) || math.IsInf(x, 0) {
							t.Fatalf("%s %s: %s = %v", format, engine, m.Name, x)
						}
						continue
					}
					h := w.values.Hist[id]
					if len(h.Bounds) == 0 || len(h.Bounds) != len(h.Counts) || !math.IsInf(h.Bounds[len(h.Bounds)-1], 1) {
						t.Fatalf("%s %s: %s has bounds %v counts %v", format, engine, m.Name, h.Bounds, h.Counts)
					}
					for i := 1; i < len(h.Bounds); i++ {
						if h.Bounds[i] <= h.Bounds[i-1] || h.Counts[i] < h.Counts[i-1] {
							t.Fatalf("%s %s: %s has bounds %v counts %v", format, engine, m.Name, h.Bounds, h.Counts)
						}
					}
				}
			}
		}
	})
}
