package proxy

import (
	"net/http"
	"testing"

	"github.com/capstan-dev/capstan/router/balance"
	"github.com/capstan-dev/capstan/router/health"
)

// A request for an adapter tells the balancer which adapter it is for, so
// that the load-aware policy sends it where the engine reports the adapter
// active, not where every slot holds another one; a request for the base
// model is balanced as before.
func TestAdapterRequestsPreferWhereItIsActive(t *testing.T) {
	a, b, c := startBackend(t, "a", ok), startBackend(t, "b", ok), startBackend(t, "c", ok)
	f := newFixture(t, "llama", []backend{a, b, c}, func(o *Options) {
		o.Balancing = Balancing{Policy: balance.LoadAware, Selector: balance.LoadAwareSelection{
			QueueWeight: balance.DefaultQueueWeight, KVCacheWeight: balance.DefaultKVCacheWeight, LoadFactor: balance.DefaultLoadFactor}}
	})
	for _, x := range []backend{a, b, c} {
		f.builder.AdaptersChanged(x.addr, []string{"sql"})
	}
	for _, e := range f.builder.Table().Lookup("sql").Pool.Endpoints() {
		switch e.Address {
		case b.addr:
			e.Host.SetLoRA(health.NewLoRAState([]string{"chat"}, []string{"sql"}, 1))
		default:
			e.Host.SetLoRA(health.NewLoRAState([]string{"chat", "summary"}, nil, 2))
		}
	}
	const n = 20
	for range n {
		if resp, body := f.post("/v1/completions", `{"model":"sql","prompt":"x"}`); resp.StatusCode != http.StatusOK {
			t.Fatalf("adapter request: %d %s", resp.StatusCode, body)
		}
	}
	if a.hits.Load() != 0 || b.hits.Load() != n || c.hits.Load() != 0 {
		t.Errorf("requests for sql reached a=%d b=%d c=%d; want all on b, where sql waits", a.hits.Load(), b.hits.Load(), c.hits.Load())
	}
	for range 3 * n {
		if resp, body := f.post("/v1/completions", `{"model":"llama","prompt":"x"}`); resp.StatusCode != http.StatusOK {
			t.Fatalf("base model request: %d %s", resp.StatusCode, body)
		}
	}
	if a.hits.Load() == 0 || c.hits.Load() == 0 {
		t.Errorf("requests for llama reached a=%d b=%d c=%d; want them spread", a.hits.Load(), b.hits.Load()-n, c.hits.Load())
	}
}
