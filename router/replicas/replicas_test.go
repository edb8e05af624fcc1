package replicas

import (
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
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
		{"gone", "no replica exists (no Deployment or StatefulSet of the model is in view)"},
	} {
		if got, off := p.Describe(tc.model, []string{"team-a"}, now); got != tc.want || off {
			t.Errorf("%s:\n got %q (off %t)\nwant %q", tc.model, got, off, tc.want)
		}
	}
}

// A model with no pod is off only when every workload of it is at zero and
// no HPA will scale it up: none scales it, or its HPA has scaling disabled
// because the zero was set by hand.
func TestAtZero(t *testing.T) {
	deployment := func(ns, name, model string, replicas int32) *appsv1.Deployment {
		return &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: appsv1.DeploymentSpec{Replicas: &replicas, Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"capstan.dev/model": model}}}}}
	}
	hpa := func(ns, kind, name string, conds ...autoscalingv2.HorizontalPodAutoscalerCondition) *autoscalingv2.HorizontalPodAutoscaler {
		return &autoscalingv2.HorizontalPodAutoscaler{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec:   autoscalingv2.HorizontalPodAutoscalerSpec{ScaleTargetRef: autoscalingv2.CrossVersionObjectReference{APIVersion: "apps/v1", Kind: kind, Name: name}},
			Status: autoscalingv2.HorizontalPodAutoscalerStatus{Conditions: conds}}
	}
	disabled := autoscalingv2.HorizontalPodAutoscalerCondition{Type: autoscalingv2.ScalingActive, Status: corev1.ConditionFalse, Reason: "ScalingDisabled"}
	active := autoscalingv2.HorizontalPodAutoscalerCondition{Type: autoscalingv2.ScalingActive, Status: corev1.ConditionTrue, Reason: "ValidMetricFound"}
	scaledToZero := autoscalingv2.HorizontalPodAutoscalerCondition{Type: autoscalingv2.ScaledToZero, Status: corev1.ConditionTrue, Reason: "ScaledToZero"}

	p := New(fake.NewClientset(), nil)
	w := p.workloads[""]
	for _, o := range []any{
		deployment("ml", "manual", "manual", 0), hpa("ml", "Deployment", "manual", disabled),
		deployment("ml", "bare", "bare", 0),
		deployment("ml", "idle", "idle", 0), hpa("ml", "Deployment", "idle", active, scaledToZero),
		deployment("ml", "fresh", "fresh", 0), hpa("ml", "Deployment", "fresh"),
		deployment("ml", "starting", "starting", 2),
		// The same model in a namespace that is not pooled is not looked at.
		deployment("other", "bare", "bare", 3),
		// An HPA of a StatefulSet of the same name is not the Deployment's.
		deployment("ml", "mixed", "mixed", 0), hpa("ml", "StatefulSet", "mixed", active, scaledToZero),
	} {
		var err error
		switch o := o.(type) {
		case *appsv1.Deployment:
			err = w.deployments.GetIndexer().Add(o)
		case *autoscalingv2.HorizontalPodAutoscaler:
			err = w.hpas.GetIndexer().Add(o)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now()
	for _, tc := range []struct {
		model, want string
		off         bool
	}{
		{"manual", "the model is switched off: Deployment ml/manual is scaled to 0 and scaling is disabled (HPA manual: ScalingActive=False, ScalingDisabled: an HPA scales up only from a zero it set itself); scale it to at least 1 replica to turn it back on", true},
		{"bare", "the model is switched off: Deployment ml/bare is scaled to 0 and no HPA scales it; scale it to at least 1 replica to turn it back on", true},
		{"mixed", "the model is switched off: Deployment ml/mixed is scaled to 0 and no HPA scales it; scale it to at least 1 replica to turn it back on", true},
		{"idle", "no replica exists: HPA ml/idle scaled Deployment ml/idle to zero and scales it up on demand", false},
		{"fresh", "no replica exists: Deployment ml/fresh is at 0 replicas and HPA ml/fresh scales it", false},
		{"starting", "no replica exists yet (Deployment ml/starting asks for 2)", false},
	} {
		if got, off := p.Describe(tc.model, []string{"ml"}, now); got != tc.want || off != tc.off {
			t.Errorf("%s:\n got %q (off %t)\nwant %q (off %t)", tc.model, got, off, tc.want, tc.off)
		}
	}
}
