package config

import (
	"k8s.io/apimachinery/pkg/runtime"
	schedconfig "k8s.io/kubernetes/pkg/scheduler/apis/config"
)

// SchemeGroupVersion is the internal version of kube-scheduler's config group,
// which Capstan's args types join.
var SchemeGroupVersion = schedconfig.SchemeGroupVersion

var (
	// localSchemeBuilder is kube-scheduler's own builder: registering here
	// puts the args types into every scheme kube-scheduler builds from it,
	// including the private one it converts plugin args with.
	localSchemeBuilder = &schedconfig.SchemeBuilder
	// AddToScheme registers the internal args types.
	AddToScheme = localSchemeBuilder.AddToScheme
)

func addKnownTypes(scheme *runtime.Scheme) error {
	scheme.AddKnownTypes(SchemeGroupVersion, &ModelSlotsArgs{})
	return nil
}

func init() {
	localSchemeBuilder.Register(addKnownTypes)
}
