package loader

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/flowcontrol"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/health"
	"github.com/capstan-dev/capstan/router/lora"
	"github.com/capstan-dev/capstan/router/route"
)

// engines are model servers in memory: what each lists, which refuse
// loads, and every call made.
type engines struct {
	mu     sync.Mutex
	listed map[string][]string // addresses that have answered a model list
	refuse map[string]bool     // loads fail
	liar   map[string]bool     // loads answer 200 and load nothing
	calls  []string
	routes *route.Builder
}

func (e *engines) Loaded(addr string) ([]string, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	l, ok := e.listed[addr]
	return slices.Clone(l), ok
}

func (e *engines) Refresh(context.Context, string) error { return nil }

func (e *engines) Load(_ context.Context, addr, name, source string) error {
	e.mu.Lock()
	e.calls = append(e.calls, "load "+name+" "+source+" "+addr)
	switch {
	case e.refuse[addr]:
		e.mu.Unlock()
		return errors.New("POST /v1/load_lora_adapter answered 400 Bad Request: no such file")
	case e.liar[addr]:
		e.mu.Unlock()
		return nil
	}
	e.listed[addr] = append(e.listed[addr], name)
	l := slices.Clone(e.listed[addr])
	e.mu.Unlock()
	e.routes.AdaptersChanged(addr, l)
	return nil
}

func (e *engines) Unload(_ context.Context, addr, name string) error {
	e.mu.Lock()
	e.calls = append(e.calls, "unload "+name+" "+addr)
	e.listed[addr] = slices.DeleteFunc(e.listed[addr], func(s string) bool { return s == name })
	l := slices.Clone(e.listed[addr])
	e.mu.Unlock()
	e.routes.AdaptersChanged(addr, l)
	return nil
}

func (e *engines) take() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	c := e.calls
	e.calls = nil
	slices.Sort(c)
	return c
}

type events struct {
	mu  sync.Mutex
	log []string
}

func (ev *events) Eventf(svc types.NamespacedName, _ types.UID, eventType, reason, format string, args ...any) {
	ev.mu.Lock()
	defer ev.mu.Unlock()
	ev.log = append(ev.log, fmt.Sprintf("%s %s %s: %s", svc, eventType, reason, fmt.Sprintf(format, args...)))
}

func (ev *events) take() []string {
	ev.mu.Lock()
	defer ev.mu.Unlock()
	l := ev.log
	ev.log = nil
	slices.Sort(l)
	return l
}

type fixture struct {
	routes  *route.Builder
	engines *engines
	events  *events
	clock   *clocktesting.FakeClock
	loader  *Loader
	reg     *prometheus.Registry
	leading bool
}

func newFixture() *fixture {
	f := &fixture{routes: route.NewBuilder(health.NewRegistry(health.EjectionPolicy{}), route.Options{}), events: &events{},
		clock: clocktesting.NewFakeClock(time.Date(2026, 12, 8, 0, 0, 0, 0, time.UTC)), reg: prometheus.NewRegistry(), leading: true}
	f.engines = &engines{listed: map[string][]string{}, refuse: map[string]bool{}, liar: map[string]bool{}, routes: f.routes}
	f.loader = New(Options{Interval: time.Second, Timeout: time.Second, Table: f.routes.Table, Engines: f.engines,
		Leading: func() bool { return f.leading }, Recorder: f.events,
		Backoff: flowcontrol.NewFakeBackOff(2*time.Second, time.Minute, f.clock)}, f.reg)
	return f
}

// service publishes the llama Service with endpoints pods (name=IP
// 198.18.0.<n>) and the declaration, and has every endpoint answer a model
// list.
func (f *fixture) service(declaration string, pods ...int) {
	var eps []discovery.Endpoint
	for _, n := range pods {
		addr := fmt.Sprintf("198.18.0.%d:8000", n)
		eps = append(eps, discovery.Endpoint{Address: addr, Pod: types.NamespacedName{Namespace: "ns", Name: fmt.Sprintf("llama-%d", n)}, Ready: true})
		f.engines.mu.Lock()
		if _, ok := f.engines.listed[addr]; !ok {
			f.engines.listed[addr] = nil
		}
		f.engines.mu.Unlock()
	}
	s := &discovery.Service{Key: types.NamespacedName{Namespace: "ns", Name: "llama"}, Labels: map[string]string{"capstan.dev/model": "llama"},
		Port: "http", Endpoints: eps}
	if declaration != "" {
		s.Annotations = map[string]string{lora.Annotation: declaration}
	}
	f.routes.ServiceChanged(s.Key, s)
}

func (f *fixture) servedBy(adapter string) []string {
	m := f.routes.Table().Lookup(adapter)
	if m == nil {
		return nil
	}
	var addrs []string
	for _, e := range m.Pool.Endpoints() {
		addrs = append(addrs, e.Address)
	}
	return addrs
}

// A declared adapter is loaded on every Ready endpoint that has answered a
// model list, once; a pod that replaces another gets it too, and the one
// that left is no longer counted; replicas bounds the endpoints chosen.
func TestLoadsDeclaredAdapters(t *testing.T) {
	f := newFixture()
	ctx := context.Background()
	f.service("- {name: sql, source: /adapters/sql}\n- {name: chat, source: /adapters/chat, replicas: 1}\n", 1, 2)
	f.loader.Sync(ctx)
	calls := f.engines.take()
	want := []string{"load sql /adapters/sql 198.18.0.1:8000", "load sql /adapters/sql 198.18.0.2:8000"}
	if len(calls) != 3 || !slices.Equal(slices.DeleteFunc(slices.Clone(calls), func(c string) bool { return strings.HasPrefix(c, "load chat") }), want) {
		t.Fatalf("first pass called %q; want sql on both and chat on one", calls)
	}
	if diff := cmp.Diff([]string{"198.18.0.1:8000", "198.18.0.2:8000"}, f.servedBy("sql")); diff != "" {
		t.Errorf("sql served by (-want +got):\n%s", diff)
	}
	if got := len(f.servedBy("chat")); got != 1 {
		t.Errorf("chat served by %d endpoints, want 1", got)
	}
	if ev := f.events.take(); len(ev) != 3 || !strings.Contains(ev[2], "ns/llama Normal LoRAAdapterLoaded: Loaded LoRA adapter sql of model llama on pod ns/llama-2 (198.18.0.2:8000)") {
		t.Errorf("events %q", ev)
	}
	f.loader.Sync(ctx)
	if calls := f.engines.take(); len(calls) != 0 {
		t.Errorf("a second pass called %q", calls)
	}

	// Pod 2 is replaced by pod 3, which has not answered a model list yet:
	// sql waits for it; chat, if it was on pod 2, goes to pod 1.
	decl := "- {name: sql, source: /adapters/sql}\n- {name: chat, source: /adapters/chat, replicas: 1}\n"
	chatOn := f.servedBy("chat")[0]
	f.service(decl, 1, 3)
	f.engines.mu.Lock()
	delete(f.engines.listed, "198.18.0.3:8000")
	f.engines.mu.Unlock()
	f.loader.Sync(ctx)
	want = nil
	if chatOn == "198.18.0.2:8000" {
		want = []string{"load chat /adapters/chat 198.18.0.1:8000"}
	}
	if diff := cmp.Diff(want, f.engines.take()); diff != "" {
		t.Errorf("before pod 3 answers a model list, chat having been on %s (-want +got):\n%s", chatOn, diff)
	}
	f.engines.mu.Lock()
	f.engines.listed["198.18.0.3:8000"] = nil
	f.engines.mu.Unlock()
	f.loader.Sync(ctx)
	if diff := cmp.Diff([]string{"load sql /adapters/sql 198.18.0.3:8000"}, f.engines.take()); diff != "" {
		t.Errorf("once pod 3 has answered (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"198.18.0.1:8000", "198.18.0.3:8000"}, f.servedBy("sql")); diff != "" {
		t.Errorf("sql served by, after the replacement (-want +got):\n%s", diff)
	}
	if got := len(f.servedBy("chat")); got != 1 {
		t.Errorf("chat served by %d endpoints after the replacement, want 1", got)
	}
	loads := 4
	if chatOn == "198.18.0.2:8000" {
		loads = 5
	}
	if err := testutil.CollectAndCompare(f.reg, strings.NewReader(fmt.Sprintf(`
# HELP capstan_router_lora_adapter_calls_total Calls the leader made to engines to load or unload declared LoRA adapters, by operation and result (success once the engine's model list agrees).
# TYPE capstan_router_lora_adapter_calls_total counter
capstan_router_lora_adapter_calls_total{operation="load",result="success"} %d
# HELP capstan_router_lora_declared_adapter_endpoints Ready endpoints of each declared LoRA adapter's model by state: loaded (the engine lists it) and wanted (what the declaration asks for).
# TYPE capstan_router_lora_declared_adapter_endpoints gauge
capstan_router_lora_declared_adapter_endpoints{adapter="chat",model="llama",state="loaded"} 1
capstan_router_lora_declared_adapter_endpoints{adapter="chat",model="llama",state="wanted"} 1
capstan_router_lora_declared_adapter_endpoints{adapter="sql",model="llama",state="loaded"} 2
capstan_router_lora_declared_adapter_endpoints{adapter="sql",model="llama",state="wanted"} 2
`, loads))); err != nil {
		t.Error(err)
	}
}

// A failed load is tried again only after the endpoint's backoff, which
// grows, with a Warning Event each time; a load the engine acknowledged
// but does not list is a failure too. The other endpoints are not held up.
func TestFailedLoadsBackOff(t *testing.T) {
	f := newFixture()
	ctx := context.Background()
	f.engines.refuse["198.18.0.1:8000"] = true
	f.engines.liar["198.18.0.2:8000"] = true
	f.service("- {name: sql, source: /adapters/sql}\n", 1, 2, 3)
	f.loader.Sync(ctx)
	if diff := cmp.Diff([]string{"load sql /adapters/sql 198.18.0.1:8000", "load sql /adapters/sql 198.18.0.2:8000",
		"load sql /adapters/sql 198.18.0.3:8000"}, f.engines.take()); diff != "" {
		t.Fatalf("first pass (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"198.18.0.3:8000"}, f.servedBy("sql")); diff != "" {
		t.Errorf("sql served by (-want +got):\n%s", diff)
	}
	var warnings []string
	for _, e := range f.events.take() {
		if strings.Contains(e, "Warning LoRAAdapterLoadFailed") {
			warnings = append(warnings, e)
		}
	}
	slices.Sort(warnings)
	if len(warnings) != 2 || !strings.Contains(warnings[0], "on pod ns/llama-1 (198.18.0.1:8000): POST /v1/load_lora_adapter answered 400 Bad Request: no such file; trying again in 2s") ||
		!strings.Contains(warnings[1], "the engine answered 200 but its model list says otherwise") {
		t.Errorf("warnings %q", warnings)
	}

	f.clock.Step(time.Second)
	f.loader.Sync(ctx)
	if calls := f.engines.take(); len(calls) != 0 {
		t.Errorf("tried again within the backoff: %q", calls)
	}
	f.clock.Step(time.Second)
	f.loader.Sync(ctx)
	if calls := f.engines.take(); len(calls) != 2 {
		t.Errorf("after 2s: %q, want both tried again", calls)
	}
	// The second failure doubles the backoff.
	f.clock.Step(3 * time.Second)
	f.loader.Sync(ctx)
	if calls := f.engines.take(); len(calls) != 0 {
		t.Errorf("tried again 3s after the second failure: %q", calls)
	}
	f.engines.mu.Lock()
	f.engines.refuse["198.18.0.1:8000"] = false
	f.engines.mu.Unlock()
	f.clock.Step(time.Second)
	f.loader.Sync(ctx)
	if diff := cmp.Diff([]string{"load sql /adapters/sql 198.18.0.1:8000", "load sql /adapters/sql 198.18.0.2:8000"}, f.engines.take()); diff != "" {
		t.Errorf("4s after the second failure (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"198.18.0.1:8000", "198.18.0.3:8000"}, f.servedBy("sql")); diff != "" {
		t.Errorf("sql served by, once pod 1 loads (-want +got):\n%s", diff)
	}
}

// Only the leader calls engines, but every replica remembers what was
// declared: an adapter whose declaration goes while another replica leads
// is unloaded once this one leads, from every endpoint listing it, and then
// forgotten; one never declared is left alone.
func TestUnloadsRemovedAdapters(t *testing.T) {
	f := newFixture()
	ctx := context.Background()
	f.leading = false
	f.service("- {name: sql, source: /adapters/sql}\n- {name: chat, source: /adapters/chat}\n", 1, 2)
	for _, addr := range []string{"198.18.0.1:8000", "198.18.0.2:8000"} {
		f.engines.listed[addr] = []string{"chat", "mine", "sql"}
		f.routes.AdaptersChanged(addr, f.engines.listed[addr])
	}
	f.loader.Sync(ctx)
	f.service("- {name: chat, source: /adapters/chat}\n", 1, 2)
	f.loader.Sync(ctx)
	if calls := f.engines.take(); len(calls) != 0 {
		t.Fatalf("a replica that does not lead called %q", calls)
	}
	f.leading = true
	f.loader.Sync(ctx)
	if diff := cmp.Diff([]string{"unload sql 198.18.0.1:8000", "unload sql 198.18.0.2:8000"}, f.engines.take()); diff != "" {
		t.Errorf("unloads (-want +got):\n%s", diff)
	}
	if m := f.routes.Table().Lookup("sql"); m != nil {
		t.Errorf("sql after the unloads: %+v", m)
	}
	if m := f.routes.Table().Lookup("mine"); m == nil || m.Pool.Len() != 2 {
		t.Errorf("mine, never declared, is no longer served: %+v", m)
	}
	// Loaded again by hand once forgotten: left alone.
	f.loader.Sync(ctx)
	f.engines.listed["198.18.0.1:8000"] = append(f.engines.listed["198.18.0.1:8000"], "sql")
	f.loader.Sync(ctx)
	if calls := f.engines.take(); len(calls) != 0 {
		t.Errorf("after forgetting sql: %q", calls)
	}
}
