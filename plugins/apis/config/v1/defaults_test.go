package v1

import (
	"testing"

	"github.com/google/go-cmp/cmp"
	"k8s.io/utils/ptr"
)

func TestSetDefaultsModelSlotsArgs(t *testing.T) {
	tests := map[string]struct {
		in, want *ModelSlotsArgs
	}{
		"empty args get every default": {
			in: &ModelSlotsArgs{},
			want: &ModelSlotsArgs{DefaultNodeSlots: ptr.To[int32](0), MaxReplicasPerNode: ptr.To[int32](0),
				ScoringStrategy: ptr.To(Pack), NodeSlotsLabel: ptr.To(DefaultNodeSlotsLabel)},
		},
		"a restricted slots label is kept": {
			in: &ModelSlotsArgs{NodeSlotsLabel: ptr.To("node-restriction.kubernetes.io/capstan-model-slots")},
			want: &ModelSlotsArgs{DefaultNodeSlots: ptr.To[int32](0), MaxReplicasPerNode: ptr.To[int32](0),
				ScoringStrategy: ptr.To(Pack), NodeSlotsLabel: ptr.To("node-restriction.kubernetes.io/capstan-model-slots")},
		},
		"slot resource gets one unit per slot": {
			in: &ModelSlotsArgs{SlotResource: &SlotResource{Name: "nvidia.com/gpu"}},
			want: &ModelSlotsArgs{DefaultNodeSlots: ptr.To[int32](0), MaxReplicasPerNode: ptr.To[int32](0),
				ScoringStrategy: ptr.To(Pack), NodeSlotsLabel: ptr.To(DefaultNodeSlotsLabel), SlotResource: &SlotResource{Name: "nvidia.com/gpu", PerSlot: ptr.To[int64](1)}},
		},
		"set fields are kept, even invalid or zero ones": {
			in: &ModelSlotsArgs{NodeSlotsLabel: ptr.To(""), DefaultNodeSlots: ptr.To[int32](-1), MaxReplicasPerNode: ptr.To[int32](3),
				ScoringStrategy: ptr.To[ScoringStrategyType](""), SlotResource: &SlotResource{Name: "x/y", PerSlot: ptr.To[int64](0)}},
			want: &ModelSlotsArgs{NodeSlotsLabel: ptr.To(""), DefaultNodeSlots: ptr.To[int32](-1), MaxReplicasPerNode: ptr.To[int32](3),
				ScoringStrategy: ptr.To[ScoringStrategyType](""), SlotResource: &SlotResource{Name: "x/y", PerSlot: ptr.To[int64](0)}},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			SetObjectDefaults_ModelSlotsArgs(tc.in)
			if diff := cmp.Diff(tc.want, tc.in); diff != "" {
				t.Errorf("defaulted args (-want +got):\n%s", diff)
			}
		})
	}
}
