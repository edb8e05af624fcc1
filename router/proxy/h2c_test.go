package proxy

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/net/http2"
	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/inferencepool"
	"github.com/capstan-dev/capstan/router/route"
	"github.com/capstan-dev/capstan/router/upstream"
)

// h2cUpstream is a model server stand-in that speaks only HTTP/2 with prior
// knowledge and names the protocol it was asked in.
func h2cUpstream(t testing.TB, pod string) backend {
	t.Helper()
	hits := new(atomic.Int64)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		io.ReadAll(r.Body)
		w.Header().Set("X-Upstream", pod)
		w.Header().Set("X-Proto", r.Proto)
		io.WriteString(w, `{"ok":true}`)
	}))
	srv.Config.Protocols = new(http.Protocols)
	srv.Config.Protocols.SetUnencryptedHTTP2(true)
	srv.Start()
	t.Cleanup(srv.Close)
	return backend{addr: srv.Listener.Addr().String(), pod: pod, ready: true, hits: hits}
}

// resettingH2C is an HTTP/2 server that resets every stream with code, and
// counts them.
func resettingH2C(t testing.TB, pod string, code http2.ErrCode) backend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hits := new(atomic.Int64)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Go(func() {
				defer c.Close()
				if _, err := io.ReadFull(c, make([]byte, len(http2.ClientPreface))); err != nil {
					return
				}
				fr := http2.NewFramer(c, c)
				fr.WriteSettings()
				for {
					f, err := fr.ReadFrame()
					if err != nil {
						return
					}
					if h, ok := f.(*http2.HeadersFrame); ok {
						hits.Add(1)
						fr.WriteRSTStream(h.StreamID, code)
					}
				}
			})
		}
	})
	return backend{addr: ln.Addr().String(), pod: pod, ready: true, hits: hits}
}

// poolGateway serves a Gateway listener whose one rule sends everything to
// an InferencePool of the backends, speaking proto to them.
func poolGateway(t *testing.T, proto upstream.Protocol, backends ...backend) *gatewayFixture {
	g := newGatewayFixture(t, nil, func(map[string]*route.Backend) map[string][]*route.Match { return nil },
		ordered(podNames(backends)...))
	pool := &inferencepool.Pool{Key: types.NamespacedName{Namespace: "ns", Name: "pool"}, Protocol: proto}
	for _, b := range backends {
		pool.Endpoints = append(pool.Endpoints, discovery.Endpoint{Address: b.addr, Pod: types.NamespacedName{Namespace: "ns", Name: b.pod}, Ready: true})
	}
	g.builder.PoolChanged(pool.Key, pool)
	key := route.BackendKey{Pool: pool.Key}
	l := &route.Listener{Gateway: types.NamespacedName{Namespace: "ns", Name: "gw"}, Name: "http", Port: 80, Scheme: "http"}
	l.AddHost("", []*route.Match{match(newRule(0, route.RuleBackend{Weight: 1, Backend: g.builder.SyncBackends([]route.BackendKey{key})[key]}),
		mustMatch(route.NewPathMatch(route.PathPrefix, "/")))})
	g.table = route.NewHTTPTable([]*route.Port{route.NewPort(gatewayAddr, false, []*route.Listener{l})})
	return g
}

func podNames(bs []backend) []string {
	var out []string
	for _, b := range bs {
		out = append(out, b.pod)
	}
	return out
}

// TestGatewayInferencePoolH2C: a pool whose appProtocol is kubernetes.io/h2c
// is spoken to in HTTP/2; a refused stream moves to the next endpoint, any
// other reset is answered 502 and not retried; a protocol that does not
// match the server's is a 502 that says so.
func TestGatewayInferencePoolH2C(t *testing.T) {
	post := func(g *gatewayFixture) (*http.Response, string) {
		return g.do("POST", "h", "/v1/completions", "application/json", `{"model":"m"}`)
	}
	t.Run("h2c", func(t *testing.T) {
		up := h2cUpstream(t, "h2c-0")
		g := poolGateway(t, upstream.H2C, up)
		for range 3 {
			resp, data := post(g)
			if resp.StatusCode != 200 || resp.Header.Get("X-Proto") != "HTTP/2.0" || resp.Header.Get("X-Capstan-Pod") != "ns/h2c-0" {
				t.Errorf("%d %s via %q: %s", resp.StatusCode, resp.Header.Get("X-Proto"), resp.Header.Get("X-Capstan-Pod"), data)
			}
		}
	})
	t.Run("REFUSED_STREAM is retried", func(t *testing.T) {
		refusing, up := resettingH2C(t, "refusing", http2.ErrCodeRefusedStream), h2cUpstream(t, "h2c-0")
		g := poolGateway(t, upstream.H2C, refusing, up)
		resp, data := post(g)
		if resp.StatusCode != 200 || resp.Header.Get("X-Capstan-Pod") != "ns/h2c-0" || refusing.hits.Load() != 1 || up.hits.Load() != 1 {
			t.Errorf("%d via %q, refused %d, served %d: %s", resp.StatusCode, resp.Header.Get("X-Capstan-Pod"), refusing.hits.Load(), up.hits.Load(), data)
		}
	})
	t.Run("INTERNAL_ERROR is not retried", func(t *testing.T) {
		resetting, up := resettingH2C(t, "resetting", http2.ErrCodeInternal), h2cUpstream(t, "h2c-0")
		g := poolGateway(t, upstream.H2C, resetting, up)
		resp, data := post(g)
		if resp.StatusCode != http.StatusBadGateway || !strings.Contains(data, codeUpstreamReset) || up.hits.Load() != 0 {
			t.Errorf("%d, served %d: %s; want 502 %s and no retry", resp.StatusCode, up.hits.Load(), data, codeUpstreamReset)
		}
	})
	t.Run("h2c to an HTTP/1.1 server", func(t *testing.T) {
		// The server answers the preface (as a request "PRI *") in
		// HTTP/1.1 and closes the connection; where that meets the
		// request is a race. Read before the request's HEADERS are
		// written, the connection fails and the request reached no
		// server (upstream_unreachable once attempts run out); read
		// after, the answer is refused, saying why
		// (upstream_bad_response); a close that breaks the write of
		// the request is a reset after sending (upstream_reset), as
		// on HTTP/1.1. Each is a 502.
		g := poolGateway(t, upstream.H2C, echoUpstream(t, "http1-0"))
		resp, data := post(g)
		switch {
		case resp.StatusCode != http.StatusBadGateway:
			t.Errorf("%d: %s; want 502", resp.StatusCode, data)
		case strings.Contains(data, codeUpstreamReset), strings.Contains(data, codeUpstreamUnreached):
		case !strings.Contains(data, codeUpstreamBadResponse) || !strings.Contains(data, "does not speak h2c"):
			t.Errorf("%s; want %s saying the server does not speak h2c", data, codeUpstreamBadResponse)
		}
	})
	t.Run("HTTP/1.1 to an h2c server", func(t *testing.T) {
		up := h2cUpstream(t, "h2c-0")
		g := poolGateway(t, upstream.HTTP1, up)
		resp, data := post(g)
		if resp.StatusCode != http.StatusBadGateway || !strings.Contains(data, codeUpstreamReset) || up.hits.Load() != 0 {
			t.Errorf("%d: %s; want 502 %s", resp.StatusCode, data, codeUpstreamReset)
		}
	})
}
