// Package scheme registers the args types of Capstan's scheduler plugins into
// kube-scheduler's own scheme. capstan-scheduler imports it for that side
// effect, so a KubeSchedulerConfiguration's pluginConfig decodes, defaults,
// strictly checks and converts Capstan's args like an in-tree plugin's.
package scheme

import (
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	kubeschedulerscheme "k8s.io/kubernetes/pkg/scheduler/apis/config/scheme"

	"github.com/capstan-dev/capstan/plugins/apis/config"
	configv1 "github.com/capstan-dev/capstan/plugins/apis/config/v1"
)

var (
	// Scheme is kube-scheduler's scheme, which the scheduler decodes its
	// configuration file with.
	Scheme = kubeschedulerscheme.Scheme
	// Codecs decode strictly: an unknown or misspelt field is an error.
	Codecs = serializer.NewCodecFactory(Scheme, serializer.EnableStrict)
)

func init() {
	AddToScheme(Scheme)
}

// AddToScheme registers the internal and v1 args types into scheme.
func AddToScheme(scheme *runtime.Scheme) {
	utilruntime.Must(config.AddToScheme(scheme))
	utilruntime.Must(configv1.AddToScheme(scheme))
}
