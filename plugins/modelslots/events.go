package modelslots

import (
	"context"

	v1 "k8s.io/api/core/v1"
	"k8s.io/component-helpers/scheduling/corev1/nodeaffinity"
	"k8s.io/klog/v2"
	fwk "k8s.io/kube-scheduler/framework"
	schedutil "k8s.io/kubernetes/pkg/scheduler/util"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

// EventsToRegister returns the only events after which a model server this
// plugin rejected can fit: a pod holding slots goes away (deleted, or
// finished: the scheduler forgets terminal pods), a bound pod stops being a
// model server, a node is added or gains slots, or the waiting pod itself
// asks for less. Each comes with a hint that skips the events that cannot
// help this particular pod.
func (pl *ModelSlots) EventsToRegister(_ context.Context) ([]fwk.ClusterEventWithHint, error) {
	events := []fwk.ClusterEventWithHint{
		{Event: fwk.ClusterEvent{Resource: fwk.AssignedPod, ActionType: fwk.Delete}, QueueingHintFn: pl.isSchedulableAfterAssignedPodDeleted},
		{Event: fwk.ClusterEvent{Resource: fwk.AssignedPod, ActionType: fwk.UpdatePodLabel}, QueueingHintFn: pl.isSchedulableAfterAssignedPodLabelUpdated},
		// A label can give a node slots, or make it match the pod's node
		// selector (PreFilter only counts the nodes a pod may use).
		{Event: fwk.ClusterEvent{Resource: fwk.Node, ActionType: fwk.Add | fwk.UpdateNodeLabel}, QueueingHintFn: pl.isSchedulableAfterNodeChange},
		// Only an edit of the pending pod can fix its annotations or lower its
		// demand; annotations have no narrower update event.
		{Event: fwk.ClusterEvent{Resource: fwk.TargetPod, ActionType: fwk.Update}, QueueingHintFn: pl.isSchedulableAfterTargetPodUpdated},
	}
	if pl.capacity.resource != "" {
		// Slots derived from an extended resource grow with allocatable.
		events = append(events, fwk.ClusterEventWithHint{
			Event: fwk.ClusterEvent{Resource: fwk.Node, ActionType: fwk.UpdateNodeAllocatable}, QueueingHintFn: pl.isSchedulableAfterNodeChange})
	}
	return events, nil
}

// isSchedulableAfterAssignedPodDeleted queues the pod when the deleted pod was
// a model server placed on a node: its slots (and its replica, for a
// per-model cap) are free again.
func (pl *ModelSlots) isSchedulableAfterAssignedPodDeleted(logger klog.Logger, pod *v1.Pod, oldObj, newObj interface{}) (fwk.QueueingHint, error) {
	deleted, _, err := schedutil.As[*v1.Pod](oldObj, newObj)
	if err != nil {
		return fwk.Queue, err
	}
	if modelserver.Model(deleted.Labels) == "" {
		logger.V(5).Info("Deleted pod was not a model server, so it held no model slots", "pod", klog.KObj(pod), "deletedPod", klog.KObj(deleted))
		return fwk.QueueSkip, nil
	}
	if deleted.Spec.NodeName == "" {
		logger.V(5).Info("Deleted model server was never placed, so it held no model slots", "pod", klog.KObj(pod), "deletedPod", klog.KObj(deleted))
		return fwk.QueueSkip, nil
	}
	logger.V(5).Info("Deleted model server freed model slots", "pod", klog.KObj(pod), "deletedPod", klog.KObj(deleted), "node", deleted.Spec.NodeName)
	return fwk.Queue, nil
}

// isSchedulableAfterAssignedPodLabelUpdated queues the pod when a placed pod
// stops being a model server (its slots are free), or stops being a replica
// of the pod's own model (a per-model cap may allow one more).
func (pl *ModelSlots) isSchedulableAfterAssignedPodLabelUpdated(logger klog.Logger, pod *v1.Pod, oldObj, newObj interface{}) (fwk.QueueingHint, error) {
	oldPod, newPod, err := schedutil.As[*v1.Pod](oldObj, newObj)
	if err != nil {
		return fwk.Queue, err
	}
	oldModel, newModel := modelserver.Model(oldPod.Labels), modelserver.Model(newPod.Labels)
	switch {
	case oldModel == "" || oldModel == newModel:
		logger.V(5).Info("Pod's labels changed, but it frees no model slots", "pod", klog.KObj(pod), "updatedPod", klog.KObj(newPod))
		return fwk.QueueSkip, nil
	case newModel == "":
		logger.V(5).Info("Pod stopped being a model server and freed its model slots", "pod", klog.KObj(pod), "updatedPod", klog.KObj(newPod))
		return fwk.Queue, nil
	case oldPod.Namespace == pod.Namespace && oldModel == modelserver.Model(pod.Labels):
		logger.V(5).Info("Pod stopped being a replica of the pod's model", "pod", klog.KObj(pod), "updatedPod", klog.KObj(newPod))
		return fwk.Queue, nil
	default:
		logger.V(5).Info("Pod switched to another model and still holds its model slots", "pod", klog.KObj(pod), "updatedPod", klog.KObj(newPod))
		return fwk.QueueSkip, nil
	}
}

// isSchedulableAfterNodeChange queues the pod when a node it may use was
// added with room for it, gained slots, or came to match its node selector
// while holding enough slots.
func (pl *ModelSlots) isSchedulableAfterNodeChange(logger klog.Logger, pod *v1.Pod, oldObj, newObj interface{}) (fwk.QueueingHint, error) {
	oldNode, newNode, err := schedutil.As[*v1.Node](oldObj, newObj)
	if err != nil {
		return fwk.Queue, err
	}
	d, isModelServer, err := PodDemand(pod, pl.defaultMaxPerNode)
	if !isModelServer {
		// Not ours to judge any more; let the scheduler retry it.
		return fwk.Queue, nil
	}
	if err != nil {
		logger.V(5).Info("Node changed, but the pod's own annotations are invalid", "pod", klog.KObj(pod), "node", klog.KObj(newNode))
		return fwk.QueueSkip, nil
	}
	slots, err := pl.capacity.NodeSlots(newNode)
	if err != nil || slots < d.Slots {
		logger.V(5).Info("Node changed, but it holds fewer model slots than the pod needs", "pod", klog.KObj(pod), "node", klog.KObj(newNode), "slots", slots, "needs", d.Slots)
		return fwk.QueueSkip, nil
	}
	affinity := nodeaffinity.GetRequiredNodeAffinity(pod)
	if ok, _ := affinity.Match(newNode); !ok {
		logger.V(5).Info("Node changed, but the pod's node selector or affinity excludes it", "pod", klog.KObj(pod), "node", klog.KObj(newNode))
		return fwk.QueueSkip, nil
	}
	if oldNode == nil {
		logger.V(5).Info("Node added with enough model slots for the pod", "pod", klog.KObj(pod), "node", klog.KObj(newNode), "slots", slots)
		return fwk.Queue, nil
	}
	oldSlots, err := pl.capacity.NodeSlots(oldNode)
	if err == nil && oldSlots >= slots {
		if matched, _ := affinity.Match(oldNode); matched {
			logger.V(5).Info("Node changed, but its model slots did not grow", "pod", klog.KObj(pod), "node", klog.KObj(newNode), "slots", slots)
			return fwk.QueueSkip, nil
		}
	}
	logger.V(5).Info("Node gained model slots or now matches the pod", "pod", klog.KObj(pod), "node", klog.KObj(newNode), "slots", slots)
	return fwk.Queue, nil
}

// isSchedulableAfterTargetPodUpdated queues the pending pod when an edit of it
// can change the verdict: it is no longer a model server, its annotations
// became valid, it needs fewer slots, it names another model, or its
// per-node cap was raised or lifted.
func (pl *ModelSlots) isSchedulableAfterTargetPodUpdated(logger klog.Logger, pod *v1.Pod, oldObj, newObj interface{}) (fwk.QueueingHint, error) {
	oldPod, newPod, err := schedutil.As[*v1.Pod](oldObj, newObj)
	if err != nil {
		return fwk.Queue, err
	}
	oldD, _, oldErr := PodDemand(oldPod, pl.defaultMaxPerNode)
	newD, isModelServer, newErr := PodDemand(newPod, pl.defaultMaxPerNode)
	switch {
	case !isModelServer:
		logger.V(5).Info("Pod is no longer a model server", "pod", klog.KObj(newPod))
		return fwk.Queue, nil
	case newErr != nil:
		logger.V(5).Info("Pod was updated, but its model-slot annotations are still invalid", "pod", klog.KObj(newPod), "err", newErr)
		return fwk.QueueSkip, nil
	case oldErr != nil:
		logger.V(5).Info("Pod's model-slot annotations were fixed", "pod", klog.KObj(newPod))
		return fwk.Queue, nil
	case newD.Slots < oldD.Slots, newD.Key != oldD.Key, capRelaxed(oldD.MaxPerNode, newD.MaxPerNode):
		logger.V(5).Info("Pod now asks for less", "pod", klog.KObj(newPod), "slots", newD.Slots, "maxPerNode", newD.MaxPerNode)
		return fwk.Queue, nil
	default:
		logger.V(5).Info("Pod was updated, but it asks for no less than before", "pod", klog.KObj(newPod))
		return fwk.QueueSkip, nil
	}
}

// capRelaxed reports whether a per-node cap was raised or lifted (0 = none).
func capRelaxed(oldCap, newCap int64) bool {
	return oldCap != 0 && (newCap == 0 || newCap > oldCap)
}
