package validation

import (
	"testing"

	"github.com/google/go-cmp/cmp"
	"k8s.io/apimachinery/pkg/util/validation/field"

	"github.com/capstan-dev/capstan/plugins/apis/config"
)

func TestValidateModelSlotsArgs(t *testing.T) {
	valid := func() config.ModelSlotsArgs {
		return config.ModelSlotsArgs{NodeSlotsLabel: "capstan.dev/model-slots", ScoringStrategy: config.Pack}
	}
	tests := []struct {
		name    string
		path    *field.Path
		args    func(*config.ModelSlotsArgs)
		wantErr string
	}{
		{name: "defaults are valid", args: func(*config.ModelSlotsArgs) {}},
		{
			name: "every field set and valid",
			args: func(a *config.ModelSlotsArgs) {
				a.DefaultNodeSlots, a.MaxReplicasPerNode, a.ScoringStrategy = 2, 1, config.Spread
				a.SlotResource = &config.SlotResource{Name: "nvidia.com/gpu", PerSlot: 2}
			},
		},
		{
			name:    "negative default node slots",
			args:    func(a *config.ModelSlotsArgs) { a.DefaultNodeSlots = -1 },
			wantErr: "defaultNodeSlots: Invalid value: -1: must be greater than or equal to 0",
		},
		{
			name:    "negative max replicas per node",
			args:    func(a *config.ModelSlotsArgs) { a.MaxReplicasPerNode = -2 },
			wantErr: "maxReplicasPerNode: Invalid value: -2: must be greater than or equal to 0",
		},
		{
			name: "restricted node slots label",
			args: func(a *config.ModelSlotsArgs) {
				a.NodeSlotsLabel = "node-restriction.kubernetes.io/capstan-model-slots"
			},
		},
		{
			name:    "empty node slots label",
			args:    func(a *config.ModelSlotsArgs) { a.NodeSlotsLabel = "" },
			wantErr: `nodeSlotsLabel: Invalid value: "": name part must be non-empty; name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')`,
		},
		{
			name:    "node slots label that is not a label key",
			args:    func(a *config.ModelSlotsArgs) { a.NodeSlotsLabel = "capstan.dev/model slots" },
			wantErr: `nodeSlotsLabel: Invalid value: "capstan.dev/model slots": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')`,
		},
		{
			name:    "unknown scoring strategy",
			args:    func(a *config.ModelSlotsArgs) { a.ScoringStrategy = "MostAllocated" },
			wantErr: `scoringStrategy: Unsupported value: "MostAllocated": supported values: "Pack", "Spread"`,
		},
		{
			name:    "empty scoring strategy (not defaulted)",
			args:    func(a *config.ModelSlotsArgs) { a.ScoringStrategy = "" },
			wantErr: `scoringStrategy: Unsupported value: "": supported values: "Pack", "Spread"`,
		},
		{
			name:    "slot resource without a name",
			args:    func(a *config.ModelSlotsArgs) { a.SlotResource = &config.SlotResource{PerSlot: 1} },
			wantErr: "slotResource.name: Required value: the extended resource to derive slots from, for example nvidia.com/gpu",
		},
		{
			name:    "slot resource that is not an extended resource",
			args:    func(a *config.ModelSlotsArgs) { a.SlotResource = &config.SlotResource{Name: "cpu", PerSlot: 1} },
			wantErr: `slotResource.name: Invalid value: "cpu": must be an extended resource name, for example nvidia.com/gpu`,
		},
		{
			name: "slot resource in the kubernetes.io namespace",
			args: func(a *config.ModelSlotsArgs) {
				a.SlotResource = &config.SlotResource{Name: "kubernetes.io/gpu", PerSlot: 1}
			},
			wantErr: `slotResource.name: Invalid value: "kubernetes.io/gpu": must be an extended resource name, for example nvidia.com/gpu`,
		},
		{
			name:    "zero units per slot",
			args:    func(a *config.ModelSlotsArgs) { a.SlotResource = &config.SlotResource{Name: "nvidia.com/gpu"} },
			wantErr: "slotResource.perSlot: Invalid value: 0: must be greater than 0",
		},
		{
			name: "every error at once, under a path",
			path: field.NewPath("profiles").Index(0).Child("pluginConfig").Index(1).Child("args"),
			args: func(a *config.ModelSlotsArgs) {
				a.DefaultNodeSlots, a.MaxReplicasPerNode, a.ScoringStrategy = -1, -1, "Fill"
				a.SlotResource = &config.SlotResource{PerSlot: -3}
			},
			wantErr: "[profiles[0].pluginConfig[1].args.defaultNodeSlots: Invalid value: -1: must be greater than or equal to 0, " +
				"profiles[0].pluginConfig[1].args.maxReplicasPerNode: Invalid value: -1: must be greater than or equal to 0, " +
				`profiles[0].pluginConfig[1].args.scoringStrategy: Unsupported value: "Fill": supported values: "Pack", "Spread", ` +
				"profiles[0].pluginConfig[1].args.slotResource.name: Required value: the extended resource to derive slots from, for example nvidia.com/gpu, " +
				"profiles[0].pluginConfig[1].args.slotResource.perSlot: Invalid value: -3: must be greater than 0]",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			args := valid()
			tc.args(&args)
			var got string
			if err := ValidateModelSlotsArgs(tc.path, &args); err != nil {
				got = err.Error()
			}
			if diff := cmp.Diff(tc.wantErr, got); diff != "" {
				t.Errorf("ValidateModelSlotsArgs error (-want +got):\n%s", diff)
			}
		})
	}
}
