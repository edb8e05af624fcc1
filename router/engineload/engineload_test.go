package load

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/klog/v2/ktesting"

	"github.com/capstan-dev/capstan/metricsadapter/scrape"
	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/health"
	"github.com/capstan-dev/capstan/router/route"
)

type fakeSource map[string]health.Load

func (f fakeSource) Load(pod types.NamespacedName) (health.Load, bool) {
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
	src := fakeSource{"ns/a": {Waiting: 3, KVCacheUsage: 0.5}}
	f := &Feeder{Source: src, Table: b.Table, Interval: time.Second}
	f.Sync()
	eps := b.Table().Lookup("m").Pool.Endpoints()
	if l := eps[0].Host.Load(); l == nil || *l != (health.Load{Waiting: 3, KVCacheUsage: 0.5}) {
		t.Errorf("pod a's load = %+v", l)
	}
	if eps[1].Host.Load() != nil || eps[2].Host.Load() != nil {
		t.Error("a pod without a sample got a load")
	}
	first := eps[0].Host.Load()
	f.Sync()
	if eps[0].Host.Load() != first {
		t.Error("an unchanged load was replaced")
	}
	delete(src, "ns/a") // the sample went stale
	f.Sync()
	if eps[0].Host.Load() != nil {
		t.Error("a stale load was kept")
	}
}

type recordingSetter struct {
	mu      sync.Mutex
	targets []scrape.Target
}

func (r *recordingSetter) SetTargets(ts []scrape.Target) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.targets = slices.Clone(ts)
}

func (r *recordingSetter) keys() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, t := range r.targets {
		out = append(out, t.Key.String()+" "+t.URL)
	}
	slices.Sort(out)
	return out
}

func pod(name, ip string, ready bool) *corev1.Pod {
	status := corev1.ConditionFalse
	if ready {
		status = corev1.ConditionTrue
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, Labels: map[string]string{"capstan.dev/model": "m"}},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "engine", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8000}}}}},
		Status:     corev1.PodStatus{PodIP: ip, Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: status}}},
	}
}

func TestTargetsAreTheScrapableModelPods(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	client := fake.NewClientset(pod("a", "198.18.0.1", true), pod("b", "198.18.0.2", false), pod("c", "", true))
	setter := &recordingSetter{}
	targets, err := NewTargets(client, setter, nil)
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = targets.Run(ctx) }()
	waitFor(t, func() bool { return slices.Equal(setter.keys(), []string{"ns/a http://198.18.0.1:8000/metrics"}) })
	b := pod("b", "198.18.0.2", true)
	b.ResourceVersion = "2"
	if _, err := client.CoreV1().Pods("ns").Update(ctx, b, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		return slices.Equal(setter.keys(), []string{"ns/a http://198.18.0.1:8000/metrics", "ns/b http://198.18.0.2:8000/metrics"})
	})
	if err := client.CoreV1().Pods("ns").Delete(ctx, "a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return slices.Equal(setter.keys(), []string{"ns/b http://198.18.0.2:8000/metrics"}) })
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
