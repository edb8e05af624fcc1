package upstream

import (
	"context"
	"io"
	"net/http"
	"testing"
	"time"
)

// hello5 answers a small exchange with a body of known length.
func hello5(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Length", "5")
	io.WriteString(w, "hello")
}

// BenchmarkRoundTrip measures one small exchange on a kept-alive connection
// over loopback: the pool's cost per request plus the server's.
func BenchmarkRoundTrip(b *testing.B) {
	addr, _ := server(b, time.Minute, hello5)
	benchRoundTrip(b, HTTP1, addr)
}

// BenchmarkRoundTripH2C is BenchmarkRoundTrip as a stream on a kept HTTP/2
// connection (h2c): net/http's HTTP/2 client and server both run
// goroutines per connection and stream.
func BenchmarkRoundTripH2C(b *testing.B) {
	addr, _ := h2cServer(b, hello5)
	benchRoundTrip(b, H2C, addr)
}

// The Parallel benchmarks run exchanges from GOMAXPROCS goroutines at once:
// HTTP/1.1 on as many connections, h2c as streams on one.
func BenchmarkRoundTripParallel(b *testing.B) {
	addr, _ := server(b, time.Minute, hello5)
	benchRoundTripParallel(b, HTTP1, addr)
}

func BenchmarkRoundTripH2CParallel(b *testing.B) {
	addr, _ := h2cServer(b, hello5)
	benchRoundTripParallel(b, H2C, addr)
}

func benchRoundTrip(b *testing.B, proto Protocol, addr string) {
	p := New(Options{})
	defer p.CloseIdle(0)
	req := &Request{Protocol: proto, Method: http.MethodPost, Target: "/v1/completions", Host: addr, Body: []byte(`{"model":"m"}`)}
	buf := make([]byte, 32<<10)
	b.ReportAllocs()
	for b.Loop() {
		exchangeOnce(b, p, req, addr, buf)
	}
}

func benchRoundTripParallel(b *testing.B, proto Protocol, addr string) {
	p := New(Options{MaxIdlePerAddr: 64})
	defer p.CloseIdle(0)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		req := &Request{Protocol: proto, Method: http.MethodPost, Target: "/v1/completions", Host: addr, Body: []byte(`{"model":"m"}`)}
		buf := make([]byte, 32<<10)
		for pb.Next() {
			exchangeOnce(b, p, req, addr, buf)
		}
	})
}

// exchangeOnce makes one exchange and reads its body to the end.
func exchangeOnce(b *testing.B, p *Pool, req *Request, addr string, buf []byte) {
	r, err := p.RoundTrip(context.Background(), req, addr, 5*time.Second)
	if err != nil {
		b.Error(err)
		return
	}
	complete := false
	for {
		_, err := r.Body.Read(buf)
		if err == io.EOF {
			complete = true
			break
		}
		if err != nil {
			b.Error(err)
			break
		}
	}
	p.Release(r, complete)
}
