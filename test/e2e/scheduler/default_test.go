package scheduler

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2/ktesting"
	"k8s.io/utils/ptr"

	"github.com/capstan-dev/capstan/plugins/modelslots"
)

// Pods without the model label are placed by capstan-scheduler exactly as
// the cluster's default scheduler places them: the same node when only one
// fits, and the same reason, word for word, when none does, even on a node
// whose model slots are all taken.
func TestPodsWithoutModelLabelScheduleAsDefault(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	startScheduler(t)
	c := testCluster
	ns := testNamespace(ctx, t, "plain")
	const group = "plain"
	createNodes(ctx, t,
		cpuNode("plain-a", group, "4", nil),
		cpuNode("plain-b", group, "2", map[string]string{modelslots.NodeSlotsLabel: "1"}),
		cpuNode("plain-c", group, "8", nil, corev1.Taint{Key: "dedicated", Value: "batch", Effect: corev1.TaintEffectNoSchedule}),
	)
	onB := map[string]string{corev1.LabelHostname: "plain-b"}

	// plain-b's only model slot is taken...
	occupant := modelPod(ns, "occupant", "llama-3-8b", nil)
	occupant.Spec.NodeSelector = onB
	if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, occupant, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitForPlacement(ctx, t, ns, "app=llama-3-8b", 1, 0, time.Minute)
	// ...so another model server cannot go there,
	second := modelPod(ns, "second", "llama-3-8b", nil)
	second.Spec.NodeSelector = onB
	if got := place(ctx, t, second); got.node != "" || !strings.Contains(got.message, "the 1 model slot on 1 node matching its node selector and affinity is in use") {
		t.Errorf("a second model server on plain-b: %+v, want it to wait for the slot", got)
	}

	tests := []struct {
		name     string
		cpu      string
		tolerate bool
		selector map[string]string
		wantNode string // "" for none
	}{
		{name: "one node fits", cpu: "3", wantNode: "plain-a"},
		{name: "only a tainted node it tolerates fits", cpu: "6", tolerate: true, wantNode: "plain-c"},
		// ...but pods that are not model servers still can.
		{name: "a node with all model slots taken", cpu: "1", selector: onB, wantNode: "plain-b"},
		{name: "no node fits", cpu: "64"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			results := map[string]outcome{}
			for _, scheduler := range []string{corev1.DefaultSchedulerName, schedulerName} {
				pod := &corev1.Pod{
					ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "web-" + scheduler, Labels: map[string]string{"app": "web"}},
					Spec: corev1.PodSpec{
						SchedulerName: scheduler,
						NodeSelector:  map[string]string{groupLabel: group},
						Containers: []corev1.Container{{Name: "web", Image: "nginx",
							Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse(tc.cpu)}}}},
					},
				}
				for k, v := range tc.selector {
					pod.Spec.NodeSelector[k] = v
				}
				if tc.tolerate {
					pod.Spec.Tolerations = []corev1.Toleration{{Key: "dedicated", Operator: corev1.TolerationOpEqual, Value: "batch", Effect: corev1.TaintEffectNoSchedule}}
				}
				results[scheduler] = place(ctx, t, pod)
			}
			def, ours := results[corev1.DefaultSchedulerName], results[schedulerName]
			if def != ours {
				t.Errorf("default-scheduler: %+v\ncapstan-scheduler: %+v\nwant the same", def, ours)
			}
			if def.node != tc.wantNode {
				t.Errorf("default-scheduler placed the pod on %q, want %q (%s)", def.node, tc.wantNode, def.message)
			}
			if strings.Contains(ours.message, "model slot") {
				t.Errorf("capstan-scheduler gave a pod without the model label a model-slot reason: %s", ours.message)
			}
		})
	}
}

// outcome is where a pod went, or why it could not.
type outcome struct {
	node, message string
}

// place creates the pod, waits until it is bound or unschedulable, deletes
// it again (so the next pod finds the same free resources) and returns the
// outcome.
func place(ctx context.Context, t *testing.T, pod *corev1.Pod) outcome {
	t.Helper()
	c := testCluster
	pods := c.Client.CoreV1().Pods(pod.Namespace)
	if _, err := pods.Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var got outcome
	err := c.WaitFor(ctx, 30*time.Second, fmt.Sprintf("pod %s to be bound or unschedulable", pod.Name), func(ctx context.Context) (bool, error) {
		p, err := pods.Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		if p.Spec.NodeName != "" {
			got = outcome{node: p.Spec.NodeName}
			return true, nil
		}
		msg, ok := unschedulable(p)
		got = outcome{message: msg}
		return ok, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := pods.Delete(ctx, pod.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}); err != nil {
		t.Fatal(err)
	}
	err = c.WaitFor(ctx, 30*time.Second, "pod "+pod.Name+" to be gone", func(ctx context.Context) (bool, error) {
		_, err := pods.Get(ctx, pod.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, nil
		}
		return false, err
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}
