// Command capstan-scheduler is kube-scheduler with Capstan's ModelSlots plugin
// compiled in. Run it as a secondary scheduler whose profile enables the
// plugin (manifests/scheduler, docs/scheduler.md); it takes every
// kube-scheduler flag and a KubeSchedulerConfiguration via --config.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // --logging-format=json
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go and leader-election metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // kubernetes_build_info
	"k8s.io/kubernetes/cmd/kube-scheduler/app"

	// Registers the plugin args types into kube-scheduler's scheme.
	_ "github.com/capstan-dev/capstan/plugins/apis/config/scheme"
	"github.com/capstan-dev/capstan/plugins/modelslots"
)

func main() {
	command := app.NewSchedulerCommand(app.WithPlugin(modelslots.Name, modelslots.New))
	command.Use = "capstan-scheduler"
	os.Exit(cli.Run(command))
}
