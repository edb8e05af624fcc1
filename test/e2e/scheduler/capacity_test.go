package scheduler

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	schedulingv1 "k8s.io/api/scheduling/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
	watchtools "k8s.io/client-go/tools/watch"
	"k8s.io/klog/v2/ktesting"
	"k8s.io/utils/ptr"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/plugins/modelslots"
	"github.com/capstan-dev/capstan/test/cluster"
)

// A Deployment asking for more replicas than the cluster has slots gets
// exactly as many bound as there are slots; the rest wait Pending with
// PodScheduled=False and a FailedScheduling event that name the cap.
func TestReplicasBeyondSlotsWaitWithReason(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	startScheduler(t)
	c := testCluster
	ns := testNamespace(ctx, t, "beyond")
	// No node selector: every node with slots in the cluster counts, so the
	// message's numbers hold only if the other tests' nodes are gone.
	noOtherSlotNodes(ctx, t)
	nodes := slotNodes(ctx, t, "beyond", 2, 2, 2, 2)

	llama := cluster.ModelServer{Namespace: ns, Name: "llama", Model: "llama-3-8b", Replicas: 11, SchedulerName: schedulerName}
	if err := c.Deploy(ctx, llama); err != nil {
		t.Fatal(err)
	}
	p := waitForPlacement(ctx, t, ns, "app=llama", 8, 3, time.Minute)
	for _, n := range nodes {
		if got := len(p.bound[n]); got != 2 {
			t.Errorf("node %s runs %d replicas, want its 2 slots' worth", n, got)
		}
	}
	// A replica turned away while others were still being bound may have got
	// a per-node reason first; once the slots are all taken, each says so,
	// and preemption (which ran, and found nothing to evict) says why not.
	const reason = "model llama-3-8b: all 8 model slots on 4 nodes are in use"
	const condition = "0/4 nodes are available: " + reason + ". " +
		"preemption: 0/4 nodes are available: 4 Preemption is not helpful for scheduling."
	err := c.WaitFor(ctx, 30*time.Second, "every waiting replica to name the cap", func(ctx context.Context) (bool, error) {
		p = placementOf(mustPods(ctx, t, ns, "app=llama"))
		for _, msg := range p.unschedulable {
			if msg != condition {
				return false, nil
			}
		}
		return len(p.unschedulable) == 3, nil
	})
	if err != nil {
		t.Fatalf("%v; want every PodScheduled=False message to be %q, got %q", err, condition, p.unschedulable)
	}

	// Every waiting replica has an event from capstan-scheduler naming the cap.
	waiting := sortedKeys(p.unschedulable)
	err = c.WaitFor(ctx, 30*time.Second, "FailedScheduling events for "+strings.Join(waiting, ", "), func(ctx context.Context) (bool, error) {
		events, err := c.Client.EventsV1().Events(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		seen := map[string]bool{}
		for _, e := range events.Items {
			if e.Reason == "FailedScheduling" && e.ReportingController == schedulerName && strings.Contains(e.Note, reason) {
				seen[e.Regarding.Name] = true
			}
		}
		for _, pod := range waiting {
			if !seen[pod] {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		t.Error(err)
	}

	// Nothing more is bound while no slot opens.
	if p := placementOf(mustPods(ctx, t, ns, "app=llama")); p.boundCount() != 8 {
		t.Errorf("%d replicas bound after the events, want 8", p.boundCount())
	}
}

// A node with free slots that joins is used at once by the replicas waiting
// for one, and a slot freed by a deleted model server goes to a waiting one.
func TestWaitingReplicasTakeNewSlots(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	startScheduler(t)
	c := testCluster

	// deployIn creates a Deployment of replicas model servers confined to
	// the node group.
	deployIn := func(t *testing.T, ns, group, name, model string, replicas int32) {
		t.Helper()
		d := cluster.ModelServer{Namespace: ns, Name: name, Model: model, Replicas: replicas, SchedulerName: schedulerName}.Deployment()
		d.Spec.Template.Spec.NodeSelector = map[string]string{groupLabel: group}
		if _, err := c.Client.AppsV1().Deployments(ns).Create(ctx, d, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("a node with free slots is added", func(t *testing.T) {
		ns := testNamespace(ctx, t, "grow")
		slotNodes(ctx, t, "grow", 2)
		deployIn(t, ns, "grow", "qwen", "qwen-2-7b", 4)
		waitForPlacement(ctx, t, ns, "app=qwen", 2, 2, time.Minute)

		const added = "grow-added"
		t.Cleanup(func() { deleteNodes(t, added) })
		// Measured from the node's creation: before the replicas can go
		// there, kwok must make it Ready and the node lifecycle controller
		// lift its not-ready taint, so this is an upper bound on the
		// scheduler's part.
		start := time.Now()
		if err := c.CreateNodes(ctx, slotNode(added, "grow", 2)); err != nil {
			t.Fatal(err)
		}
		ready := time.Since(start)
		p := waitForPlacement(ctx, t, ns, "app=qwen", 4, 0, 10*time.Second)
		bound := time.Since(start)
		t.Logf("node created→Ready and untainted (seen by polling) %s, created→waiting replicas bound %s", ready.Round(time.Millisecond), bound.Round(time.Millisecond))
		if got := len(p.bound[added]); got != 2 {
			t.Errorf("the new node runs %d replicas, want 2", got)
		}
		if bound > time.Second {
			t.Errorf("waiting replicas were bound %s after the node was created, want within 1s", bound.Round(time.Millisecond))
		}
	})

	t.Run("a node is given more slots", func(t *testing.T) {
		ns := testNamespace(ctx, t, "relabel")
		nodes := slotNodes(ctx, t, "relabel", 1)
		deployIn(t, ns, "relabel", "phi", "phi-3", 3)
		waitForPlacement(ctx, t, ns, "app=phi", 1, 2, time.Minute)

		start := time.Now()
		if _, err := c.Client.CoreV1().Nodes().Patch(ctx, nodes[0], types.MergePatchType,
			[]byte(`{"metadata":{"labels":{"`+modelslots.NodeSlotsLabel+`":"3"}}}`), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
		waitForPlacement(ctx, t, ns, "app=phi", 3, 0, 10*time.Second)
		t.Logf("label raised→waiting replicas bound %s", time.Since(start).Round(time.Millisecond))
		if elapsed := time.Since(start); elapsed > time.Second {
			t.Errorf("waiting replicas were bound %s after the node gained slots, want within 1s", elapsed.Round(time.Millisecond))
		}
	})

	t.Run("a bound model server is deleted", func(t *testing.T) {
		ns := testNamespace(ctx, t, "swap")
		nodes := slotNodes(ctx, t, "swap", 2)
		for i := range 3 {
			pod := modelPod(ns, fmt.Sprintf("mistral-%d", i), "mistral-7b", nil)
			pod.Spec.NodeSelector = map[string]string{groupLabel: "swap"}
			if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		p := waitForPlacement(ctx, t, ns, "app=mistral-7b", 2, 1, time.Minute)
		waiting := sortedKeys(p.unschedulable)[0]
		victim := p.bound[nodes[0]][0].Name

		start := time.Now()
		if err := c.Client.CoreV1().Pods(ns).Delete(ctx, victim, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}); err != nil {
			t.Fatal(err)
		}
		err := c.WaitFor(ctx, 10*time.Second, "the waiting pod "+waiting+" to take the freed slot", func(ctx context.Context) (bool, error) {
			pod, err := c.Client.CoreV1().Pods(ns).Get(ctx, waiting, metav1.GetOptions{})
			return err == nil && pod.Spec.NodeName == nodes[0], err
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("slot freed→taken %s", time.Since(start).Round(time.Millisecond))
		if elapsed := time.Since(start); elapsed > time.Second {
			t.Errorf("the waiting pod took the freed slot after %s, want within 1s", elapsed.Round(time.Millisecond))
		}
		waitForPlacement(ctx, t, ns, "app=mistral-7b", 2, 0, 10*time.Second)
	})
}

// 200 model servers created at once on 50 nodes: no binding ever puts more
// on a node than its slots (or more replicas of a model than its cap), and
// the replicas left waiting are exactly those no node has room for.
func TestBurstNeverOverfillsNodes(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	startScheduler(t)
	c := testCluster
	ns := testNamespace(ctx, t, "burst")

	const group, nodeCount, podCount = "burst", 50, 200
	slotsOf := make([]int, nodeCount)
	total := 0
	for i := range slotsOf {
		slotsOf[i] = 1 + (i*7)%4 // 1 to 4 slots, 125 in all
		total += slotsOf[i]
	}
	names := slotNodes(ctx, t, group, slotsOf...)
	slots := map[string]int64{}
	for i, n := range names {
		slots[n] = int64(slotsOf[i])
	}
	// Three in four are llama (1 slot, at most 2 per node), the rest mixtral
	// (2 slots): 250 slots asked of 125.
	pods := make([]*corev1.Pod, podCount)
	for i := range pods {
		if i%4 == 3 {
			pods[i] = modelPod(ns, fmt.Sprintf("mixtral-%03d", i), "mixtral-8x7b", map[string]string{modelslots.SlotsAnnotation: "2"})
		} else {
			pods[i] = modelPod(ns, fmt.Sprintf("llama-%03d", i), "llama-3-8b", map[string]string{modelslots.MaxPerNodeAnnotation: "2"})
		}
		pods[i].Spec.NodeSelector = map[string]string{groupLabel: group}
	}
	cost := func(p *corev1.Pod) int64 {
		if p.Annotations[modelslots.SlotsAnnotation] == "2" {
			return 2
		}
		return 1
	}

	// Watch from before the first pod exists, so every binding is seen in
	// the order the API server committed it.
	list, err := c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// A RetryWatcher resumes from the last event seen if the API server
	// ends the watch, so no binding is missed.
	w, err := watchtools.NewRetryWatcherWithContext(ctx, list.ResourceVersion, &cache.ListWatch{
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			return c.Client.CoreV1().Pods(ns).Watch(ctx, o)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()

	start := time.Now()
	createErrs := make(chan error, podCount)
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Go(func() {
			for j := i; j < podCount; j += 20 {
				if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, pods[j], metav1.CreateOptions{}); err != nil {
					createErrs <- err
				}
			}
		})
	}
	wg.Wait()
	close(createErrs)
	for err := range createErrs {
		t.Fatalf("creating pods: %v", err)
	}
	t.Logf("created %d pods in %s", podCount, time.Since(start).Round(time.Millisecond))

	used := map[string]int64{}          // node -> slots taken
	llamas := map[string]int{}          // node -> llama replicas
	boundTo := map[string]string{}      // pod -> node
	pending := map[string]*corev1.Pod{} // pod -> latest, while unschedulable
	settled := func() bool { return len(boundTo)+len(pending) == podCount }
	deadline := time.After(2 * time.Minute)
	for !settled() {
		var ev watch.Event
		select {
		case ev = <-w.ResultChan():
		case <-deadline:
			t.Fatalf("after 2m: %d pods bound, %d unschedulable, of %d", len(boundTo), len(pending), podCount)
		}
		if ev.Type == "" {
			t.Fatal("the pod watch ended")
		}
		pod, ok := ev.Object.(*corev1.Pod)
		if !ok || ev.Type == watch.Deleted {
			t.Fatalf("unexpected watch event %s %T", ev.Type, ev.Object)
		}
		if pod.Spec.NodeName == "" {
			if _, ok := unschedulable(pod); ok {
				pending[pod.Name] = pod
			}
			continue
		}
		if prev, ok := boundTo[pod.Name]; ok {
			if prev != pod.Spec.NodeName {
				t.Errorf("pod %s moved from %s to %s", pod.Name, prev, pod.Spec.NodeName)
			}
			continue
		}
		delete(pending, pod.Name)
		node := pod.Spec.NodeName
		boundTo[pod.Name] = node
		used[node] += cost(pod)
		if used[node] > slots[node] {
			t.Errorf("binding %s to %s put %d slots' worth on a node with %d", pod.Name, node, used[node], slots[node])
		}
		if pod.Labels[modelserver.ModelLabel] == "llama-3-8b" {
			llamas[node]++
			if llamas[node] > 2 {
				t.Errorf("binding %s to %s put %d llama replicas there, max 2 per node", pod.Name, node, llamas[node])
			}
		}
	}
	var usedTotal int64
	for _, u := range used {
		usedTotal += u
	}
	// Nodes are never emptied here, so once no waiting pod fits anywhere
	// (checked next) no later binding can happen: this state is final.
	t.Logf("settled after %s: %d bound using %d of %d slots, %d waiting", time.Since(start).Round(time.Millisecond),
		len(boundTo), usedTotal, total, len(pending))

	// Nobody waits while a node has room for them.
	for name, pod := range pending {
		for node, s := range slots {
			fits := s-used[node] >= cost(pod)
			if pod.Labels[modelserver.ModelLabel] == "llama-3-8b" && llamas[node] >= 2 {
				fits = false
			}
			if fits {
				msg, _ := unschedulable(pod)
				t.Errorf("pod %s waits (%q) although node %s has %d of %d slots free", name, msg, node, s-used[node], s)
			}
		}
	}
	// And what the API server holds now agrees with what the watch saw.
	final := placementOf(mustPods(ctx, t, ns, ""))
	if final.boundCount() != len(boundTo) || len(final.unschedulable) != len(pending) {
		t.Errorf("the API server has %d bound and %d unschedulable, the watch saw %d and %d",
			final.boundCount(), len(final.unschedulable), len(boundTo), len(pending))
	}
}

// noOtherSlotNodes waits until no node outside this test declares model
// slots (an earlier test's nodes may still be going).
func noOtherSlotNodes(ctx context.Context, t *testing.T) {
	t.Helper()
	err := testCluster.WaitFor(ctx, 30*time.Second, "no other nodes with model slots", func(ctx context.Context) (bool, error) {
		nodes, err := testCluster.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{LabelSelector: modelslots.NodeSlotsLabel})
		return err == nil && len(nodes.Items) == 0, err
	})
	if err != nil {
		t.Fatal(err)
	}
}

func mustPods(ctx context.Context, t *testing.T, ns, selector string) []corev1.Pod {
	t.Helper()
	pods, err := testCluster.Pods(ctx, ns, selector)
	if err != nil {
		t.Fatal(err)
	}
	return pods
}

// A model server of higher priority gets a slot by preemption when a lower-
// priority one holds it; one of equal priority waits instead.
func TestHigherPriorityModelServerPreempts(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	startScheduler(t)
	c := testCluster
	ns := testNamespace(ctx, t, "preempt")
	nodes := slotNodes(ctx, t, "preempt", 1)
	const high = "capstan-e2e-high"
	if _, err := c.Client.SchedulingV1().PriorityClasses().Create(ctx, &schedulingv1.PriorityClass{
		ObjectMeta: metav1.ObjectMeta{Name: high}, Value: 1000}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = c.Client.SchedulingV1().PriorityClasses().Delete(context.Background(), high, metav1.DeleteOptions{})
	})
	create := func(name, priorityClass string) {
		t.Helper()
		pod := modelPod(ns, name, "llama-3-8b", nil)
		pod.Spec.NodeSelector = map[string]string{groupLabel: "preempt"}
		pod.Spec.PriorityClassName = priorityClass
		if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	create("low", "")
	waitForPlacement(ctx, t, ns, "app=llama-3-8b", 1, 0, time.Minute)

	create("equal", "")
	p := waitForPlacement(ctx, t, ns, "app=llama-3-8b", 1, 1, time.Minute)
	if msg := p.unschedulable["equal"]; !strings.Contains(msg, "the 1 model slot on 1 node matching its node selector and affinity is in use") {
		t.Errorf("the equal-priority replica waits with %q", msg)
	}

	create("high", high)
	err := c.WaitFor(ctx, 30*time.Second, "the high-priority replica to take the slot", func(ctx context.Context) (bool, error) {
		pod, err := c.Client.CoreV1().Pods(ns).Get(ctx, "high", metav1.GetOptions{})
		return err == nil && pod.Spec.NodeName == nodes[0], err
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Client.CoreV1().Pods(ns).Get(ctx, "low", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("the preempted replica is still there (get: %v)", err)
	}
	if pod, err := c.Client.CoreV1().Pods(ns).Get(ctx, "equal", metav1.GetOptions{}); err != nil || pod.Spec.NodeName != "" {
		t.Errorf("the equal-priority replica: node %q, err %v; want it still waiting", pod.Spec.NodeName, err)
	}
}
