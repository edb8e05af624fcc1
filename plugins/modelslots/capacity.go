package modelslots

import (
	"errors"
	"fmt"
	"strconv"

	v1 "k8s.io/api/core/v1"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/plugins/apis/config"
)

// The labels and annotations the plugin reads. The model label itself is
// modelserver.ModelLabel.
const (
	// NodeSlotsLabel on a node says how many model-server replicas it holds,
	// unless the args' nodeSlotsLabel names another label.
	NodeSlotsLabel = "capstan.dev/model-slots"
	// SlotsAnnotation on a model-server pod says how many slots one replica
	// takes (default 1), for example 2 for a model sharded over two GPUs.
	SlotsAnnotation = "capstan.dev/slots"
	// MaxPerNodeAnnotation on a model-server pod caps how many replicas of its
	// model (in its namespace) one node runs; 0 means no cap.
	MaxPerNodeAnnotation = "capstan.dev/max-per-node"
)

// maxSlots bounds every slot count so that sums over thousands of nodes and
// pods cannot overflow.
const maxSlots = 1 << 20

// errInvalidNodeSlots marks a node whose slots label is not a count.
var errInvalidNodeSlots = errors.New("invalid node slots label")

// Capacity says how many model slots a node holds, following the plugin args.
type Capacity struct {
	label        string // the node label that declares slots
	defaultSlots int64
	resource     v1.ResourceName // "" when slots are not derived from a resource
	perSlot      int64
}

// NewCapacity returns the capacity model of validated args.
func NewCapacity(args *config.ModelSlotsArgs) Capacity {
	c := Capacity{label: args.NodeSlotsLabel, defaultSlots: int64(args.DefaultNodeSlots)}
	if r := args.SlotResource; r != nil {
		c.resource, c.perSlot = r.Name, r.PerSlot
	}
	return c
}

// Label returns the node label the capacity reads slots from.
func (c Capacity) Label() string { return c.label }

// NodeSlots returns how many model slots a node holds: its slots label (the
// args' nodeSlotsLabel) if it has one; else, when the args name a slot resource the node has, one slot
// per PerSlot units of its allocatable; else the args' default. A label that
// is not a non-negative integer gives 0 slots and an error wrapping
// errInvalidNodeSlots, so a typo never lets model servers in.
//
// For example, with slotResource {name: nvidia.com/gpu, perSlot: 2}, a node
// labelled <nodeSlotsLabel>=3 holds 3 slots, an unlabelled node with
// 8 GPUs holds 4, and an unlabelled node without GPUs holds defaultNodeSlots.
func (c Capacity) NodeSlots(node *v1.Node) (int64, error) {
	if v, ok := node.Labels[c.label]; ok {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 || n > maxSlots {
			return 0, fmt.Errorf("%w: %s=%q must be an integer from 0 to %d", errInvalidNodeSlots, c.label, v, maxSlots)
		}
		return n, nil
	}
	if c.resource != "" {
		if q, ok := node.Status.Allocatable[c.resource]; ok {
			return min(q.Value()/c.perSlot, maxSlots), nil
		}
	}
	return c.defaultSlots, nil
}

// ModelKey names a model within a namespace: per-model caps count replicas
// of the same model in the same namespace, so tenants do not cap each other.
type ModelKey struct {
	Namespace, Model string
}

// Demand is what one model-server replica asks of a node.
type Demand struct {
	// Key is the model, for the per-node cap.
	Key ModelKey
	// Slots is how many model slots the replica takes.
	Slots int64
	// MaxPerNode caps how many replicas of the model a node may run; 0 means
	// no cap.
	MaxPerNode int64
}

// PodDemand returns what a pod asks of a node. isModelServer is false for pods
// without the capstan.dev/model label, which the plugin leaves alone. An
// annotation that is not a valid count is an error naming it; defaultMaxPerNode
// applies when the pod has no MaxPerNodeAnnotation.
func PodDemand(pod *v1.Pod, defaultMaxPerNode int64) (d Demand, isModelServer bool, err error) {
	model := modelserver.Model(pod.Labels)
	if model == "" {
		return Demand{}, false, nil
	}
	d = Demand{Key: ModelKey{Namespace: pod.Namespace, Model: model}, Slots: 1, MaxPerNode: defaultMaxPerNode}
	if v, ok := pod.Annotations[SlotsAnnotation]; ok {
		if d.Slots, err = parseCount(SlotsAnnotation, v, 1); err != nil {
			return d, true, err
		}
	}
	if v, ok := pod.Annotations[MaxPerNodeAnnotation]; ok {
		if d.MaxPerNode, err = parseCount(MaxPerNodeAnnotation, v, 0); err != nil {
			return d, true, err
		}
	}
	return d, true, nil
}

// podSlots returns how many slots a pod placed on a node holds: its
// SlotsAnnotation, or 1 when it has none or an invalid one (a pod that
// landed by other means still occupies its node).
func podSlots(pod *v1.Pod) int64 {
	v, ok := pod.Annotations[SlotsAnnotation]
	if !ok {
		return 1
	}
	n, err := parseCount(SlotsAnnotation, v, 1)
	if err != nil {
		return 1
	}
	return n
}

func parseCount(key, v string, lowest int64) (int64, error) {
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < lowest || n > maxSlots {
		return 0, fmt.Errorf("pod annotation %s=%q is invalid: must be an integer from %d to %d", key, v, lowest, maxSlots)
	}
	return n, nil
}
