package route

import (
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/router/balance"
	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/health"
	"github.com/capstan-dev/capstan/router/inferencepool"
)

func key(name string) types.NamespacedName { return types.NamespacedName{Namespace: "ns", Name: name} }

func svc(name, model string, eps ...discovery.Endpoint) *discovery.Service {
	return &discovery.Service{Key: key(name), Labels: map[string]string{"capstan.dev/model": model}, Port: "http", Endpoints: eps}
}

func ready(addr, pod string) discovery.Endpoint {
	return discovery.Endpoint{Address: addr, Pod: key(pod), Ready: true}
}

func poolAddrs(m *Model) []string {
	var out []string
	for _, e := range m.Pool.Endpoints() {
		out = append(out, e.Address+"="+e.Pod)
	}
	return out
}

func TestModelsPoolTheirServices(t *testing.T) {
	b := NewBuilder(health.NewRegistry(health.EjectionPolicy{}), Options{})
	b.ServiceChanged(key("llama-a"), svc("llama-a", "llama",
		ready("198.18.0.2:8000", "a2"), ready("198.18.0.1:8000", "a1"),
		discovery.Endpoint{Address: "198.18.0.3:8000", Pod: key("a3")}))
	b.ServiceChanged(key("llama-b"), svc("llama-b", "llama",
		ready("198.18.0.1:8000", "a1"), // the same pod behind a second Service
		discovery.Endpoint{Address: "198.18.0.4:8000", Pod: key("b4"), Terminating: true}))
	b.ServiceChanged(key("qwen"), svc("qwen", "qwen", ready("198.18.1.1:8000", "q")))

	tab := b.Table()
	m := tab.Lookup("llama")
	if m == nil {
		t.Fatal("model llama not found")
	}
	if diff := cmp.Diff([]string{"198.18.0.1:8000=ns/a1", "198.18.0.2:8000=ns/a2"}, poolAddrs(m)); diff != "" {
		t.Errorf("pool (-want +got):\n%s", diff)
	}
	if m.Total != 4 || m.Ready != 2 || m.NotReady != 1 || m.Terminating != 1 {
		t.Errorf("counts total=%d ready=%d notReady=%d terminating=%d, want 4 2 1 1", m.Total, m.Ready, m.NotReady, m.Terminating)
	}
	if diff := cmp.Diff([]types.NamespacedName{key("llama-a"), key("llama-b")}, m.Services); diff != "" {
		t.Errorf("services (-want +got):\n%s", diff)
	}
	var names []string
	for _, m := range tab.Models() {
		names = append(names, m.Name)
	}
	if diff := cmp.Diff([]string{"llama", "qwen"}, names); diff != "" {
		t.Errorf("models (-want +got):\n%s", diff)
	}
	if tab.Lookup("mistral") != nil {
		t.Error("an unknown model was found")
	}
}

func TestUnavailableMessage(t *testing.T) {
	b := NewBuilder(health.NewRegistry(health.EjectionPolicy{}), Options{})
	b.ServiceChanged(key("llama"), svc("llama", "llama-3-8b",
		discovery.Endpoint{Address: "198.18.0.1:8000"},
		discovery.Endpoint{Address: "198.18.0.2:8000"},
		discovery.Endpoint{Address: "198.18.0.3:8000", Terminating: true}))
	m := b.Table().Lookup("llama-3-8b")
	want := "model llama-3-8b has 0 ready of 3 endpoints: 2 not ready, 1 terminating"
	if got := m.Unavailable(); got != want {
		t.Errorf("got %q\nwant %q", got, want)
	}
	b.ServiceChanged(key("llama"), svc("llama", "llama-3-8b"))
	want = "model llama-3-8b has 0 ready of 0 endpoints: no endpoints in the EndpointSlices of Service ns/llama"
	if got := b.Table().Lookup("llama-3-8b").Unavailable(); got != want {
		t.Errorf("got %q\nwant %q", got, want)
	}
	noPort := svc("llama", "llama-3-8b")
	noPort.Problem = "Service ns/llama has no TCP port"
	b.ServiceChanged(key("llama"), noPort)
	want = "model llama-3-8b has 0 ready of 0 endpoints: no endpoints in the EndpointSlices of Service ns/llama, Service ns/llama has no TCP port"
	if got := b.Table().Lookup("llama-3-8b").Unavailable(); got != want {
		t.Errorf("got %q\nwant %q", got, want)
	}
}

// Host state (in-flight counts, ejections) follows the address through
// endpoint changes, and is released when no Service holds the address.
func TestHostStateSurvivesUpdates(t *testing.T) {
	reg := health.NewRegistry(health.EjectionPolicy{Base: time.Minute, Max: time.Minute})
	b := NewBuilder(reg, Options{})
	b.ServiceChanged(key("m"), svc("m", "m", ready("198.18.0.1:8000", "p1")))
	first := b.Table().Lookup("m")
	e := &first.Pool.Endpoints()[0]
	if !first.Pool.Admit() || !first.Pool.Acquire(e) {
		t.Fatal("Admit or Acquire failed")
	}
	e.Host.Fail()

	b.ServiceChanged(key("m"), svc("m", "m", ready("198.18.0.1:8000", "p1"), ready("198.18.0.2:8000", "p2")))
	second := b.Table().Lookup("m")
	if second == first {
		t.Fatal("the model was not rebuilt")
	}
	h := second.Pool.Endpoints()[0].Host
	if h != e.Host || h.InFlight() != 1 || !h.Ejected() {
		t.Errorf("host state lost across an update: same=%v inflight=%d ejected=%v", h == e.Host, h.InFlight(), h.Ejected())
	}
	if second.Pool.InFlight() != 1 {
		t.Errorf("model in-flight count %d after an update, want 1", second.Pool.InFlight())
	}
	// A request from the old generation finishes.
	first.Pool.Release(e)
	first.Pool.Done()
	if h.InFlight() != 0 || second.Pool.InFlight() != 0 {
		t.Errorf("after release: host %d, model %d in flight", h.InFlight(), second.Pool.InFlight())
	}

	b.ServiceChanged(key("m"), nil)
	if b.Table().Lookup("m") != nil {
		t.Error("a model without Services is still listed")
	}
	if reg.Len() != 0 {
		t.Errorf("%d hosts still held after the Service went", reg.Len())
	}
}

func TestRelabelledServiceMovesModels(t *testing.T) {
	b := NewBuilder(health.NewRegistry(health.EjectionPolicy{}), Options{BuildRing: true})
	b.ServiceChanged(key("s"), svc("s", "old", ready("198.18.0.1:8000", "p")))
	old := b.Table()
	b.ServiceChanged(key("s"), svc("s", "new", ready("198.18.0.1:8000", "p")))
	if b.Table().Lookup("old") != nil || b.Table().Lookup("new") == nil {
		t.Error("relabelling the Service did not move it to the new model")
	}
	if old.Lookup("old") == nil {
		t.Error("a published table changed")
	}
	unlabelled := svc("s", "")
	b.ServiceChanged(key("s"), unlabelled)
	if len(b.Table().Models()) != 0 {
		t.Error("a Service without a model label is routed")
	}
}

func TestBackendsFollowTheirService(t *testing.T) {
	reg := health.NewRegistry(health.EjectionPolicy{})
	b := NewBuilder(reg, Options{})
	echo := &discovery.Service{Key: key("echo"), Port: "http", Ports: []discovery.Port{
		{Name: "http", Number: 8080, Endpoints: []discovery.Endpoint{ready("198.18.0.1:3000", "e1"), {Address: "198.18.0.2:3000", Pod: key("e2")}}},
		{Name: "h2c", Number: 8081, Endpoints: []discovery.Endpoint{ready("198.18.0.1:3001", "e1")}},
	}}
	b.ServiceChanged(key("echo"), echo)
	if len(b.Table().Models()) != 0 {
		t.Fatal("a Service without a model label became a model")
	}
	v1 := BackendKey{Service: key("echo"), Port: 8080}
	other := BackendKey{Service: key("echo"), Port: 8081}
	missing := BackendKey{Service: key("later"), Port: 80}
	noPort := BackendKey{Service: key("echo"), Port: 9999}
	got := b.SyncBackends([]BackendKey{v1, other, missing, noPort})
	st := got[v1].Load()
	if st.Pool.Len() != 1 || st.Pool.Endpoints()[0].Address != "198.18.0.1:3000" || st.Total != 2 || st.NotReady != 1 {
		t.Errorf("backend %s: pool %d, total %d, not ready %d", v1, st.Pool.Len(), st.Total, st.NotReady)
	}
	if a := got[other].Load().Pool.Endpoints()[0].Address; a != "198.18.0.1:3001" {
		t.Errorf("port 8081 resolved to %s", a)
	}
	if m := got[missing].Load().Missing; m != "Service ns/later not found" {
		t.Errorf("missing Service: %q", m)
	}
	if m := got[noPort].Load().Missing; m != "Service ns/echo has no TCP port 9999" {
		t.Errorf("missing port: %q", m)
	}

	// The same Backend lives on, and its pool follows the Service.
	laterEps := []discovery.Endpoint{ready("198.18.0.9:8000", "l")}
	b.ServiceChanged(key("later"), &discovery.Service{Key: key("later"), Port: "http", Labels: map[string]string{"capstan.dev/model": "m"},
		Endpoints: laterEps, Ports: []discovery.Port{{Name: "http", Number: 80, Endpoints: laterEps}}})
	again := b.SyncBackends([]BackendKey{v1, missing})
	if again[missing] != got[missing] {
		t.Error("a kept backend was replaced")
	}
	if st := again[missing].Load(); st.Pool.Len() != 1 || st.Model != "m" {
		t.Errorf("the backend did not follow its Service: %d endpoints, model %q", st.Pool.Len(), st.Model)
	}
	// Dropped backends release their hosts; the model keeps its own.
	b.SyncBackends(nil)
	b.ServiceChanged(key("echo"), nil)
	if reg.Len() != 1 {
		t.Errorf("%d hosts held, want only the model's", reg.Len())
	}
	b.ServiceChanged(key("later"), nil)
	if reg.Len() != 0 {
		t.Errorf("%d hosts held after every Service went", reg.Len())
	}
}

// A pool backend follows its InferencePool's snapshots, not a Service's of
// the same name, and releases its hosts when the pool goes.
func TestBackendsFollowTheirPool(t *testing.T) {
	reg := health.NewRegistry(health.EjectionPolicy{})
	b := NewBuilder(reg, Options{})
	k := BackendKey{Pool: key("llama")}
	got := b.SyncBackends([]BackendKey{k})[k]
	if st := got.Load(); st.Missing != "InferencePool ns/llama not found" || st.Pool.Len() != 0 {
		t.Errorf("before its snapshot: missing %q, %d endpoints", st.Missing, st.Pool.Len())
	}
	eps := []discovery.Endpoint{ready("198.18.0.1:8000", "p1"), {Address: "198.18.0.2:8000", Pod: key("p2")},
		{Address: "198.18.0.3:8000", Pod: key("p3"), Terminating: true}}
	b.PoolChanged(key("llama"), &inferencepool.Pool{Key: key("llama"), Endpoints: eps})
	// A Service with the pool's name is another backend.
	b.ServiceChanged(key("llama"), &discovery.Service{Key: key("llama"), Port: "http", Ports: []discovery.Port{{Name: "http", Number: 8000}}})
	st := got.Load()
	if st.Pool.Len() != 1 || st.Pool.Endpoints()[0].Pod != "ns/p1" || st.Total != 3 || st.NotReady != 1 || st.Terminating != 1 || st.EndpointPicker != "" {
		t.Errorf("pool backend: %d routable, total %d, not ready %d, terminating %d, picker %q", st.Pool.Len(), st.Total, st.NotReady, st.Terminating, st.EndpointPicker)
	}
	if reg.Len() != 1 {
		t.Errorf("%d hosts held, want the one routable endpoint's", reg.Len())
	}
	b.PoolChanged(key("llama"), &inferencepool.Pool{Key: key("llama"), Endpoints: eps[1:], EndpointPicker: "ns/epp:9002", FailOpen: true})
	if st := got.Load(); st.Pool.Len() != 0 || st.EndpointPicker != "ns/epp:9002" || !st.FailOpen {
		t.Errorf("pool with a picker: %d routable, picker %q, fail open %v", st.Pool.Len(), st.EndpointPicker, st.FailOpen)
	}
	if msg := got.Load().Unavailable(k); msg != "backend InferencePool ns/llama has 0 ready of 2 endpoints: 1 not ready, 1 terminating" {
		t.Errorf("Unavailable: %q", msg)
	}
	// A policy of its own, named by its annotation; a name that is no
	// policy is the router's.
	b.PoolChanged(key("llama"), &inferencepool.Pool{Key: key("llama"), Endpoints: eps, Balancer: "session-affinity"})
	if st := got.Load(); st.Balancer != balance.SessionAffinity {
		t.Errorf("pool choosing session-affinity: balancer %q", st.Balancer)
	}
	b.PoolChanged(key("llama"), &inferencepool.Pool{Key: key("llama"), Endpoints: eps, Balancer: "fastest"})
	if st := got.Load(); st.Balancer != "" {
		t.Errorf("pool choosing no policy: balancer %q", st.Balancer)
	}
	b.PoolChanged(key("llama"), nil)
	if st := got.Load(); st.Missing != "InferencePool ns/llama not found" || reg.Len() != 0 {
		t.Errorf("after the pool went: missing %q, %d hosts held", st.Missing, reg.Len())
	}
}
