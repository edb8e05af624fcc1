package targets

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2/ktesting"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/metricsadapter/scrape"
)

// fakeScraper records the targets it is given.
type fakeScraper struct {
	mu      sync.Mutex
	targets map[types.NamespacedName]scrape.Target
}

func (f *fakeScraper) Upsert(t scrape.Target) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.targets[t.Key] = t
}

func (f *fakeScraper) Remove(key types.NamespacedName) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.targets, key)
}

func (f *fakeScraper) urls() map[string]string {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[string]string{}
	for k, t := range f.targets {
		out[k.Name] = t.URL
	}
	return out
}

func modelPod(name, ip string, ready bool, mutate ...func(*corev1.Pod)) *corev1.Pod {
	status := corev1.ConditionFalse
	if ready {
		status = corev1.ConditionTrue
	}
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ml", Name: name, Labels: map[string]string{modelserver.ModelLabel: "llama"}},
		Status:     corev1.PodStatus{PodIP: ip, Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: status}}},
	}
	for _, m := range mutate {
		m(p)
	}
	return p
}

func TestTargetsFollowScrapablePods(t *testing.T) {
	logger, ctx := ktesting.NewTestContext(t)
	client := fake.NewClientset(
		modelPod("ready", "10.0.0.1", true),
		modelPod("pending", "", false),
		modelPod("unready", "10.0.0.2", false),
		modelPod("bad-engine", "10.0.0.3", true, func(p *corev1.Pod) { p.Labels[modelserver.EngineLabel] = "llamacpp" }),
		modelPod("terminating", "10.0.0.4", true, func(p *corev1.Pod) { now := metav1.Now(); p.DeletionTimestamp = &now }),
		// Not a model server: the informer never lists it.
		&corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "ml", Name: "web"},
			Status: corev1.PodStatus{PodIP: "10.0.0.9", Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}}},
	)
	s := &fakeScraper{targets: map[types.NamespacedName]scrape.Target{}}
	informer := NewPodInformer(client, "")
	if err := AddEventHandler(logger, informer, s); err != nil {
		t.Fatal(err)
	}
	go informer.Run(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), informer.HasSynced) {
		t.Fatal("informer did not sync")
	}
	expect := func(what string, want map[string]string) {
		t.Helper()
		var got map[string]string
		err := wait.PollUntilContextTimeout(ctx, 10*time.Millisecond, 5*time.Second, true, func(context.Context) (bool, error) {
			got = s.urls()
			return cmp.Equal(want, got), nil
		})
		if err != nil {
			t.Fatalf("%s: targets (-want +got):\n%s", what, cmp.Diff(want, got))
		}
	}
	expect("at start, only the Ready pod with an IP", map[string]string{"ready": "http://10.0.0.1:8000/metrics"})

	pods := client.CoreV1().Pods("ml")
	update := func(p *corev1.Pod) {
		t.Helper()
		if _, err := pods.Update(ctx, p, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	update(modelPod("pending", "10.0.0.5", true, func(p *corev1.Pod) {
		p.Annotations = map[string]string{modelserver.MetricsPortAnnotation: "9090", modelserver.MetricsPathAnnotation: "/stats"}
	}))
	update(modelPod("ready", "10.0.0.1", false))
	expect("a pod that became Ready is added; one that lost readiness removed",
		map[string]string{"pending": "http://10.0.0.5:9090/stats"})

	if err := pods.Delete(ctx, "pending", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	expect("a deleted pod is removed", map[string]string{})
}

func TestSlimKeepsWhatScrapingNeeds(t *testing.T) {
	full := modelPod("p", "10.0.0.1", true, func(p *corev1.Pod) {
		p.Annotations = map[string]string{modelserver.MetricsPortAnnotation: "metrics"}
		p.ManagedFields = []metav1.ManagedFieldsEntry{{Manager: "kubectl"}}
		p.Spec.Containers = []corev1.Container{{Name: "engine", Image: "vllm", Args: []string{"--model", "x"},
			Ports: []corev1.ContainerPort{{Name: "metrics", ContainerPort: 8002}}}}
		p.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: "engine", Ready: true}}
	})
	obj, err := Slim(full)
	if err != nil {
		t.Fatal(err)
	}
	slim := obj.(*corev1.Pod)
	if slim.ManagedFields != nil || slim.Spec.Containers[0].Image != "" || slim.Status.ContainerStatuses != nil {
		t.Errorf("Slim kept what it should drop: %+v", slim)
	}
	want, _ := scrape.TargetForPod(full)
	got, err := scrape.TargetForPod(slim)
	if err != nil || got != want || !modelserver.Scrapable(slim) {
		t.Errorf("the slim pod's target is %+v, %v (scrapable %v); want %+v", got, err, modelserver.Scrapable(slim), want)
	}
	if tomb := (cache.DeletedFinalStateUnknown{Key: "ml/p"}); !cmp.Equal(mustSlim(t, tomb), any(tomb)) {
		t.Error("a tombstone was not passed through")
	}
}

func mustSlim(t *testing.T, obj any) any {
	t.Helper()
	out, err := Slim(obj)
	if err != nil {
		t.Fatal(err)
	}
	return out
}
