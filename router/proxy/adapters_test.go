package proxy

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/lora"
)

// A request naming a LoRA adapter goes only to the endpoints of its base
// model that report it, is counted under the base model's name, and the
// adapter is listed with its parent and where it is loaded; once no
// endpoint reports it, it is unknown (404).
func TestAdapterRequestsGoWhereItIsLoaded(t *testing.T) {
	a, b, c := startBackend(t, "a", ok), startBackend(t, "b", ok), startBackend(t, "c", ok)
	f := newFixture(t, "llama", []backend{a, b, c})
	f.builder.AdaptersChanged(a.addr, []string{"sql"})
	f.builder.AdaptersChanged(c.addr, []string{"sql"})

	const n = 20
	for range n {
		if resp, body := f.post("/v1/completions", `{"model":"sql","prompt":"x"}`); resp.StatusCode != http.StatusOK {
			t.Fatalf("adapter request: %d %s", resp.StatusCode, body)
		}
	}
	if a.hits.Load()+c.hits.Load() != n || b.hits.Load() != 0 {
		t.Errorf("adapter requests reached a=%d b=%d c=%d; b has not loaded it", a.hits.Load(), b.hits.Load(), c.hits.Load())
	}
	if got := f.metric("capstan_router_requests_total", map[string]string{"model": "llama", "code": "200", "balancer": "round-robin"}); got != n {
		t.Errorf("requests counted under the base model: %v, want %d", got, n)
	}

	resp, err := http.Get(f.url + "/v1/models/sql")
	if err != nil {
		t.Fatal(err)
	}
	var o modelObject
	err = json.NewDecoder(resp.Body).Decode(&o)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	want := modelObject{ID: "sql", Object: "model", OwnedBy: "capstan", Endpoints: endpointCounts{Ready: 2, Total: 2},
		Services: []string{"ns/llama"}, Owner: "ns", Parent: "llama", LoadedOn: []string{"ns/a", "ns/c"}}
	if a.addr > c.addr {
		want.LoadedOn = []string{"ns/c", "ns/a"}
	}
	if diff := cmp.Diff(want, o); diff != "" {
		t.Errorf("GET /v1/models/sql (-want +got):\n%s", diff)
	}

	f.builder.AdaptersChanged(a.addr, nil)
	f.builder.AdaptersChanged(c.addr, nil)
	if resp, body := f.post("/v1/completions", `{"model":"sql","prompt":"x"}`); resp.StatusCode != http.StatusNotFound {
		t.Errorf("an adapter loaded nowhere: %d %s", resp.StatusCode, body)
	}
}

func (f *fixture) declare(model, declaration string, backends []backend) {
	var eps []discovery.Endpoint
	for _, b := range backends {
		eps = append(eps, discovery.Endpoint{Address: b.addr, Pod: types.NamespacedName{Namespace: "ns", Name: b.pod}, Ready: b.ready})
	}
	key := types.NamespacedName{Namespace: "ns", Name: model}
	f.builder.ServiceChanged(key, &discovery.Service{Key: key, Labels: map[string]string{"capstan.dev/model": model}, Port: "http",
		Endpoints: eps, Annotations: map[string]string{lora.Annotation: declaration}})
}

// A request for an adapter its model declares, while no Ready endpoint
// lists it, is held, counts as the model's demand, and goes where the
// adapter appears; one held past the hold timeout is answered 503 saying
// what is happening. Without holding it is answered 503 at once, and a
// name nobody declared or loaded stays unknown.
func TestDeclaredAdapterHeldWhileLoading(t *testing.T) {
	a, b := startBackend(t, "a", ok), startBackend(t, "b", ok)
	f := newFixture(t, "llama", nil, holding(10, 500*time.Millisecond))
	f.declare("llama", "- {name: sql, source: /adapters/sql}", []backend{a, b})
	results := make(chan outcome, 1)
	go func() { results <- f.send(t.Context(), `{"model":"sql","prompt":"x"}`) }()
	waitFor(t, "the sql request held", func() bool { return f.handler.opts.Holds.Len("sql") == 1 })
	if d := f.metric("capstan_router_model_demand", map[string]string{"model": "llama"}); d != 1 {
		t.Errorf("llama's demand while a request for its adapter is held = %v, want 1", d)
	}
	f.builder.AdaptersChanged(b.addr, []string{"sql"})
	if r := <-results; r.status != http.StatusOK || r.header.Get("X-Capstan-Held") == "" {
		t.Errorf("the held adapter request: %d %s %v", r.status, r.body, r.header)
	}
	if a.hits.Load() != 0 || b.hits.Load() != 1 {
		t.Errorf("requests reached a=%d b=%d; only b lists sql", a.hits.Load(), b.hits.Load())
	}

	f.builder.AdaptersChanged(b.addr, nil)
	r := f.send(t.Context(), `{"model":"sql","prompt":"x"}`)
	if r.status != http.StatusServiceUnavailable || !strings.Contains(r.body,
		"LoRA adapter sql of model llama is declared, but none of the model's 2 ready endpoints reports it loaded yet") {
		t.Errorf("held past the timeout: %d %s", r.status, r.body)
	}
	if r := f.send(t.Context(), `{"model":"chat","prompt":"x"}`); r.status != http.StatusNotFound {
		t.Errorf("an adapter nobody declared or loaded: %d %s", r.status, r.body)
	}

	g := newFixture(t, "llama", nil)
	g.declare("llama", "- {name: sql, source: /adapters/sql}", []backend{a})
	start := time.Now()
	if r := g.send(t.Context(), `{"model":"sql","prompt":"x"}`); r.status != http.StatusServiceUnavailable || !strings.Contains(r.body, "is declared") ||
		time.Since(start) > 5*time.Second {
		t.Errorf("without holding: %d %s after %s", r.status, r.body, time.Since(start))
	}
}
