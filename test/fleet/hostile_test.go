package fleet

import (
	"bytes"
	"io"
	"net/http"
	"testing"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

func TestFloodFaults(t *testing.T) {
	for _, tc := range []struct {
		fault, size  string
		family       string
		series, bkts int
	}{
		{"series-flood", "5000", "vllm:num_requests_waiting", 5000, 0},
		{"bucket-flood", "3000", "vllm:time_to_first_token_seconds", 1, 3000},
	} {
		pod := testPod(modelserver.VLLM, map[string]string{FaultAnnotation: tc.fault,
			FaultSeriesAnnotation: tc.size, FaultBucketsAnnotation: tc.size})
		_, ts := testServer(t, pod, Options{})
		families := scrape(t, ts.URL)
		f := families[tc.family]
		if f == nil {
			t.Fatalf("%s: no %s", tc.fault, tc.family)
		}
		if len(f.Metric) != tc.series {
			t.Errorf("%s: %d series, want %d", tc.fault, len(f.Metric), tc.series)
		}
		if tc.bkts > 0 {
			if got := len(f.Metric[0].GetHistogram().GetBucket()); got != tc.bkts {
				t.Errorf("%s: %d buckets, want %d", tc.fault, got, tc.bkts)
			}
		}
	}
}

func TestEndlessMetrics(t *testing.T) {
	pod := testPod(modelserver.VLLM, map[string]string{FaultAnnotation: string(FaultEndlessMetrics)})
	_, ts := testServer(t, pod, Options{})
	resp, err := http.Get(ts.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	const n = 64 << 20
	got, err := io.Copy(io.Discard, io.LimitReader(resp.Body, n))
	if err != nil || got != n || resp.StatusCode != http.StatusOK {
		t.Fatalf("read %d bytes (%v), status %d; want %d and 200", got, err, resp.StatusCode, n)
	}
	// What was read is a valid page, as far as it goes.
	resp2, err := http.Get(ts.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp2.Body.Close()
	head := make([]byte, 1<<20)
	if _, err := io.ReadFull(resp2.Body, head); err != nil {
		t.Fatal(err)
	}
	head = head[:bytes.LastIndexByte(head, '\n')+1]
	parser := expfmt.NewTextParser(model.UTF8Validation)
	if _, err := parser.TextToMetricFamilies(bytes.NewReader(head)); err != nil {
		t.Errorf("the endless page does not parse: %v", err)
	}
}
