package proxy

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/capstan-dev/capstan/router/balance"
)

// BenchmarkForward measures one small non-streamed request through the
// handler over loopback HTTP with keep-alive on both sides: the router's own
// cost per request, plus the Go HTTP stacks on both sides of it.
func BenchmarkForward(b *testing.B) {
	backends := []backend{upstream(b, "a", ok), upstream(b, "b", ok)}
	f := newFixture(b, "llama", backends, func(o *Options) { o.AccessLog = false; o.Selector = balance.LeastRequestsSelection{} })
	tr := &http.Transport{MaxIdleConnsPerHost: 256}
	c := &http.Client{Transport: tr}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			resp, err := c.Post(f.server.URL+"/v1/completions", "application/json", strings.NewReader(completion))
			if err != nil {
				b.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				b.Fatalf("status %d", resp.StatusCode)
			}
		}
	})
}
