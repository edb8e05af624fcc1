package proxy

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2/ktesting"

	"github.com/capstan-dev/capstan/router/balance"
	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/health"
	"github.com/capstan-dev/capstan/router/metrics"
	"github.com/capstan-dev/capstan/router/route"
	"github.com/capstan-dev/capstan/router/server"
)

// backend is one upstream of a test: an httptest server, or a dead address.
type backend struct {
	addr  string
	pod   string
	ready bool
	hits  *atomic.Int64
}

// startBackend starts a model server stand-in that counts requests.
func startBackend(t testing.TB, pod string, handler http.HandlerFunc) backend {
	t.Helper()
	hits := new(atomic.Int64)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		handler(w, r)
	}))
	t.Cleanup(srv.Close)
	return backend{addr: srv.Listener.Addr().String(), pod: pod, ready: true, hits: hits}
}

// deadAddr returns an address nothing listens on: connections are refused.
// The port stays bound, without listening, until the test ends, so that no
// other test's server (in this process or another) can take it meanwhile —
// a port merely closed again was once taken by another package's router,
// and the two forwarded a request back and forth.
func deadAddr(t testing.TB) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(sa.(*syscall.SockaddrInet4).Port))
}

// prefixCache is the cache-aware policy with its defaults, as the router
// runs it.
func prefixCache() Balancing {
	return Balancing{Policy: balance.PrefixCache, PrefixBytes: balance.MaxPromptBlocks * balance.PromptBlockBytes, PromptBlocks: true,
		Selector: balance.NewPrefixCache(balance.DefaultCacheWeight, balance.DefaultQueueWeight, balance.DefaultKVCacheWeight,
			balance.DefaultLoadFactor, balance.DefaultBlocksPerEndpoint)}
}

// inOrder is a Selector that prefers pods in a fixed order, so a test knows
// which endpoint a request tries first.
type inOrder []string

func (o inOrder) Select(p *balance.Pool, r *balance.Request) *balance.Endpoint {
	for _, pod := range o {
		for i := range p.Endpoints() {
			if e := &p.Endpoints()[i]; e.Pod == "ns/"+pod && p.Available(e, r) {
				return e
			}
		}
	}
	return nil
}

func ordered(pods ...string) option {
	return func(o *Options) { o.Balancing.Selector = inOrder(pods) }
}

func ok(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	io.WriteString(w, `{"object":"text_completion","choices":[{"text":"hi"}]}`)
}

type fixture struct {
	t       testing.TB
	builder *route.Builder
	reg     *prometheus.Registry
	handler *Handler
	url     string // the router's
}

type option func(*Options)

func newFixture(t testing.TB, model string, backends []backend, opts ...option) *fixture {
	t.Helper()
	logger, _ := ktesting.NewTestContext(t)
	o := Options{
		Balancing:               Balancing{Policy: balance.RoundRobin, Selector: balance.RoundRobinSelection{}},
		MaxBodyBytes:            1 << 10,
		MaxAttempts:             3,
		TryDuration:             time.Minute,
		OutlierErrors:           5,
		OutlierStatuses:         []int{500, 502, 503, 504},
		MaxEjectionPercent:      100,
		ConnectTimeout:          time.Second,
		FirstByteTimeout:        5 * time.Second,
		IdleStreamTimeout:       5 * time.Second,
		RetryAfter:              2 * time.Second,
		MaxIdleConnsPerEndpoint: 16,
		AccessLog:               true,
	}
	for _, opt := range opts {
		opt(&o)
	}
	var ro route.Options
	var held func(string) int
	if o.Holds != nil {
		ro.ModelChanged, held = o.Holds.Kick, o.Holds.Len
	}
	b := route.NewBuilder(health.NewRegistry(health.EjectionPolicy{Base: time.Minute, Max: time.Minute}), ro)
	f := &fixture{t: t, builder: b, reg: prometheus.NewRegistry()}
	f.setBackends(model, backends)
	f.handler = New(b, metrics.New(f.reg, b.Table, held), logger, o)
	f.url = serveRouter(t, f.handler)
	t.Cleanup(f.handler.CloseIdleConnections)
	return f
}

func (f *fixture) setBackends(model string, backends []backend) {
	var eps []discovery.Endpoint
	slices.SortFunc(backends, func(a, b backend) int { return strings.Compare(a.addr, b.addr) })
	for _, b := range backends {
		eps = append(eps, discovery.Endpoint{Address: b.addr, Pod: types.NamespacedName{Namespace: "ns", Name: b.pod}, Ready: b.ready})
	}
	key := types.NamespacedName{Namespace: "ns", Name: model}
	f.builder.ServiceChanged(key, &discovery.Service{Key: key, Labels: map[string]string{"capstan.dev/model": model}, Port: "http",
		Endpoints: eps})
}

func (f *fixture) post(path, body string, header ...string) (*http.Response, string) {
	f.t.Helper()
	req, err := http.NewRequest(http.MethodPost, f.url+path, strings.NewReader(body))
	if err != nil {
		f.t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		f.t.Fatal(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		f.t.Fatalf("reading the response: %v", err)
	}
	return resp, string(data)
}

// metric returns the value of a counter or gauge with exactly these labels.
func (f *fixture) metric(name string, labels map[string]string) float64 {
	f.t.Helper()
	families, err := f.reg.Gather()
	if err != nil {
		f.t.Fatal(err)
	}
	for _, fam := range families {
		if fam.GetName() != name {
			continue
		}
		for _, m := range fam.Metric {
			if labelsMatch(m.Label, labels) {
				if m.Counter != nil {
					return m.Counter.GetValue()
				}
				return m.Gauge.GetValue()
			}
		}
	}
	return 0
}

func labelsMatch(have []*dto.LabelPair, want map[string]string) bool {
	if len(have) != len(want) {
		return false
	}
	for _, l := range have {
		if want[l.GetName()] != l.GetValue() {
			return false
		}
	}
	return true
}

const completion = `{"model":"llama","prompt":"hello","max_tokens":4}`

func TestForwardsBodyAndHeaders(t *testing.T) {
	var got struct {
		body   string
		header http.Header
		uri    string
	}
	b := startBackend(t, "llama-0", func(w http.ResponseWriter, r *http.Request) {
		data, _ := io.ReadAll(r.Body)
		got.body, got.header, got.uri = string(data), r.Header.Clone(), r.RequestURI
		w.Header().Set("X-Engine", "sim")
		w.Header().Set("Connection", "X-Drop-Me")
		w.Header().Set("X-Drop-Me", "1")
		ok(w, r)
	})
	f := newFixture(t, "llama", []backend{b}, func(o *Options) { o.TrustedHops = 1 })
	body := `{"model":"llama",  "prompt":"hello",` + "\n" + `"stream":false}`
	resp, data := f.post("/v1/completions?trace=1", body,
		"X-Request-Id", "req-123", "Connection", "X-Private", "X-Private", "secret", "Keep-Alive", "timeout=5", "X-Forwarded-For", "198.51.100.7, 203.0.113.9")
	if resp.StatusCode != http.StatusOK || !strings.Contains(data, "text_completion") {
		t.Fatalf("got %d %s", resp.StatusCode, data)
	}
	if got.body != body {
		t.Errorf("the model server got body %q, want it unchanged %q", got.body, body)
	}
	if got.uri != "/v1/completions?trace=1" {
		t.Errorf("the model server got %s", got.uri)
	}
	for _, h := range []string{"X-Private", "Keep-Alive", "Connection"} {
		if v := got.header.Get(h); v != "" {
			t.Errorf("hop-by-hop header %s reached the model server: %q", h, v)
		}
	}
	if v := got.header.Get("X-Request-Id"); v != "req-123" {
		t.Errorf("X-Request-Id upstream = %q, want the client's", v)
	}
	// One trusted hop: the address it appended stays, the client's own
	// entry before it goes.
	if v := got.header.Get("X-Forwarded-For"); v != "203.0.113.9, 127.0.0.1" {
		t.Errorf("X-Forwarded-For upstream = %q", v)
	}
	want := map[string]string{
		"X-Capstan-Pod": "ns/llama-0", "X-Capstan-Endpoint": b.addr, "X-Request-Id": "req-123", "X-Engine": "sim", "X-Drop-Me": "",
	}
	for h, v := range want {
		if resp.Header.Get(h) != v {
			t.Errorf("response header %s = %q, want %q", h, resp.Header.Get(h), v)
		}
	}
	// Without one, the router makes an id and sends it both ways.
	resp, _ = f.post("/v1/completions", completion)
	id := resp.Header.Get("X-Request-Id")
	if len(id) != 32 || got.header.Get("X-Request-Id") != id {
		t.Errorf("generated request id %q; upstream saw %q", id, got.header.Get("X-Request-Id"))
	}
	if v := f.metric("capstan_router_requests_total", map[string]string{"model": "llama", "code": "200", "balancer": "round-robin"}); v != 2 {
		t.Errorf("requests_total{code=200} = %v, want 2", v)
	}
}

type apiError struct {
	Error struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Code    string  `json:"code"`
		Param   *string `json:"param"`
	} `json:"error"`
}

func TestErrors(t *testing.T) {
	b := startBackend(t, "llama-0", ok)
	f := newFixture(t, "llama", []backend{b})
	f.setBackends("loading", []backend{{addr: "198.18.0.1:8000", pod: "l0"}, {addr: "198.18.0.2:8000", pod: "l1"}})
	key := types.NamespacedName{Namespace: "ns", Name: "draining"}
	f.builder.ServiceChanged(key, &discovery.Service{Key: key, Labels: map[string]string{"capstan.dev/model": "llama-3-8b"}, Endpoints: []discovery.Endpoint{
		{Address: "198.18.0.3:8000"}, {Address: "198.18.0.4:8000"}, {Address: "198.18.0.5:8000", Terminating: true},
	}})

	for name, tc := range map[string]struct {
		method, path, body string
		status             int
		code               string
		message            string
		header             map[string]string
	}{
		"not JSON":            {"POST", "/v1/completions", `{"model": "llama",`, 400, codeInvalidJSON, "not valid JSON", nil},
		"JSON but no object":  {"POST", "/v1/completions", `["llama"]`, 400, codeInvalidJSON, "must be a JSON object", nil},
		"empty body":          {"POST", "/v1/completions", ``, 400, codeInvalidJSON, "empty", nil},
		"no model":            {"POST", "/v1/chat/completions", `{"messages":[]}`, 400, codeMissingModel, `no "model"`, nil},
		"null model":          {"POST", "/v1/chat/completions", `{"model":null}`, 400, codeMissingModel, `no "model"`, nil},
		"model not a string":  {"POST", "/v1/completions", `{"model":7}`, 400, codeInvalidJSON, `"model" must be a string`, nil},
		"unknown model":       {"POST", "/v1/completions", `{"model":"gpt-9"}`, 404, codeModelNotFound, `model "gpt-9" is not served here`, nil},
		"too large":           {"POST", "/v1/completions", `{"model":"llama","prompt":"` + strings.Repeat("x", 2000) + `"}`, 413, codeTooLarge, "larger than the router's limit of 1024 bytes", nil},
		"wrong method":        {"GET", "/v1/completions", ``, 405, codeMethodNotAllowed, "use POST", map[string]string{"Allow": "POST"}},
		"wrong method models": {"DELETE", "/v1/models", ``, 405, codeMethodNotAllowed, "use GET", map[string]string{"Allow": "GET"}},
		"not the API":         {"POST", "/admin", `{}`, 404, codeNotFound, "no route for POST /admin", nil},
		"all loading": {"POST", "/v1/completions", `{"model":"loading"}`, 503, codeNoReadyEndpoints,
			"model loading has 0 ready of 2 endpoints: 2 not ready", map[string]string{"Retry-After": "2"}},
		"not ready and terminating": {"POST", "/v1/completions", `{"model":"llama-3-8b"}`, 503, codeNoReadyEndpoints,
			"model llama-3-8b has 0 ready of 3 endpoints: 2 not ready, 1 terminating", map[string]string{"Retry-After": "2"}},
	} {
		t.Run(name, func(t *testing.T) {
			req, _ := http.NewRequest(tc.method, f.url+tc.path, strings.NewReader(tc.body))
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var e apiError
			if err := json.NewDecoder(resp.Body).Decode(&e); err != nil {
				t.Fatalf("the error is not JSON: %v", err)
			}
			if resp.StatusCode != tc.status || e.Error.Code != tc.code || !strings.Contains(e.Error.Message, tc.message) {
				t.Errorf("got %d code=%q message=%q; want %d code=%q message containing %q",
					resp.StatusCode, e.Error.Code, e.Error.Message, tc.status, tc.code, tc.message)
			}
			if e.Error.Type == "" || resp.Header.Get("Content-Type") != "application/json" || resp.Header.Get("X-Request-Id") == "" {
				t.Errorf("error without type, JSON content type or request id: %+v %v", e, resp.Header)
			}
			for h, v := range tc.header {
				if got := resp.Header.Get(h); got != v {
					t.Errorf("header %s = %q, want %q", h, got, v)
				}
			}
		})
	}
	if b.hits.Load() != 0 {
		t.Errorf("the model server got %d requests; every one above should have been refused by the router", b.hits.Load())
	}
	// Errors about unknown models do not create metric labels per name.
	if v := f.metric("capstan_router_requests_total", map[string]string{"model": "", "code": "404", "balancer": "round-robin"}); v != 2 {
		t.Errorf("requests_total{model=\"\",code=404} = %v, want 2", v)
	}
}

// A chunked body over the limit (no Content-Length to check up front) is
// refused too.
func TestTooLargeChunkedBody(t *testing.T) {
	b := startBackend(t, "llama-0", ok)
	f := newFixture(t, "llama", []backend{b})
	pr, pw := io.Pipe()
	go func() {
		pw.Write([]byte(`{"model":"llama","prompt":"`))
		pw.Write([]byte(strings.Repeat("y", 4000)))
		pw.Close()
	}()
	req, _ := http.NewRequest(http.MethodPost, f.url+"/v1/completions", pr)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestEntityTooLarge || b.hits.Load() != 0 {
		t.Errorf("got %d with %d upstream hits, want 413 and none", resp.StatusCode, b.hits.Load())
	}
}

func TestRetriesRefusedConnectionsAndEjects(t *testing.T) {
	dead := backend{addr: deadAddr(t), pod: "dead", ready: true}
	good := startBackend(t, "good", ok)
	f := newFixture(t, "llama", []backend{dead, good}, ordered("dead", "good"))
	for i := range 10 {
		resp, data := f.post("/v1/completions", completion)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("request %d: %d %s", i, resp.StatusCode, data)
		}
		if pod := resp.Header.Get("X-Capstan-Pod"); pod != "ns/good" {
			t.Fatalf("request %d served by %q", i, pod)
		}
	}
	if good.hits.Load() != 10 {
		t.Errorf("good backend got %d requests, want 10", good.hits.Load())
	}
	// The refusing endpoint was tried once, then ejected: one retry, one
	// ejection, not one per request.
	if v := f.metric("capstan_router_retries_total", map[string]string{"model": "llama", "reason": "connect"}); v != 1 {
		t.Errorf("retries_total = %v, want 1", v)
	}
	if v := f.metric("capstan_router_ejections_total", map[string]string{"model": "llama"}); v != 1 {
		t.Errorf("ejections_total = %v, want 1", v)
	}
	if v := f.metric("capstan_router_endpoint_ejected", map[string]string{"model": "llama", "pod": "ns/dead", "endpoint": dead.addr}); v != 1 {
		t.Errorf("endpoint_ejected for the dead endpoint = %v, want 1", v)
	}
}

// hijackClose answers by closing the connection: before any byte, or after
// the headers and part of the body.
func hijackClose(partial string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		conn, buf, err := http.NewResponseController(w).Hijack()
		if err != nil {
			panic(err)
		}
		if partial != "" {
			buf.WriteString("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + partial)
			buf.Flush()
		}
		conn.Close()
	}
}

// A model server that read the whole request and then reset the connection
// may be running the generation: the request is answered 502, and no other
// endpoint ever sees it.
func TestNeverRetriesAResetAfterTheRequestWasSent(t *testing.T) {
	broken := startBackend(t, "broken", hijackClose(""))
	good := startBackend(t, "good", ok)
	f := newFixture(t, "llama", []backend{broken, good}, ordered("broken", "good"))
	resp, data := f.post("/v1/completions", completion)
	var e apiError
	json.Unmarshal([]byte(data), &e)
	if resp.StatusCode != http.StatusBadGateway || e.Error.Code != codeUpstreamReset {
		t.Fatalf("got %d %s, want 502 %s", resp.StatusCode, data, codeUpstreamReset)
	}
	if n, m := broken.hits.Load(), good.hits.Load(); n != 1 || m != 0 {
		t.Errorf("the broken backend got the request %d times and the good one %d times, want 1 and 0", n, m)
	}
	if v := f.metric("capstan_router_retries_total", map[string]string{"model": "llama", "reason": "transport"}); v != 0 {
		t.Errorf("retries_total{reason=transport} = %v, want 0", v)
	}
}

func TestNeverRetriesAfterBytesReachedTheClient(t *testing.T) {
	partial := startBackend(t, "partial", hijackClose(`{"object":"text_comp`))
	other := startBackend(t, "other", ok)
	f := newFixture(t, "llama", []backend{partial, other}, ordered("partial", "other"))
	req, _ := http.NewRequest(http.MethodPost, f.url+"/v1/completions", strings.NewReader(completion))
	// The router has committed to the response (status and headers), but
	// may not have flushed them before the model server died: the client
	// sees the connection close, before or after the headers, never a
	// complete response.
	resp, err := http.DefaultClient.Do(req)
	if err == nil {
		data, rerr := io.ReadAll(resp.Body)
		resp.Body.Close()
		if rerr == nil {
			t.Errorf("the client read a complete response %d %q from a backend that died mid-body", resp.StatusCode, data)
		}
	}
	if partial.hits.Load() != 1 {
		t.Fatalf("the partial backend got %d requests, want 1", partial.hits.Load())
	}
	waitFor(t, "the aborted request to leave the in-flight counts", func() bool {
		m := f.builder.Table().Lookup("llama")
		return m.Pool.InFlight() == 0 && m.Pool.Endpoints()[0].Host.InFlight() == 0 && m.Pool.Endpoints()[1].Host.InFlight() == 0
	})
	if other.hits.Load() != 0 {
		t.Error("the request was retried after bytes had reached the client")
	}
}

func TestFirstByteTimeout(t *testing.T) {
	slow := func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body) // lets the server notice the router hanging up
		select {
		case <-time.After(5 * time.Second):
		case <-r.Context().Done():
		}
		ok(w, r)
	}
	short := func(o *Options) { o.FirstByteTimeout = 100 * time.Millisecond }

	t.Run("answered, never retried", func(t *testing.T) {
		s, fast := startBackend(t, "slow", slow), startBackend(t, "fast", ok)
		f := newFixture(t, "llama", []backend{s, fast}, short, ordered("slow", "fast"))
		resp, data := f.post("/v1/completions", completion)
		if resp.StatusCode != http.StatusGatewayTimeout {
			t.Fatalf("got %d from %q: %s, want 504", resp.StatusCode, resp.Header.Get("X-Capstan-Pod"), data)
		}
		if n, m := s.hits.Load(), fast.hits.Load(); n != 1 || m != 0 {
			t.Errorf("the slow backend got the request %d times and the fast one %d times, want 1 and 0", n, m)
		}
		if v := f.metric("capstan_router_retries_total", map[string]string{"model": "llama", "reason": "first_byte_timeout"}); v != 0 {
			t.Errorf("retries_total{reason=first_byte_timeout} = %v, want 0", v)
		}
	})
	t.Run("504 when every endpoint times out", func(t *testing.T) {
		f := newFixture(t, "llama", []backend{startBackend(t, "a", slow), startBackend(t, "b", slow)}, short)
		start := time.Now()
		resp, data := f.post("/v1/completions", completion)
		var e apiError
		json.Unmarshal([]byte(data), &e)
		if resp.StatusCode != http.StatusGatewayTimeout || e.Error.Code != codeUpstreamTimeout {
			t.Fatalf("got %d %s, want 504", resp.StatusCode, data)
		}
		// One attempt: the request may be running on the first.
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("took %s", d)
		}
	})
}

func TestAllAttemptsRefusedIs502(t *testing.T) {
	f := newFixture(t, "llama", []backend{
		{addr: deadAddr(t), pod: "a", ready: true}, {addr: deadAddr(t), pod: "b", ready: true},
		{addr: deadAddr(t), pod: "c", ready: true}, {addr: deadAddr(t), pod: "d", ready: true},
	})
	resp, data := f.post("/v1/completions", completion)
	var e apiError
	json.Unmarshal([]byte(data), &e)
	if resp.StatusCode != http.StatusBadGateway || e.Error.Code != codeUpstreamUnreached || !strings.Contains(e.Error.Message, "3 attempt(s) reached no model server") {
		t.Fatalf("got %d %s, want 502 after 3 attempts", resp.StatusCode, data)
	}
	// Three attempts are two retries.
	if v := f.metric("capstan_router_retries_total", map[string]string{"model": "llama", "reason": "connect"}); v != 2 {
		t.Errorf("retries_total = %v after 3 attempts, want 2", v)
	}
	// Every endpoint is now ejected or untried; the next request still gets
	// tried rather than refused outright, since ejection is only a suspicion.
	resp, data = f.post("/v1/completions", completion)
	if resp.StatusCode != http.StatusBadGateway || !strings.Contains(data, "3 attempt(s)") {
		t.Errorf("with every endpoint ejected: %d %s, want another 502 after 3 attempts", resp.StatusCode, data)
	}
}

func TestStreamsChunkByChunk(t *testing.T) {
	next := make(chan struct{})
	b := startBackend(t, "llama-0", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		rc := http.NewResponseController(w)
		for i := range 3 {
			fmt.Fprintf(w, "data: {\"chunk\":%d}\n\n", i)
			rc.Flush()
			select { // the client must have read this chunk before the next is made
			case <-next:
			case <-time.After(5 * time.Second):
				return
			}
		}
		io.WriteString(w, "data: [DONE]\n\n")
	})
	f := newFixture(t, "llama", []backend{b})
	req, _ := http.NewRequest(http.MethodPost, f.url+"/v1/chat/completions", strings.NewReader(`{"model":"llama","stream":true}`))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Errorf("Content-Type %q", ct)
	}
	sc := bufio.NewScanner(resp.Body)
	var events []string
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		events = append(events, line)
		if line != "data: [DONE]" {
			next <- struct{}{} // deadlocks (then times out) if the chunk was buffered
		}
	}
	want := []string{`data: {"chunk":0}`, `data: {"chunk":1}`, `data: {"chunk":2}`, "data: [DONE]"}
	if diff := cmp.Diff(want, events); diff != "" {
		t.Errorf("events (-want +got):\n%s", diff)
	}
}

func TestIdleStreamTimeoutAbortsTheResponse(t *testing.T) {
	b := startBackend(t, "llama-0", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: {\"chunk\":0}\n\n")
		http.NewResponseController(w).Flush()
		<-r.Context().Done() // stall until the router gives up
	})
	f := newFixture(t, "llama", []backend{b}, func(o *Options) { o.IdleStreamTimeout = 200 * time.Millisecond })
	start := time.Now()
	req, _ := http.NewRequest(http.MethodPost, f.url+"/v1/completions", strings.NewReader(`{"model":"llama","stream":true}`))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	data, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err == nil || !strings.Contains(string(data), `"chunk":0`) {
		t.Errorf("read %q, err %v; want the first chunk, then an aborted stream", data, err)
	}
	if d := time.Since(start); d < 150*time.Millisecond || d > 3*time.Second {
		t.Errorf("aborted after %s, want about the 200ms idle timeout", d)
	}
	// The aborted request no longer counts as in flight.
	waitFor(t, "the aborted request to leave the in-flight count", func() bool {
		return f.builder.Table().Lookup("llama").Pool.Endpoints()[0].Host.InFlight() == 0
	})
}

func TestClientDisconnectCancelsUpstream(t *testing.T) {
	started, cancelled := make(chan struct{}), make(chan struct{})
	b := startBackend(t, "llama-0", func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body) // lets the server notice the router hanging up
		close(started)
		select {
		case <-r.Context().Done():
			close(cancelled)
		case <-time.After(10 * time.Second):
		}
	})
	f := newFixture(t, "llama", []backend{b})
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, f.url+"/v1/completions", strings.NewReader(completion))
	go func() {
		<-started
		cancel()
	}()
	if _, err := http.DefaultClient.Do(req); !errors.Is(err, context.Canceled) {
		t.Fatalf("client request: %v", err)
	}
	select {
	case <-cancelled:
	case <-time.After(5 * time.Second):
		t.Fatal("the model server's request was not cancelled when the client went away")
	}
	// The model server did nothing wrong: it is not ejected.
	waitFor(t, "the request to be recorded as 499", func() bool {
		return f.metric("capstan_router_requests_total", map[string]string{"model": "llama", "code": "499", "balancer": "round-robin"}) == 1
	})
	if v := f.metric("capstan_router_ejections_total", map[string]string{"model": "llama"}); v != 0 {
		t.Errorf("a client disconnect ejected the endpoint (%v ejections)", v)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestConcurrencyLimits(t *testing.T) {
	gate := make(chan struct{})
	arrived := make(chan struct{}, 2)
	var wg sync.WaitGroup
	blocking := func(w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		<-gate
		ok(w, r)
	}
	for name, tc := range map[string]struct {
		opts route.Options
		code string
	}{
		"per endpoint": {route.Options{MaxPerEndpoint: 1}, codeEndpointsFull},
		"per model":    {route.Options{MaxPerModel: 2}, codeModelOverloaded},
	} {
		t.Run(name, func(t *testing.T) {
			f := newFixture(t, "llama", nil)
			f.builder = route.NewBuilder(health.NewRegistry(health.EjectionPolicy{}), tc.opts)
			f.handler.routes = f.builder
			f.setBackends("llama", []backend{startBackend(t, "a", blocking), startBackend(t, "b", blocking)})
			// Two requests take both slots (either limit allows two).
			results := make(chan int, 2)
			for range 2 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					resp, _ := f.post("/v1/completions", completion)
					results <- resp.StatusCode
				}()
			}
			// Wait until both reached a model server: the pool counts a
			// request as in flight before it has taken an endpoint.
			for range 2 {
				select {
				case <-arrived:
				case <-time.After(5 * time.Second):
					t.Fatal("timed out waiting for two requests to reach the model servers")
				}
			}
			resp, data := f.post("/v1/completions", completion)
			var e apiError
			json.Unmarshal([]byte(data), &e)
			if resp.StatusCode != http.StatusTooManyRequests || e.Error.Code != tc.code || resp.Header.Get("Retry-After") == "" {
				t.Errorf("third request: %d %s (Retry-After %q), want 429 %s", resp.StatusCode, data, resp.Header.Get("Retry-After"), tc.code)
			}
			gate <- struct{}{}
			gate <- struct{}{}
			for range 2 {
				if code := <-results; code != http.StatusOK {
					t.Errorf("a request within the limit got %d", code)
				}
			}
		})
	}
	wg.Wait()
}

func TestListModels(t *testing.T) {
	f := newFixture(t, "llama", []backend{startBackend(t, "a", ok), {addr: "198.18.0.9:8000", pod: "b"}})
	resp, err := http.Get(f.url + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var list struct {
		Object string        `json:"object"`
		Data   []modelObject `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		t.Fatal(err)
	}
	want := []modelObject{{ID: "llama", Object: "model", OwnedBy: "capstan",
		Endpoints: endpointCounts{Ready: 1, NotReady: 1, Total: 2}, Services: []string{"ns/llama"}, Owner: "ns"}}
	if diff := cmp.Diff(want, list.Data); diff != "" || list.Object != "list" {
		t.Errorf("models (-want +got):\n%s", diff)
	}
	resp, err = http.Get(f.url + "/v1/models/llama")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("GET /v1/models/llama: %d", resp.StatusCode)
	}
	resp, err = http.Get(f.url + "/v1/models/nope")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("GET /v1/models/nope: %d, want 404", resp.StatusCode)
	}
}

func TestAffinityHeadersReachTheSelector(t *testing.T) {
	a, b, c := startBackend(t, "a", ok), startBackend(t, "b", ok), startBackend(t, "c", ok)
	t.Run("session", func(t *testing.T) {
		f := newFixture(t, "llama", []backend{a, b, c}, func(o *Options) {
			o.Balancing = Balancing{Policy: balance.SessionAffinity, Selector: balance.SessionAffinitySelection{}, SessionHeader: "X-Session-Id"}
		})
		for _, session := range []string{"alice", "bob", "carol", "dave"} {
			first, _ := f.post("/v1/completions", completion, "X-Session-Id", session)
			for range 5 {
				resp, _ := f.post("/v1/completions", completion, "X-Session-Id", session)
				if resp.Header.Get("X-Capstan-Pod") != first.Header.Get("X-Capstan-Pod") {
					t.Fatalf("session %s moved from %s to %s", session, first.Header.Get("X-Capstan-Pod"), resp.Header.Get("X-Capstan-Pod"))
				}
			}
		}
	})
	t.Run("prefix", func(t *testing.T) {
		f := newFixture(t, "llama", []backend{a, b, c}, func(o *Options) {
			o.Balancing = Balancing{Policy: balance.PrefixAffinity, Selector: balance.PrefixAffinitySelection{LoadFactor: 1.25}, PrefixBytes: 32}
		})
		pods := map[string]bool{}
		for i := range 30 {
			// Same 32-byte prefix, different tails: one pod.
			body := fmt.Sprintf(`{"model":"llama","prompt":"You are a helpful assistant. Question %d"}`, i)
			resp, _ := f.post("/v1/completions", body)
			pods[resp.Header.Get("X-Capstan-Pod")] = true
		}
		if len(pods) != 1 {
			t.Errorf("one shared prefix went to %d pods: %v", len(pods), pods)
		}
	})
	// The cache-aware balancer gets the decoded messages as blocks: each
	// group's prompts, behind an instruction block all of them share,
	// follow the group to one pod. Without the blocks, it balances by load
	// alone and idle pods tie, so a group is scattered.
	t.Run("prompt blocks", func(t *testing.T) {
		f := newFixture(t, "llama", []backend{a, b, c}, func(o *Options) {
			o.Balancing = prefixCache()
			o.MaxBodyBytes = 64 << 10
		})
		instructions := strings.Repeat("Answer briefly and cite the handbook. ", 100)
		for g := range 3 {
			system := instructions + strings.Repeat(fmt.Sprintf("Group %d knowledge base entry. ", g), 100)
			pods := map[string]bool{}
			for q := range 10 {
				body, _ := json.Marshal(map[string]any{"model": "llama", "messages": []map[string]string{
					{"role": "system", "content": system}, {"role": "user", "content": fmt.Sprintf("Question %d?", q)}}})
				resp, data := f.post("/v1/chat/completions", string(body))
				if resp.StatusCode != http.StatusOK {
					t.Fatalf("group %d question %d: %d %s", g, q, resp.StatusCode, data)
				}
				pods[resp.Header.Get("X-Capstan-Pod")] = true
			}
			if len(pods) != 1 {
				t.Errorf("group %d went to %d pods: %v", g, len(pods), pods)
			}
		}
	})
}

// Until discovery has synced, the router does not call models unknown.
func TestNotSyncedIs503(t *testing.T) {
	var synced atomic.Bool
	f := newFixture(t, "llama", []backend{startBackend(t, "a", ok)}, func(o *Options) { o.Synced = synced.Load })
	resp, data := f.post("/v1/completions", `{"model":"anything"}`)
	var e apiError
	json.Unmarshal([]byte(data), &e)
	if resp.StatusCode != http.StatusServiceUnavailable || e.Error.Code != codeNotSynced || resp.Header.Get("Retry-After") == "" {
		t.Errorf("before sync: %d %s", resp.StatusCode, data)
	}
	synced.Store(true)
	if resp, data := f.post("/v1/completions", completion); resp.StatusCode != http.StatusOK {
		t.Errorf("after sync: %d %s", resp.StatusCode, data)
	}
}

// countingUpstream is an upstream that counts the connections it accepts.
func countingUpstream(t *testing.T, idleTimeout time.Duration) (backend, *atomic.Int64) {
	t.Helper()
	conns := new(atomic.Int64)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(ok))
	srv.Config.IdleTimeout = idleTimeout
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	return backend{addr: srv.Listener.Addr().String(), pod: "counted", ready: true, hits: new(atomic.Int64)}, conns
}

func TestUpstreamConnectionsAreKeptAlive(t *testing.T) {
	b, conns := countingUpstream(t, time.Minute)
	f := newFixture(t, "llama", []backend{b})
	for i := range 20 {
		if resp, data := f.post("/v1/completions", completion); resp.StatusCode != http.StatusOK {
			t.Fatalf("request %d: %d %s", i, resp.StatusCode, data)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("20 sequential requests opened %d upstream connections, want 1", n)
	}
	f.handler.CloseIdleConnections()
	if resp, _ := f.post("/v1/completions", completion); resp.StatusCode != http.StatusOK || conns.Load() != 2 {
		t.Errorf("after closing idle connections: %d with %d connections, want 200 on a second one", resp.StatusCode, conns.Load())
	}
}

// A keep-alive connection the model server closed while it was idle is
// replaced transparently: no error, no retry on another endpoint, no
// ejection.
func TestStaleKeepAliveConnectionIsRedialed(t *testing.T) {
	b, conns := countingUpstream(t, 20*time.Millisecond)
	f := newFixture(t, "llama", []backend{b})
	for i := range 3 {
		if resp, data := f.post("/v1/completions", completion); resp.StatusCode != http.StatusOK {
			t.Fatalf("request %d: %d %s", i, resp.StatusCode, data)
		}
		time.Sleep(100 * time.Millisecond) // the server closes the idle connection
	}
	if n := conns.Load(); n != 3 {
		t.Errorf("%d upstream connections, want 3 (one per request after each idle close)", n)
	}
	if v := f.metric("capstan_router_ejections_total", map[string]string{"model": "llama"}); v != 0 {
		t.Errorf("a stale keep-alive connection ejected the endpoint (%v)", v)
	}
	if v := f.metric("capstan_router_retries_total", map[string]string{"model": "llama", "reason": "transport"}); v != 0 {
		t.Errorf("a stale keep-alive connection counted as a retry (%v)", v)
	}
}

// serveRouter serves h the way the router does (server.Server) on a
// loopback port until the test ends, and returns its URL.
func serveRouter(t testing.TB, h http.Handler) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &server.Server{Handler: h}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-done; !errors.Is(err, server.ErrServerClosed) {
			t.Errorf("serving: %v", err)
		}
	})
	return "http://" + ln.Addr().String()
}

// serve500 answers every request with a 500 at once.
func serve500(w http.ResponseWriter, r *http.Request) {
	io.Copy(io.Discard, r.Body)
	http.Error(w, `{"error":{"message":"boom"}}`, http.StatusInternalServerError)
}

// An endpoint that answers 500 to everything is ejected after
// OutlierErrors answers in a row; the requests after that go elsewhere.
func TestOutlierDetectionEjectsAnEndpointAnswering500(t *testing.T) {
	bad, good := startBackend(t, "bad", serve500), startBackend(t, "good", ok)
	f := newFixture(t, "llama", []backend{bad, good})
	const requests = 40
	errors := 0
	for range requests {
		if resp, _ := f.post("/v1/completions", completion); resp.StatusCode != http.StatusOK {
			errors++
		}
	}
	// Round robin: five 500s reach the client before the ejection, then
	// none while it lasts (a minute in the fixture).
	if n := bad.hits.Load(); n != 5 || errors != 5 {
		t.Errorf("the failing endpoint got %d requests and clients saw %d errors, want 5 and 5", n, errors)
	}
	if v := f.metric("capstan_router_endpoint_ejected", map[string]string{"model": "llama", "pod": "ns/bad", "endpoint": bad.addr}); v != 1 {
		t.Errorf("endpoint_ejected for the failing endpoint = %v, want 1", v)
	}
}

// Outlier detection never ejects more than MaxEjectionPercent of a pool.
func TestMaxEjectionPercent(t *testing.T) {
	var all []backend
	for _, name := range []string{"a", "b", "c", "d"} {
		all = append(all, startBackend(t, name, serve500))
	}
	f := newFixture(t, "llama", all, func(o *Options) { o.MaxEjectionPercent = 50; o.OutlierErrors = 1 })
	for range 20 {
		f.post("/v1/completions", completion)
	}
	ejected := 0
	for _, e := range f.builder.Table().Lookup("llama").Pool.Endpoints() {
		if e.Host.Ejected() {
			ejected++
		}
	}
	if ejected != 2 {
		t.Errorf("%d of 4 endpoints answering 500 are ejected, want 2 (50%%)", ejected)
	}
}

// A model server that answers with what the pool refuses (here a 101) is
// answered 502 upstream_bad_response, and no other endpoint sees the
// request.
func TestRefusedAnswerIsNotRetried(t *testing.T) {
	upgrade := startBackend(t, "upgrade", func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		conn, buf, err := http.NewResponseController(w).Hijack()
		if err != nil {
			panic(err)
		}
		buf.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
		buf.Flush()
		conn.Close()
	})
	good := startBackend(t, "good", ok)
	f := newFixture(t, "llama", []backend{upgrade, good}, ordered("upgrade", "good"))
	resp, data := f.post("/v1/completions", completion)
	var e apiError
	json.Unmarshal([]byte(data), &e)
	if resp.StatusCode != http.StatusBadGateway || e.Error.Code != codeUpstreamBadResponse {
		t.Fatalf("got %d %s, want 502 %s", resp.StatusCode, data, codeUpstreamBadResponse)
	}
	if n, m := upgrade.hits.Load(), good.hits.Load(); n != 1 || m != 0 {
		t.Errorf("the upgrading backend got the request %d times and the good one %d times, want 1 and 0", n, m)
	}
}
