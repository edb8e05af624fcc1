package engineload

import (
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/scrape"
	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/health"
	"github.com/capstan-dev/capstan/router/route"
)

type fakeSource map[string]Sample

func (f fakeSource) Latest(pod types.NamespacedName) (Sample, bool) {
	l, ok := f[pod.String()]
	return l, ok
}

func TestFeederCopiesFreshLoadsIntoHosts(t *testing.T) {
	b := route.NewBuilder(health.NewRegistry(health.EjectionPolicy{}), route.Options{})
	key := types.NamespacedName{Namespace: "ns", Name: "m"}
	b.ServiceChanged(key, &discovery.Service{Key: key, Labels: map[string]string{"capstan.dev/model": "m"}, Endpoints: []discovery.Endpoint{
		{Address: "198.18.0.1:8000", Pod: types.NamespacedName{Namespace: "ns", Name: "a"}, Ready: true},
		{Address: "198.18.0.2:8000", Pod: types.NamespacedName{Namespace: "ns", Name: "b"}, Ready: true},
		{Address: "198.18.0.3:8000", Ready: true}, // no pod named: never a load
	}})
	lora := health.NewLoRAState([]string{"x"}, nil, 2)
	src := fakeSource{"ns/a": {Load: health.EngineLoad{Waiting: 3, KVCacheUsage: 0.5}, LoRA: lora}}
	f := &Feeder{Source: src, Table: b.Table, Interval: time.Second}
	f.Sync()
	eps := b.Table().Lookup("m").Pool.Endpoints()
	if l := eps[0].Host.EngineLoad(); l == nil || *l != (health.EngineLoad{Waiting: 3, KVCacheUsage: 0.5}) {
		t.Errorf("pod a's load = %+v", l)
	}
	if eps[0].Host.LoRA() != lora {
		t.Errorf("pod a's LoRA state = %+v", eps[0].Host.LoRA())
	}
	if eps[1].Host.EngineLoad() != nil || eps[2].Host.EngineLoad() != nil || eps[1].Host.LoRA() != nil || eps[2].Host.LoRA() != nil {
		t.Error("a pod without a sample got a load or a LoRA state")
	}
	first := eps[0].Host.EngineLoad()
	f.Sync()
	if eps[0].Host.EngineLoad() != first {
		t.Error("an unchanged load was replaced")
	}
	delete(src, "ns/a") // the sample went stale
	f.Sync()
	if eps[0].Host.EngineLoad() != nil || eps[0].Host.LoRA() != nil {
		t.Error("a stale load or LoRA state was kept")
	}
}

func TestObserverServesFreshSamplesOnly(t *testing.T) {
	c := catalogue.Builtin()
	o := NewObserver(c, time.Minute)
	pod := types.NamespacedName{Namespace: "ns", Name: "a"}
	v := c.NewValues()
	set := func(name string, x float64) {
		id, ok := c.ID(name)
		if !ok {
			t.Fatalf("the catalogue has no %s", name)
		}
		v.Has[id], v.Scalar[id] = true, x
	}
	set(catalogue.RequestsWaiting, 4)
	set(catalogue.RequestsRunning, 2) // no KV-cache usage: TGI's case
	target := scrape.Target{Key: pod}

	if _, ok := o.Latest(pod); ok {
		t.Fatal("a pod never observed has a load")
	}
	o.Observe(target, time.Now(), v)
	if l, ok := o.Latest(pod); !ok || l != (Sample{Load: health.EngineLoad{Waiting: 4, Running: 2}}) {
		t.Errorf("Latest = %+v, %v; want waiting 4, running 2, KV cache 0", l, ok)
	}
	o.Observe(target, time.Now().Add(-2*time.Minute), v)
	if l, ok := o.Latest(pod); ok {
		t.Errorf("a sample older than the maximum age is served: %+v", l)
	}
	o.Observe(target, time.Now(), v)
	o.Forget(pod)
	if _, ok := o.Latest(pod); ok {
		t.Error("a forgotten pod has a load")
	}
}

func TestWantsTheBalancersMetricsOnly(t *testing.T) {
	var wanted []string
	for _, m := range catalogue.Builtin().Metrics() {
		if Wants(m) {
			wanted = append(wanted, m.Name)
		}
	}
	want := []string{catalogue.RequestsRunning, catalogue.RequestsWaiting, catalogue.KVCacheUsage,
		catalogue.LoRAAdapterRunningPods, catalogue.LoRAAdapterWaitingPods, catalogue.LoRAMaxAdapters}
	if !cmp.Equal(want, wanted, cmpopts.SortSlices(func(a, b string) bool { return a < b })) {
		t.Errorf("Wants picks %v; want %v", wanted, want)
	}
}
