package v1

import "k8s.io/utils/ptr"

// Defaults of ModelSlotsArgs.
var (
	// DefaultNodeSlotsLabel: the label Capstan has always read, so existing
	// clusters keep working; see NodeSlotsLabel for the restricted choice.
	DefaultNodeSlotsLabel = "capstan.dev/model-slots"
	// DefaultNodeSlots: a node without the label runs no model servers, so
	// they land only where an operator said they fit.
	DefaultNodeSlots int32 = 0
	// DefaultMaxReplicasPerNode: no per-model cap.
	DefaultMaxReplicasPerNode int32 = 0
	// DefaultScoringStrategy: packing keeps whole nodes free for models that
	// need several slots.
	DefaultScoringStrategy = Pack
	// DefaultPerSlot: one unit of the slot resource (one GPU) per slot.
	DefaultPerSlot int64 = 1
)

// SetDefaults_ModelSlotsArgs fills the fields that are unset and leaves every
// set field, valid or not, for validation to judge.
func SetDefaults_ModelSlotsArgs(obj *ModelSlotsArgs) {
	if obj.NodeSlotsLabel == nil {
		obj.NodeSlotsLabel = ptr.To(DefaultNodeSlotsLabel)
	}
	if obj.DefaultNodeSlots == nil {
		obj.DefaultNodeSlots = ptr.To(DefaultNodeSlots)
	}
	if obj.MaxReplicasPerNode == nil {
		obj.MaxReplicasPerNode = ptr.To(DefaultMaxReplicasPerNode)
	}
	if obj.ScoringStrategy == nil {
		obj.ScoringStrategy = ptr.To(DefaultScoringStrategy)
	}
	if obj.SlotResource != nil && obj.SlotResource.PerSlot == nil {
		obj.SlotResource.PerSlot = ptr.To(DefaultPerSlot)
	}
}
