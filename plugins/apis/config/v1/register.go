package v1

import (
	"k8s.io/apimachinery/pkg/runtime"
	schedv1 "k8s.io/kube-scheduler/config/v1"
)

// SchemeGroupVersion is kube-scheduler's kubescheduler.config.k8s.io/v1,
// which Capstan's args types join so that pluginConfig decodes them by the
// plugin's name (<Name>Args) like an in-tree plugin's.
var SchemeGroupVersion = schedv1.SchemeGroupVersion

var (
	// localSchemeBuilder is kube-scheduler's own v1 builder: registering here
	// puts the types, their defaults and conversions into every scheme
	// kube-scheduler builds from it, including the one it converts and
	// defaults plugin args with.
	localSchemeBuilder = &schedv1.SchemeBuilder
	// AddToScheme registers the v1 args types.
	AddToScheme = localSchemeBuilder.AddToScheme
)

func addKnownTypes(scheme *runtime.Scheme) error {
	scheme.AddKnownTypes(SchemeGroupVersion, &ModelSlotsArgs{})
	return nil
}

func init() {
	// Hand-written functions only; the generated files register their own.
	localSchemeBuilder.Register(addKnownTypes, addDefaultingFuncs)
}

func addDefaultingFuncs(scheme *runtime.Scheme) error {
	return RegisterDefaults(scheme)
}
