package upstream

import (
	"context"
	"io"
	"net/http"
	"testing"
	"time"
)

// BenchmarkRoundTrip measures one small exchange on a kept-alive connection
// over loopback: the pool's cost per request plus the server's.
func BenchmarkRoundTrip(b *testing.B) {
	addr, _ := server(b, time.Minute, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Length", "5")
		io.WriteString(w, "hello")
	})
	p := New(Options{})
	req := &Request{Method: http.MethodPost, Target: "/v1/completions", Host: addr, Body: []byte(`{"model":"m"}`)}
	buf := make([]byte, 32<<10)
	b.ReportAllocs()
	for b.Loop() {
		r, err := p.RoundTrip(context.Background(), req, addr, 5*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		complete := false
		for {
			_, err := r.Body.Read(buf)
			if err == io.EOF {
				complete = true
				break
			}
			if err != nil {
				b.Fatal(err)
			}
		}
		p.Release(r, complete)
	}
}
