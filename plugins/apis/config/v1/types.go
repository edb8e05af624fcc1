package v1

import (
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object

// ModelSlotsArgs configures the ModelSlots plugin, which caps how many
// model-server replicas (pods labelled capstan.dev/model) a node runs.
type ModelSlotsArgs struct {
	metav1.TypeMeta `json:",inline"`

	// NodeSlotsLabel is the node label that says how many model slots a node
	// holds. Anyone who may label nodes can set the default, a node's own
	// kubelet included; a label under the node-restriction.kubernetes.io/
	// prefix (for example node-restriction.kubernetes.io/capstan-model-slots)
	// is one the NodeRestriction admission plugin forbids kubelets to set.
	// Default capstan.dev/model-slots.
	NodeSlotsLabel *string `json:"nodeSlotsLabel,omitempty"`
	// DefaultNodeSlots is how many model slots a node holds when it has no
	// NodeSlotsLabel and SlotResource does not apply to it.
	// Default 0: unlabelled nodes run no model servers.
	DefaultNodeSlots *int32 `json:"defaultNodeSlots,omitempty"`
	// SlotResource, when set, gives an unlabelled node one slot per PerSlot
	// units of an extended resource in its allocatable, for example one slot
	// per nvidia.com/gpu. A node's label always wins. Default: unset.
	SlotResource *SlotResource `json:"slotResource,omitempty"`
	// MaxReplicasPerNode caps how many replicas of one model (per namespace)
	// a node runs, for pods without a capstan.dev/max-per-node annotation.
	// Default 0: no cap.
	MaxReplicasPerNode *int32 `json:"maxReplicasPerNode,omitempty"`
	// ScoringStrategy is Pack (prefer the nodes with the fewest free slots
	// left) or Spread (the most). Default Pack.
	ScoringStrategy *ScoringStrategyType `json:"scoringStrategy,omitempty"`
}

// SlotResource derives model slots from an extended resource.
type SlotResource struct {
	// Name is an extended resource in the nodes' allocatable, for example
	// nvidia.com/gpu. Required.
	Name v1.ResourceName `json:"name"`
	// PerSlot is how many units of the resource make one slot. Default 1.
	PerSlot *int64 `json:"perSlot,omitempty"`
}

// ScoringStrategyType names how Score ranks the nodes a pod fits on.
type ScoringStrategyType string

const (
	// Pack prefers the nodes with the fewest free model slots left after
	// placing the pod.
	Pack ScoringStrategyType = "Pack"
	// Spread prefers the nodes with the most free model slots left.
	Spread ScoringStrategyType = "Spread"
)
