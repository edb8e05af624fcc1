package v1

import (
	"k8s.io/apimachinery/pkg/conversion"
	"k8s.io/utils/ptr"

	"github.com/capstan-dev/capstan/plugins/apis/config"
)

// Convert_v1_ModelSlotsArgs_To_config_ModelSlotsArgs converts what the
// generator cannot: the optional enum pointer into the internal value.
func Convert_v1_ModelSlotsArgs_To_config_ModelSlotsArgs(in *ModelSlotsArgs, out *config.ModelSlotsArgs, s conversion.Scope) error {
	if err := autoConvert_v1_ModelSlotsArgs_To_config_ModelSlotsArgs(in, out, s); err != nil {
		return err
	}
	out.ScoringStrategy = config.ScoringStrategyType(ptr.Deref(in.ScoringStrategy, ""))
	return nil
}

// Convert_config_ModelSlotsArgs_To_v1_ModelSlotsArgs is the reverse, used
// when kube-scheduler prints its effective configuration.
func Convert_config_ModelSlotsArgs_To_v1_ModelSlotsArgs(in *config.ModelSlotsArgs, out *ModelSlotsArgs, s conversion.Scope) error {
	if err := autoConvert_config_ModelSlotsArgs_To_v1_ModelSlotsArgs(in, out, s); err != nil {
		return err
	}
	if in.ScoringStrategy != "" {
		out.ScoringStrategy = ptr.To(ScoringStrategyType(in.ScoringStrategy))
	}
	return nil
}
