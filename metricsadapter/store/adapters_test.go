package store

import (
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/metricsadapter/scrape"
)

// observeAdapters delivers a sample whose waiting adapters are these (nil:
// the page had no lora_requests_info).
func observeAdapters(t *testing.T, s *Store, pod string, at time.Time, waiting []string) *catalogue.Values {
	t.Helper()
	v := cat.NewValues()
	w := id(t, catalogue.RequestsWaiting)
	v.Has[w], v.Scalar[w] = true, 1
	if waiting != nil {
		a := id(t, catalogue.LoRAAdapterWaitingPods)
		v.Has[a], v.Adapters[a] = true, waiting
	}
	s.Observe(scrape.Target{Key: podKey(pod), Engine: modelserver.VLLM}, at, v)
	return v
}

func TestAdapterPodsCountsFreshPodsPerAdapter(t *testing.T) {
	s := newStore(t)
	waiting := id(t, catalogue.LoRAAdapterWaitingPods)
	observeAdapters(t, s, "stale", epoch, []string{"support-bot-v3", "sql-bot"})
	now := epoch.Add(10 * time.Second)
	observeAdapters(t, s, "a", now.Add(-2*time.Second), []string{"support-bot-v3", "sql-bot"})
	observeAdapters(t, s, "b", now.Add(-time.Second), []string{"support-bot-v3"})
	observeAdapters(t, s, "idle", now, []string{})
	observeAdapters(t, s, "no-lora", now, nil)

	keys := []types.NamespacedName{podKey("stale"), podKey("a"), podKey("b"), podKey("idle"), podKey("no-lora"), podKey("unknown")}
	got := s.AdapterPods(keys, waiting, now)
	want := AdapterPods{Pods: map[string]int{"support-bot-v3": 2, "sql-bot": 1}, Reporting: 3, Time: now.Add(-2 * time.Second)}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("AdapterPods (-want +got):\n%s", diff)
	}
	if got := s.AdapterPods([]types.NamespacedName{podKey("stale"), podKey("no-lora")}, waiting, now); got.Reporting != 0 || len(got.Pods) != 0 {
		t.Errorf("pods without a fresh list report adapters: %+v", got)
	}
	if _, ok := s.PodValue(podKey("a"), served(t, catalogue.LoRAAdapterWaitingPods), now); ok {
		t.Error("an adapters metric has a single value for a pod")
	}
}

func TestAdaptersAreCopiedAndReplaced(t *testing.T) {
	s := newStore(t)
	waiting := id(t, catalogue.LoRAAdapterWaitingPods)
	// The scraper reuses its Values: what the store kept must not change
	// with them.
	v := observeAdapters(t, s, "a", epoch, []string{"x", "y"})
	v.Adapters[waiting][0] = "changed"
	if got := s.AdapterPods([]types.NamespacedName{podKey("a")}, waiting, epoch); !cmp.Equal(got.Pods, map[string]int{"x": 1, "y": 1}) {
		t.Errorf("after the scraper reused its values: %v", got.Pods)
	}
	observeAdapters(t, s, "a", epoch.Add(time.Second), []string{"y"})
	if got := s.AdapterPods([]types.NamespacedName{podKey("a")}, waiting, epoch.Add(time.Second)); !cmp.Equal(got.Pods, map[string]int{"y": 1}) {
		t.Errorf("after the adapters changed: %v", got.Pods)
	}
	observeAdapters(t, s, "a", epoch.Add(2*time.Second), nil)
	if got := s.AdapterPods([]types.NamespacedName{podKey("a")}, waiting, epoch.Add(2*time.Second)); got.Reporting != 0 {
		t.Errorf("a page without the metric still reports adapters: %+v", got)
	}
}
