package fleet

import (
	"bufio"
	"bytes"
	"net/http"
	"strconv"
)

// The hostile metrics pages of the endless-metrics, series-flood and
// bucket-flood faults. Each is streamed through a small buffer, so that a
// page of a million lines costs the simulator a few kilobytes, not the page.

const textContentType = "text/plain; version=0.0.4; charset=utf-8"

// endlessChunk is what the endless page repeats: well-formed comment lines,
// so that the page is a valid one for as long as anyone reads it.
var endlessChunk = bytes.Repeat([]byte("# this page never ends; it is all comments and one gauge at the end, which never comes\n"), 1024)

// serveEndless writes a 200 page that never ends, until the client hangs up.
func serveEndless(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", textContentType)
	w.WriteHeader(http.StatusOK)
	w.Write([]byte("# TYPE vllm:num_requests_waiting gauge\n"))
	for r.Context().Err() == nil {
		if _, err := w.Write(endlessChunk); err != nil {
			return
		}
	}
}

// serveSeriesFlood writes a page whose vllm:num_requests_waiting family has
// n series, one per value of a "flood" label.
func serveSeriesFlood(w http.ResponseWriter, model string, n int) {
	w.Header().Set("Content-Type", textContentType)
	w.WriteHeader(http.StatusOK)
	b := bufio.NewWriterSize(w, 32<<10)
	defer b.Flush()
	b.WriteString("# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n# TYPE vllm:num_requests_waiting gauge\n")
	prefix := `vllm:num_requests_waiting{model_name="` + model + `",engine="0",flood="`
	var num [20]byte
	for i := range n {
		b.WriteString(prefix)
		b.Write(strconv.AppendInt(num[:0], int64(i), 10))
		if _, err := b.WriteString("\"} 0\n"); err != nil {
			return // the client hung up
		}
	}
}

// serveBucketFlood writes a page with the engine's waiting gauge and a
// vllm:time_to_first_token_seconds histogram of n buckets (+Inf included).
func serveBucketFlood(w http.ResponseWriter, model string, n int) {
	w.Header().Set("Content-Type", textContentType)
	w.WriteHeader(http.StatusOK)
	b := bufio.NewWriterSize(w, 32<<10)
	defer b.Flush()
	l := `model_name="` + model + `",engine="0"`
	b.WriteString("# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{" + l + "} 0\n")
	b.WriteString("# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.\n# TYPE vllm:time_to_first_token_seconds histogram\n")
	prefix := `vllm:time_to_first_token_seconds_bucket{` + l + `,le="`
	var num [32]byte
	for i := range max(n-1, 0) {
		b.WriteString(prefix)
		b.Write(strconv.AppendFloat(num[:0], float64(i+1)/1000, 'g', -1, 64))
		if _, err := b.WriteString("\"} 0\n"); err != nil {
			return
		}
	}
	b.WriteString(prefix + "+Inf\"} 0\n")
	b.WriteString("vllm:time_to_first_token_seconds_sum{" + l + "} 0\n")
	b.WriteString("vllm:time_to_first_token_seconds_count{" + l + "} 0\n")
}
