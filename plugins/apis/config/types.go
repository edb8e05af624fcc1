package config

import (
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object

// ModelSlotsArgs configures the ModelSlots plugin, which caps how many
// model-server replicas a node runs. See docs/scheduler.md.
type ModelSlotsArgs struct {
	metav1.TypeMeta

	// NodeSlotsLabel is the node label that says how many model slots a node
	// holds. Clusters that do not trust kubelets to declare their own capacity
	// point it under the node-restriction.kubernetes.io/ prefix, which the
	// NodeRestriction admission plugin forbids kubelets to set.
	NodeSlotsLabel string
	// DefaultNodeSlots is how many model slots a node holds when it has no
	// NodeSlotsLabel and SlotResource does not apply.
	DefaultNodeSlots int32
	// SlotResource, when set, derives the slots of an unlabelled node from an
	// extended resource in its allocatable (for example nvidia.com/gpu).
	SlotResource *SlotResource
	// MaxReplicasPerNode caps how many replicas of one model a node runs when
	// the pod has no capstan.dev/max-per-node annotation. 0 means no cap.
	MaxReplicasPerNode int32
	// ScoringStrategy says which nodes Score prefers.
	ScoringStrategy ScoringStrategyType
}

// SlotResource derives model slots from an extended resource.
type SlotResource struct {
	// Name is the extended resource, for example nvidia.com/gpu.
	Name v1.ResourceName
	// PerSlot is how many units of the resource make one slot.
	PerSlot int64
}

// ScoringStrategyType names how Score ranks the nodes a pod fits on.
type ScoringStrategyType string

const (
	// Pack prefers the nodes with the fewest free model slots left after
	// placing the pod, keeping other nodes whole for large models.
	Pack ScoringStrategyType = "Pack"
	// Spread prefers the nodes with the most free model slots left, for
	// spreading replicas and load.
	Spread ScoringStrategyType = "Spread"
)
