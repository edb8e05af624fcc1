// Package loop runs Capstan's closed loop end to end — router, metrics
// adapter, HPA, capstan-scheduler, readiness — and asserts on what `make
// demo` shows: scale-up under load to the capacity cap, replicas beyond it
// Pending with the cap as reason, traffic only to Ready pods, scale-down when
// the load stops, and zero client errors throughout.
package loop

import (
	"context"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2/ktesting"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/demo"
)

var testCluster *cluster.Cluster

func TestMain(m *testing.M) { os.Exit(cluster.RunTests(m, cluster.Config{}, &testCluster)) }

func TestClosedLoop(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()

	cfg := demo.Config{
		GPUNodes: 2, SlotsPerNode: 2, MaxReplicas: 3, // 4 slots for up to 6 replicas
		Clients: 16, Ramp: 5 * time.Second, Hold: 25 * time.Second,
		ScaleDownWindow: 3 * time.Second, ReadyAfter: 2 * time.Second,
		RouterAddr: "127.0.0.1:18080",
	}
	d, err := demo.Setup(ctx, testCluster, cfg, testWriter{t})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()

	// When each pod was first seen running, to check the router kept new
	// pods out while they were loading (ReadyAfter).
	pods := watchPods(ctx, t, cfg.Namespace)

	obsCtx, stopObserving := context.WithCancel(ctx)
	observed := make(chan struct{})
	go func() {
		defer close(observed)
		_ = d.Observe(obsCtx, 500*time.Millisecond, nil)
	}()
	if err := d.RunLoad(ctx); err != nil {
		t.Fatal(err)
	}
	err = testCluster.WaitFor(ctx, 2*time.Minute, "every model to scale back to one replica", func(context.Context) (bool, error) {
		return !d.Stats.Figures().ScaledDown.IsZero(), nil
	})
	if err == nil {
		err = d.RunBurst(ctx)
	}
	stopObserving()
	<-observed
	f := d.Stats.Figures()
	t.Logf("requests %d, client errors %d, peak bound model pods %d, peak per model %v",
		f.Requests, f.ClientErrors, f.PeakBound, f.PeakReplicas)
	t.Logf("load start → first scale-up decision %s, → first request served by a new pod %s, load end → scaled down %s",
		f.FirstScaleUp.Sub(f.LoadStart).Round(time.Millisecond), f.FirstNewPodServed.Sub(f.LoadStart).Round(time.Millisecond),
		f.ScaledDown.Sub(f.LoadEnd).Round(time.Millisecond))
	if err != nil {
		t.Error(err)
	}

	t.Logf("%s: at zero %s after the load started; %d requests from zero: first byte after %s, last %s; back at zero %s later (at most %d held)",
		d.Idle.Name, f.ZeroReached.Sub(f.LoadStart).Round(time.Millisecond), d.Burst,
		f.BurstFirstByte.Sub(f.BurstStart).Round(time.Millisecond), f.BurstEnd.Sub(f.BurstStart).Round(time.Millisecond),
		f.ZeroReturned.Sub(f.BurstEnd).Round(time.Millisecond), f.PeakHeld)
	if f.ZeroReached.IsZero() || f.BurstFirstByte.IsZero() || f.ZeroReturned.IsZero() {
		t.Errorf("the idle model: at zero %v, first byte of the burst %v, back at zero %v", f.ZeroReached, f.BurstFirstByte, f.ZeroReturned)
	}
	if f.ClientErrors != 0 {
		t.Errorf("%d client errors, e.g. %q", f.ClientErrors, f.ErrorSamples)
	}
	if f.Requests < 1000 {
		t.Errorf("only %d requests: the load did not run", f.Requests)
	}
	if f.FirstScaleUp.IsZero() || f.FirstNewPodServed.IsZero() {
		t.Errorf("no scale-up decision (%v) or no request served by a new pod (%v)", f.FirstScaleUp, f.FirstNewPodServed)
	}
	capacity := cfg.GPUNodes * cfg.SlotsPerNode
	if f.PeakBound != capacity {
		t.Errorf("at most %d model pods were bound at once, want the capacity %d", f.PeakBound, capacity)
	}
	capReasons := 0
	for reason, n := range f.PendingReasons {
		if strings.Contains(reason, "model slots") {
			capReasons += n
		} else {
			t.Errorf("a Pending pod's reason does not name the slot cap: %q", reason)
		}
	}
	if capReasons == 0 {
		t.Errorf("no replica waited Pending with the capacity cap as its reason (reasons: %v)", f.PendingReasons)
	}

	// The router sent nothing to a pod while it was still loading.
	for pod, arrivals := range d.Stats.Arrivals() {
		since, ok := pods.loading(pod)
		if !ok {
			continue
		}
		// kwok starts the readiness delay when the pod starts running,
		// a moment before the watch here reports it.
		loadingUntil := since.Add(cfg.ReadyAfter - 300*time.Millisecond)
		for _, at := range arrivals {
			if at.Before(loadingUntil) {
				t.Errorf("pod %s got a request %s after it started running, while loading (not Ready for %s)",
					pod, at.Sub(since).Round(time.Millisecond), cfg.ReadyAfter)
				break
			}
		}
	}
}

// podTimes records, per model pod, when a watch first saw it, first saw it
// Running with an IP but not yet Ready (loading), and first saw it Ready.
type podTimes struct {
	mu                      sync.Mutex
	created, running, ready map[types.NamespacedName]time.Time
}

func watchPods(ctx context.Context, t *testing.T, ns string) *podTimes {
	p := &podTimes{created: map[types.NamespacedName]time.Time{}, running: map[types.NamespacedName]time.Time{},
		ready: map[types.NamespacedName]time.Time{}}
	factory := informers.NewSharedInformerFactoryWithOptions(testCluster.Client, 0, informers.WithNamespace(ns),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = modelserver.ModelLabel }))
	informer := factory.Core().V1().Pods().Informer()
	note := func(obj any) {
		pod, ok := obj.(*corev1.Pod)
		if !ok {
			return
		}
		now, key := time.Now(), types.NamespacedName{Namespace: pod.Namespace, Name: pod.Name}
		first := func(m map[types.NamespacedName]time.Time) {
			if _, ok := m[key]; !ok {
				m[key] = now
			}
		}
		p.mu.Lock()
		defer p.mu.Unlock()
		first(p.created)
		switch {
		case modelserver.IsReady(pod):
			first(p.ready)
		case pod.Status.PodIP != "":
			first(p.running)
		}
	}
	if _, err := informer.AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: note, UpdateFunc: func(_, o any) { note(o) }}); err != nil {
		t.Fatal(err)
	}
	factory.Start(ctx.Done())
	t.Cleanup(factory.Shutdown)
	if !cache.WaitForCacheSync(ctx.Done(), informer.HasSynced) {
		t.Fatal("pod cache did not sync")
	}
	return p
}

// loading is when the pod was first seen Running and not Ready.
func (p *podTimes) loading(pod types.NamespacedName) (time.Time, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	at, ok := p.running[pod]
	return at, ok
}

// newest is the pod created last that turned Ready, and when it did both.
func (p *podTimes) newest() (created, ready time.Time, ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for key, c := range p.created {
		r, isReady := p.ready[key]
		if isReady && c.After(created) {
			created, ready, ok = c, r, true
		}
	}
	return created, ready, ok
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
