package proxy

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/capstan-dev/capstan/router/health"
	"github.com/capstan-dev/capstan/router/hold"
	"github.com/capstan-dev/capstan/router/route"
)

func holding(max int, timeout time.Duration) option {
	return func(o *Options) { o.Holds, o.HoldTimeout = hold.New(max), timeout }
}

// outcome is one client request's result, read in a goroutine.
type outcome struct {
	status int
	code   string
	body   string
	header http.Header
	err    error
}

func (f *fixture) send(ctx context.Context, body string) outcome {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, f.url+"/v1/completions", strings.NewReader(body))
	if err != nil {
		return outcome{err: err}
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return outcome{err: err}
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	var e apiError
	json.Unmarshal(data, &e)
	return outcome{status: resp.StatusCode, code: e.Error.Code, body: string(data), header: resp.Header, err: err}
}

// sendAll sends n requests at once and returns their outcomes as they end.
func (f *fixture) sendAll(ctx context.Context, n int) <-chan outcome {
	out := make(chan outcome, n)
	for range n {
		go func() { out <- f.send(ctx, completion) }()
	}
	return out
}

// Requests for a model with no Ready endpoint wait for one and are all
// answered once it is Ready; while they wait they are the model's demand.
func TestHeldUntilAnEndpointIsReady(t *testing.T) {
	f := newFixture(t, "llama", nil, holding(10, time.Minute))
	results := f.sendAll(t.Context(), 3)
	waitFor(t, "three requests held", func() bool { return f.handler.opts.Holds.Len("llama") == 3 })
	llama := map[string]string{"model": "llama"}
	if d := f.metric("capstan_router_model_demand", llama); d != 3 {
		t.Errorf("demand while three are held = %v, want 3", d)
	}
	if h := f.metric("capstan_router_model_held_requests", llama); h != 3 {
		t.Errorf("held = %v, want 3", h)
	}
	a := startBackend(t, "a", ok)
	f.setBackends("llama", []backend{a})
	for range 3 {
		if r := <-results; r.err != nil || r.status != http.StatusOK {
			t.Errorf("held request: %d %v %s", r.status, r.err, r.body)
		}
	}
	if n := a.hits.Load(); n != 3 {
		t.Errorf("the new endpoint got %d requests, want 3", n)
	}
	if d := f.metric("capstan_router_model_demand", llama); d != 0 {
		t.Errorf("demand after the answers = %v, want 0", d)
	}
}

// Held requests go to a fresh endpoint no faster than its in-flight limit
// allows: they wait for a slot, never get 429 for it.
func TestHeldRequestsRespectTheEndpointLimit(t *testing.T) {
	f := newFixture(t, "llama", nil, holding(10, time.Minute))
	f.builder = route.NewBuilder(health.NewRegistry(health.EjectionPolicy{}), route.Options{MaxPerEndpoint: 1, ModelChanged: f.handler.opts.Holds.Kick})
	f.handler.routes = f.builder
	f.setBackends("llama", nil)
	var current, peak atomic.Int64
	slow := func(w http.ResponseWriter, r *http.Request) {
		n := current.Add(1)
		defer current.Add(-1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		time.Sleep(20 * time.Millisecond) // the endpoint is busy a while
		ok(w, r)
	}
	results := f.sendAll(t.Context(), 4)
	waitFor(t, "four requests held", func() bool { return f.handler.opts.Holds.Len("llama") == 4 })
	f.setBackends("llama", []backend{startBackend(t, "a", slow)})
	for range 4 {
		if r := <-results; r.err != nil || r.status != http.StatusOK {
			t.Errorf("held request: %d %v %s", r.status, r.err, r.body)
		}
	}
	if p := peak.Load(); p != 1 {
		t.Errorf("the endpoint had %d requests at once, want its limit of 1", p)
	}
}

// A hold that ends without a Ready endpoint is a 503 that says so; a full
// queue is a 429; both carry Retry-After.
func TestHoldTimeoutAndFullQueue(t *testing.T) {
	f := newFixture(t, "llama", nil, holding(1, 300*time.Millisecond))
	first := f.sendAll(t.Context(), 1)
	waitFor(t, "one request held", func() bool { return f.handler.opts.Holds.Len("llama") == 1 })
	full := f.send(t.Context(), completion)
	if full.status != http.StatusTooManyRequests || full.code != codeHoldQueueFull || full.header.Get("Retry-After") == "" {
		t.Errorf("beyond the queue: %d %s (Retry-After %q), want 429 %s", full.status, full.body, full.header.Get("Retry-After"), codeHoldQueueFull)
	}
	if n := f.histogramCount("capstan_router_hold_duration_seconds", map[string]string{"model": "llama", "outcome": "queue_full"}); n != 1 {
		t.Errorf("queue_full holds counted %d, want 1", n)
	}
	r := <-first
	if n := f.histogramCount("capstan_router_hold_duration_seconds", map[string]string{"model": "llama", "outcome": "timeout"}); n != 1 {
		t.Errorf("timed-out holds counted %d, want 1", n)
	}
	if r.status != http.StatusServiceUnavailable || r.code != codeNoReadyEndpoints || r.header.Get("Retry-After") == "" ||
		!strings.Contains(r.body, "held 0s for a ready endpoint: model llama has 0 ready of 0 endpoints") {
		t.Errorf("after the hold timeout: %d %s (Retry-After %q), want 503 %s saying it was held", r.status, r.body, r.header.Get("Retry-After"), codeNoReadyEndpoints)
	}
}

// A client that leaves while held is out of the queue at once, and its
// request never reaches the endpoint that turns Ready later.
func TestLeftWhileHeld(t *testing.T) {
	f := newFixture(t, "llama", nil, holding(10, time.Minute))
	ctx, leave := context.WithCancel(t.Context())
	gone := f.sendAll(ctx, 1)
	waitFor(t, "one request held", func() bool { return f.handler.opts.Holds.Len("llama") == 1 })
	leave()
	if r := <-gone; r.err == nil {
		t.Fatalf("the leaving client got %d", r.status)
	}
	waitFor(t, "the queue to empty", func() bool { return f.handler.opts.Holds.Len("llama") == 0 })
	a := startBackend(t, "a", ok)
	f.setBackends("llama", []backend{a})
	if r := f.send(t.Context(), completion); r.status != http.StatusOK {
		t.Fatalf("a later request: %d %s", r.status, r.body)
	}
	if n := a.hits.Load(); n != 1 {
		t.Errorf("the endpoint got %d requests, want only the later one", n)
	}
}

// histogramCount is the sample count of a histogram with exactly these
// labels.
func (f *fixture) histogramCount(name string, labels map[string]string) uint64 {
	f.t.Helper()
	families, err := f.reg.Gather()
	if err != nil {
		f.t.Fatal(err)
	}
	for _, fam := range families {
		for _, m := range fam.Metric {
			if fam.GetName() == name && labelsMatch(m.Label, labels) && m.Histogram != nil {
				return m.Histogram.GetSampleCount()
			}
		}
	}
	return 0
}

// A model that is switched off (no replica, none coming), or an adapter it
// declares, is answered 503 at once with the reason, not held; one whose
// replica is coming is held.
func TestSwitchedOffModelIsNotHeld(t *testing.T) {
	var on atomic.Bool
	replicas := func(o *Options) {
		o.Replicas = func(model string, namespaces []string) (string, bool) {
			if !on.Load() {
				return "the model is switched off: Deployment ml/llama is scaled to 0 and no HPA scales it", true
			}
			return "no replica exists: HPA ml/llama scaled Deployment ml/llama to zero and scales it up on demand", false
		}
	}
	f := newFixture(t, "llama", nil, holding(10, 5*time.Second), replicas)
	r := f.send(t.Context(), completion)
	if r.status != http.StatusServiceUnavailable || r.code != codeNoReadyEndpoints || !strings.Contains(r.body, "switched off") || strings.Contains(r.body, "held") {
		t.Errorf("a switched-off model: %d %s, want 503 %s naming why, not held", r.status, r.body, codeNoReadyEndpoints)
	}
	if n := f.histogramCount("capstan_router_hold_duration_seconds", map[string]string{"model": "llama", "outcome": "timeout"}); n != 0 {
		t.Errorf("%d holds counted for a switched-off model", n)
	}
	// So is a request for an adapter the switched-off model declares.
	f.declare("llama", "- {name: sql, source: /adapters/sql}", nil)
	r = f.send(t.Context(), `{"model":"sql","prompt":"x"}`)
	if r.status != http.StatusServiceUnavailable || !strings.Contains(r.body, "LoRA adapter sql of model llama is declared") ||
		!strings.Contains(r.body, "switched off") || strings.Contains(r.body, "held") {
		t.Errorf("an adapter of a switched-off model: %d %s, want 503 naming both, not held", r.status, r.body)
	}
	on.Store(true)
	results := f.sendAll(t.Context(), 1)
	waitFor(t, "the request held", func() bool { return f.handler.opts.Holds.Len("llama") == 1 })
	f.setBackends("llama", []backend{startBackend(t, "a", ok)})
	if r := <-results; r.status != http.StatusOK {
		t.Errorf("a held request once a replica is Ready: %d %s", r.status, r.body)
	}
}
