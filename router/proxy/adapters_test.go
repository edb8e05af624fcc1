package proxy

import (
	"encoding/json"
	"net/http"
	"testing"

	"github.com/google/go-cmp/cmp"
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
