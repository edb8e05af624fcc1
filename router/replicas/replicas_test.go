package replicas

import (
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func pod(ns, name, model string, conds ...corev1.PodCondition) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"capstan.dev/model": model}},
		Status: corev1.PodStatus{Conditions: conds}}
}

func TestDescribe(t *testing.T) {
	now := time.Date(2026, 12, 3, 9, 0, 0, 0, time.UTC)
	const full = "0/3 nodes are available: model llama: all 6 model slots on 3 nodes are in use."
	pending := corev1.PodCondition{Type: corev1.PodScheduled, Status: corev1.ConditionFalse, Reason: "Unschedulable", Message: full}
	scheduled := corev1.PodCondition{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: metav1.NewTime(now.Add(-42 * time.Second))}
	notReady := corev1.PodCondition{Type: corev1.PodReady, Status: corev1.ConditionFalse, LastTransitionTime: metav1.NewTime(now.Add(-40 * time.Second))}

	p := New(fake.NewClientset(), nil)
	idx := p.byNamespace[""].GetIndexer()
	for _, o := range []*corev1.Pod{
		pod("team-a", "llama-0", "llama", pending),
		pod("team-a", "llama-1", "llama", pending),
		pod("team-a", "llama-2", "llama", scheduled, notReady),
		pod("team-b", "llama-3", "llama", pending), // another namespace, not pooled
		pod("team-a", "qwen-0", "qwen", scheduled, notReady),
		pod("team-a", "new", "mistral"),
	} {
		if err := idx.Add(o); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct{ model, want string }{
		{"llama", "replicas: 2 Pending: " + full[:len(full)-1] + "; 1 starting (not Ready for 40s)"},
		{"mistral", "replicas: 1 Pending: not scheduled yet"},
		{"gone", "no replica exists (scaled to zero: an HPA that scaled it there scales it up on requests_demand; a Deployment scaled to 0 by hand stays off)"},
	} {
		if got := p.Describe(tc.model, []string{"team-a"}, now); got != tc.want {
			t.Errorf("%s:\n got %q\nwant %q", tc.model, got, tc.want)
		}
	}
}
