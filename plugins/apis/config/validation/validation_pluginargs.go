// Package validation checks the arguments of Capstan's scheduler plugins. A
// plugin's New calls its validator, so invalid args stop the scheduler at
// start with every problem named by its field path.
package validation

import (
	"strings"

	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/validation/field"
	v1helper "k8s.io/kubernetes/pkg/apis/core/v1/helper"

	"github.com/capstan-dev/capstan/plugins/apis/config"
)

var supportedScoringStrategies = sets.New(string(config.Pack), string(config.Spread))

// ValidateModelSlotsArgs checks defaulted ModelSlots args. path is where the
// args sit in a larger object, or nil.
func ValidateModelSlotsArgs(path *field.Path, args *config.ModelSlotsArgs) error {
	var allErrs field.ErrorList
	if msgs := validation.IsQualifiedName(args.NodeSlotsLabel); len(msgs) > 0 {
		allErrs = append(allErrs, field.Invalid(path.Child("nodeSlotsLabel"), args.NodeSlotsLabel, strings.Join(msgs, "; ")))
	}
	if args.DefaultNodeSlots < 0 {
		allErrs = append(allErrs, field.Invalid(path.Child("defaultNodeSlots"), args.DefaultNodeSlots, "must be greater than or equal to 0"))
	}
	if args.MaxReplicasPerNode < 0 {
		allErrs = append(allErrs, field.Invalid(path.Child("maxReplicasPerNode"), args.MaxReplicasPerNode, "must be greater than or equal to 0"))
	}
	if !supportedScoringStrategies.Has(string(args.ScoringStrategy)) {
		allErrs = append(allErrs, field.NotSupported(path.Child("scoringStrategy"), args.ScoringStrategy, sets.List(supportedScoringStrategies)))
	}
	if r := args.SlotResource; r != nil {
		p := path.Child("slotResource")
		switch {
		case r.Name == "":
			allErrs = append(allErrs, field.Required(p.Child("name"), "the extended resource to derive slots from, for example nvidia.com/gpu"))
		case !v1helper.IsExtendedResourceName(r.Name):
			allErrs = append(allErrs, field.Invalid(p.Child("name"), r.Name, "must be an extended resource name, for example nvidia.com/gpu"))
		}
		if r.PerSlot < 1 {
			allErrs = append(allErrs, field.Invalid(p.Child("perSlot"), r.PerSlot, "must be greater than 0"))
		}
	}
	return allErrs.ToAggregate()
}
