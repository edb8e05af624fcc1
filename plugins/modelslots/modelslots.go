// Package modelslots is the ModelSlots scheduler plugin: it caps how many
// model-server replicas (pods labelled capstan.dev/model) each node runs to
// the model slots the node declares, so replicas beyond the cluster's
// capacity wait Pending with a reason that names the cap instead of landing
// where they cannot run. Pods without the model label are left alone.
//
// A node holds the number of slots in its capstan.dev/model-slots label (or,
// by the args, a default or one slot per unit of an extended resource); a
// replica takes capstan.dev/slots slots (default 1); capstan.dev/max-per-node
// optionally caps replicas of one model per node. See docs/scheduler.md.
package modelslots

import (
	"context"
	"fmt"
	"sync/atomic"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/component-helpers/scheduling/corev1"
	"k8s.io/component-helpers/scheduling/corev1/nodeaffinity"
	"k8s.io/klog/v2"
	fwk "k8s.io/kube-scheduler/framework"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/plugins/apis/config"
	"github.com/capstan-dev/capstan/plugins/apis/config/validation"
)

const (
	// Name is the plugin's name in the registry and in a
	// KubeSchedulerConfiguration.
	Name = "ModelSlots"

	// preFilterStateKey is where PreFilter leaves the pod's demand for Filter
	// and Score; the plugin's name in the key keeps it apart from other
	// plugins' state.
	preFilterStateKey fwk.StateKey = "PreFilter" + Name

	// signFragmentKey names what this plugin contributes to a pod's
	// signature for opportunistic batching: pods with equal demands are
	// placed alike.
	signFragmentKey = "capstan.dev/v1.Pod.ModelSlotsDemand()"
)

// ModelSlots is the plugin. Its only state is a cache of per-node usage keyed
// by the scheduler's own NodeInfo generations; it never writes to NodeInfo.
type ModelSlots struct {
	logger   klog.Logger
	handle   fwk.Handle
	capacity Capacity
	// invalidSlots is Filter's reason for a node with an invalid slots label.
	invalidSlots      string
	defaultMaxPerNode int64
	strategy          config.ScoringStrategyType
	usage             *usageCache
	// walkFrom is where PreFilter last found room; the next walk starts
	// there.
	walkFrom atomic.Int64
	reasons  reasonCache
}

var (
	_ fwk.PreFilterPlugin   = &ModelSlots{}
	_ fwk.FilterPlugin      = &ModelSlots{}
	_ fwk.PreScorePlugin    = &ModelSlots{}
	_ fwk.ScorePlugin       = &ModelSlots{}
	_ fwk.ScoreExtensions   = &ModelSlots{}
	_ fwk.EnqueueExtensions = &ModelSlots{}
	_ fwk.SignPlugin        = &ModelSlots{}
)

// New builds the plugin from validated args; invalid args are an error that
// stops the scheduler at start, naming each bad field.
func New(ctx context.Context, obj runtime.Object, h fwk.Handle) (fwk.Plugin, error) {
	args, ok := obj.(*config.ModelSlotsArgs)
	if !ok {
		return nil, fmt.Errorf("want args to be of type ModelSlotsArgs, got %T", obj)
	}
	if err := validation.ValidateModelSlotsArgs(nil, args); err != nil {
		return nil, fmt.Errorf("invalid %s args: %w", Name, err)
	}
	capacity := NewCapacity(args)
	return &ModelSlots{
		logger:            klog.FromContext(ctx).WithValues("plugin", Name),
		handle:            h,
		capacity:          capacity,
		invalidSlots:      invalidNodeSlotsReason(capacity.Label()),
		defaultMaxPerNode: int64(args.MaxReplicasPerNode),
		strategy:          args.ScoringStrategy,
		usage:             newUsageCache(capacity),
	}, nil
}

// Name returns the plugin's name.
func (pl *ModelSlots) Name() string { return Name }

// preFilterState is the demand of the pod being scheduled. It does not change
// when pods are added to or removed from nodes, so Clone shares it.
type preFilterState struct {
	demand Demand
	// atCap is Filter's reason for a node that runs exactly the maximum of
	// replicas of the pod's model, formatted once per cycle.
	atCap string
}

// Clone returns the state itself: it is never modified.
func (s *preFilterState) Clone() fwk.StateData { return s }

func getPreFilterState(state fwk.CycleState) (*preFilterState, error) {
	c, err := state.Read(preFilterStateKey)
	if err != nil {
		return nil, fmt.Errorf("reading %q from cycleState: %w", preFilterStateKey, err)
	}
	s, ok := c.(*preFilterState)
	if !ok {
		return nil, fmt.Errorf("invalid PreFilter state, got type %T", c)
	}
	return s, nil
}

// SignPod tells opportunistic batching which pods the plugin treats alike.
func (pl *ModelSlots) SignPod(_ context.Context, pod *v1.Pod) ([]fwk.SignFragment, *fwk.Status) {
	d, isModelServer, err := PodDemand(pod, pl.defaultMaxPerNode)
	if err != nil {
		// Such a pod is rejected anyway; it is not worth batching.
		return nil, fwk.NewStatus(fwk.Unschedulable, err.Error())
	}
	var value any
	if isModelServer {
		value = d
	}
	return []fwk.SignFragment{{Key: signFragmentKey, Value: value}}, nil
}

// PreFilter skips pods without the model label, and rejects a model server at
// once when no node it may use (by its node selector and required node
// affinity) has room for it, with a message naming the model and the numbers.
//
// It returns at the first node with room, and starts each walk where the last
// one found room, so placing many replicas in a row costs little more than
// one walk over the nodes in all. Only a rejection walks every node. Each
// node costs one cache lookup unless it changed since it was last seen.
func (pl *ModelSlots) PreFilter(_ context.Context, state fwk.CycleState, pod *v1.Pod, nodes []fwk.NodeInfo) (*fwk.PreFilterResult, *fwk.Status) {
	d, isModelServer, err := PodDemand(pod, pl.defaultMaxPerNode)
	if !isModelServer {
		return nil, fwk.NewStatus(fwk.Skip)
	}
	if err != nil {
		// Only editing the pod can fix this.
		return nil, fwk.NewStatus(fwk.UnschedulableAndUnresolvable, err.Error())
	}
	s := &preFilterState{demand: d}
	if d.MaxPerNode > 0 {
		s.atCap = pl.reasons.reason(reasonKey{kind: atModelCap, a: d.MaxPerNode, b: d.MaxPerNode, model: d.Key.Model})
	}
	state.Write(preFilterStateKey, s)
	if len(nodes) == 0 {
		return nil, nil
	}
	pl.sweep(len(nodes))

	restricted := hasRequiredNodeAffinity(pod)
	affinity := nodeaffinity.GetRequiredNodeAffinity(pod)
	priority := corev1.PodPriority(pod)
	cluster := clusterSlots{label: pl.capacity.Label()}
	found := false
	pl.usage.walk(nodes, int(pl.walkFrom.Load()), func(i int, u *nodeUsage) bool {
		if restricted {
			if ok, _ := affinity.Match(nodes[i].Node()); !ok {
				return true
			}
		}
		if u.fits(d) {
			pl.walkFrom.Store(int64(i))
			found = true
			return false
		}
		cluster.add(u, d, priority)
		return true
	})
	if found {
		return nil, nil
	}
	return nil, noRoomStatus(pod, d, &cluster, restricted)
}

// hasRequiredNodeAffinity reports whether the pod may use only some nodes.
func hasRequiredNodeAffinity(pod *v1.Pod) bool {
	a := pod.Spec.Affinity
	return len(pod.Spec.NodeSelector) > 0 ||
		(a != nil && a.NodeAffinity != nil && a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution != nil)
}

// PreFilterExtensions returns nil: Filter reads each node's usage from the
// NodeInfo it is given, which already reflects the pods that preemption
// removes or nominated pods add.
func (pl *ModelSlots) PreFilterExtensions() fwk.PreFilterExtensions { return nil }

// noRoomStatus is the rejection when no node the pod may use has room. The
// code is Unschedulable, letting preemption try, only when the pod may
// preempt and some node big enough runs a model server of lower priority;
// otherwise evicting pods cannot help and it is UnschedulableAndUnresolvable.
func noRoomStatus(pod *v1.Pod, d Demand, cluster *clusterSlots, restricted bool) *fwk.Status {
	code := fwk.UnschedulableAndUnresolvable
	if cluster.preemptible && (pod.Spec.PreemptionPolicy == nil || *pod.Spec.PreemptionPolicy != v1.PreemptNever) {
		code = fwk.Unschedulable
	}
	return fwk.NewStatus(code, cluster.message(d, restricted))
}

// Filter rejects a node without room for one more replica, saying why in
// terms of that node's slots or the per-model cap.
func (pl *ModelSlots) Filter(_ context.Context, state fwk.CycleState, _ *v1.Pod, ni fwk.NodeInfo) *fwk.Status {
	s, err := getPreFilterState(state)
	if err != nil {
		return fwk.AsStatus(err)
	}
	return pl.nodeStatus(s, pl.usage.get(ni, pl.inSnapshot))
}

// nodeStatus decides whether one more replica fits on a node. Lacking
// capacity cannot be fixed by evicting pods; slots or replicas in use can.
func (pl *ModelSlots) nodeStatus(s *preFilterState, u *nodeUsage) *fwk.Status {
	d := s.demand
	switch {
	case u.invalidLabel:
		return fwk.NewStatus(fwk.UnschedulableAndUnresolvable, pl.invalidSlots)
	case u.capacity == 0:
		return fwk.NewStatus(fwk.UnschedulableAndUnresolvable, ErrReasonNoSlots)
	case u.capacity < d.Slots:
		return fwk.NewStatus(fwk.UnschedulableAndUnresolvable, pl.reasons.reason(reasonKey{kind: tooSmall, a: u.capacity, b: d.Slots}))
	}
	slotsFull := u.free() < d.Slots
	replicas := int64(0)
	if d.MaxPerNode > 0 {
		replicas = u.replicasOf(d.Key)
	}
	atCap := d.MaxPerNode > 0 && replicas >= d.MaxPerNode
	if !slotsFull && !atCap {
		return nil
	}
	var reasons []string
	switch {
	case slotsFull && d.Slots == 1:
		reasons = append(reasons, u.inUseReason())
	case slotsFull:
		reasons = append(reasons, pl.reasons.reason(reasonKey{kind: slotsInUse, a: u.used, b: u.capacity, c: d.Slots}))
	}
	switch {
	case atCap && replicas == d.MaxPerNode:
		reasons = append(reasons, s.atCap)
	case atCap:
		reasons = append(reasons, pl.reasons.reason(reasonKey{kind: atModelCap, a: replicas, b: d.MaxPerNode, model: d.Key.Model}))
	}
	return fwk.NewStatus(fwk.Unschedulable, reasons...)
}

// PreScore skips Score for pods without the model label.
func (pl *ModelSlots) PreScore(_ context.Context, _ fwk.CycleState, pod *v1.Pod, _ []fwk.NodeInfo) *fwk.Status {
	if modelserver.Model(pod.Labels) == "" {
		return fwk.NewStatus(fwk.Skip)
	}
	return nil
}

// Score returns the model slots the node would have free after placing the
// pod; NormalizeScore turns that into a preference by the scoring strategy.
func (pl *ModelSlots) Score(_ context.Context, state fwk.CycleState, pod *v1.Pod, ni fwk.NodeInfo) (int64, *fwk.Status) {
	var d Demand
	if s, err := getPreFilterState(state); err == nil {
		d = s.demand
	} else {
		// PreFilter did not run for this cycle state; the demand is cheap
		// to compute again.
		var err error
		if d, _, err = PodDemand(pod, pl.defaultMaxPerNode); err != nil {
			return 0, fwk.AsStatus(err)
		}
	}
	return max(0, pl.usage.get(ni, pl.inSnapshot).free()-d.Slots), nil
}

// ScoreExtensions returns the plugin itself, which normalizes its scores.
func (pl *ModelSlots) ScoreExtensions() fwk.ScoreExtensions { return pl }

// NormalizeScore maps free slots onto [MinScore, MaxScore] across the
// feasible nodes: with Pack the node left with the fewest free slots scores
// highest, with Spread the one left with the most. Equal nodes score 0 (no
// preference).
func (pl *ModelSlots) NormalizeScore(_ context.Context, _ fwk.CycleState, _ *v1.Pod, scores fwk.NodeScoreList) *fwk.Status {
	if len(scores) == 0 {
		return nil
	}
	lo, hi := scores[0].Score, scores[0].Score
	for _, s := range scores[1:] {
		lo, hi = min(lo, s.Score), max(hi, s.Score)
	}
	for i := range scores {
		switch {
		case hi == lo:
			scores[i].Score = fwk.MinScore
		case pl.strategy == config.Spread:
			scores[i].Score = fwk.MaxScore * (scores[i].Score - lo) / (hi - lo)
		default:
			scores[i].Score = fwk.MaxScore * (hi - scores[i].Score) / (hi - lo)
		}
	}
	return nil
}

// inSnapshot reports whether ni is the scheduler's snapshot of its node rather
// than a modified copy made for preemption or nominated pods.
func (pl *ModelSlots) inSnapshot(ni fwk.NodeInfo) bool {
	cur, err := pl.handle.SnapshotSharedLister().NodeInfos().Get(ni.Node().Name)
	return err == nil && cur == ni
}

// sweep drops cached usage of deleted nodes once enough have piled up.
func (pl *ModelSlots) sweep(nodes int) {
	lister := pl.handle.SnapshotSharedLister().NodeInfos()
	removed := pl.usage.sweep(nodes, func(name string) bool {
		_, err := lister.Get(name)
		return err == nil
	})
	if removed > 0 {
		pl.logger.V(4).Info("Forgot the model-slot usage of deleted nodes", "nodes", removed)
	}
}

// clusterSlots sums model-slot usage over the nodes a pod may use, to explain
// why none has room for it.
type clusterSlots struct {
	label         string // the slots label, for the message
	nodes         int    // nodes that hold slots
	total, used   int64  // slots on them, and how many are in use
	largest       int64  // most slots on one node
	invalidLabels int    // nodes with an invalid slots label
	anySlotsFree  bool   // some node has as many slots free as the pod needs
	// preemptible: some node holds enough slots and runs a model server of
	// lower priority than the pod, so preemption might make room.
	preemptible bool
}

func (s *clusterSlots) add(u *nodeUsage, d Demand, priority int32) {
	if u.invalidLabel {
		s.invalidLabels++
	}
	if u.capacity == 0 {
		return
	}
	s.nodes++
	s.total += u.capacity
	s.used += min(u.used, u.capacity)
	s.largest = max(s.largest, u.capacity)
	if u.free() >= d.Slots {
		s.anySlotsFree = true
	}
	if u.capacity >= d.Slots && u.minPriority < priority {
		s.preemptible = true
	}
}

// message explains, naming the model and the numbers, why no node has room.
func (s *clusterSlots) message(d Demand, restricted bool) string {
	model := d.Key.Model
	where := plural(int64(s.nodes), "node")
	if restricted {
		where += " matching its node selector and affinity"
	}
	switch {
	case s.nodes == 0:
		msg := "model " + model + ": no node"
		if restricted {
			msg += " matching its node selector and affinity"
		}
		msg += " has model slots"
		if s.invalidLabels > 0 {
			return msg + fmt.Sprintf(" (%s an invalid %s label)", plural(int64(s.invalidLabels), "node")+" with", s.label)
		}
		return msg + " (nodes declare them with the " + s.label + " label)"
	case s.largest < d.Slots:
		return fmt.Sprintf("model %s needs %d model slots per replica, but the largest of %s has %d",
			model, d.Slots, where, s.largest)
	case s.used >= s.total && s.total == 1:
		return fmt.Sprintf("model %s: the 1 model slot on %s is in use", model, where)
	case s.used >= s.total:
		return fmt.Sprintf("model %s: all %d model slots on %s are in use", model, s.total, where)
	case !s.anySlotsFree:
		return fmt.Sprintf("model %s needs %d model slots per replica, but no node has that many free (%d of %d model slots on %s are free)",
			model, d.Slots, s.total-s.used, s.total, where)
	default:
		return fmt.Sprintf("model %s: every node with %s free already runs %s of it, max %d per node (%d of %d model slots on %s are in use)",
			model, plural(d.Slots, "model slot"), plural(d.MaxPerNode, "replica"), d.MaxPerNode, s.used, s.total, where)
	}
}
