package scheduler

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/klog/v2/ktesting"
	"k8s.io/utils/ptr"

	"github.com/capstan-dev/capstan/plugins/modelslots"
	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/components"
)

// restrictedName is the profile of the scheduler TestRestrictedSlotsLabel
// runs beside the package's capstan-scheduler.
const restrictedName = "capstan-scheduler-restricted"

// A kubelet can label its own Node with capstan.dev/model-slots, and so
// claim capacity its node does not have; the NodeRestriction admission
// plugin keeps it from setting labels under node-restriction.kubernetes.io/.
// With nodeSlotsLabel pointing there, the scheduler reads the capacity the
// cluster's administrators set and ignores what the kubelet wrote.
func TestRestrictedSlotsLabel(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	// Installs the manifests (ServiceAccount, RBAC, ConfigMap) once for the
	// package.
	startScheduler(t)
	c := testCluster
	const restrictedLabel = "node-restriction.kubernetes.io/capstan-model-slots"

	node := cluster.Node{Name: "restricted-0", Labels: map[string]string{groupLabel: "restricted", restrictedLabel: "2"}}
	createNodes(ctx, t, node)

	// The node's kubelet, as the Node authorizer and NodeRestriction know
	// it.
	kubeletConfig := rest.CopyConfig(c.RESTConfig)
	kubeletConfig.Impersonate = rest.ImpersonationConfig{UserName: "system:node:" + node.Name, Groups: []string{"system:nodes", "system:authenticated"}}
	kubelet, err := kubernetes.NewForConfig(kubeletConfig)
	if err != nil {
		t.Fatal(err)
	}
	label := func(key, value string) error {
		patch := fmt.Sprintf(`{"metadata":{"labels":{%q:%q}}}`, key, value)
		_, err := kubelet.CoreV1().Nodes().Patch(ctx, node.Name, types.MergePatchType, []byte(patch), metav1.PatchOptions{})
		return err
	}
	if err := label(modelslots.NodeSlotsLabel, "9"); err != nil {
		t.Fatalf("the kubelet setting %s on its own Node: %v (the documented risk this option exists for)", modelslots.NodeSlotsLabel, err)
	}
	if err := label(restrictedLabel, "9"); !apierrors.IsForbidden(err) {
		t.Fatalf("the kubelet setting %s on its own Node: %v, want Forbidden by NodeRestriction", restrictedLabel, err)
	}

	resources, err := components.Render("scheduler")
	if err != nil {
		t.Fatal(err)
	}
	_, env, err := components.DeploymentCommand(resources)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := components.SchedulerConfig(resources)
	if err != nil {
		t.Fatal(err)
	}
	kubeconfig, err := c.ServiceAccountKubeconfig(ctx, systemNamespace, "capstan-scheduler")
	if err != nil {
		t.Fatal(err)
	}
	cfg.ClientConnection.Kubeconfig = kubeconfig
	// One process, so no lease: the package's scheduler holds its own.
	cfg.LeaderElection.LeaderElect = ptr.To(false)
	cfg.Profiles[0].SchedulerName = ptr.To(restrictedName)
	found := false
	for i, pc := range cfg.Profiles[0].PluginConfig {
		if pc.Name != modelslots.Name {
			continue
		}
		var args map[string]any
		if err := json.Unmarshal(pc.Args.Raw, &args); err != nil {
			t.Fatalf("ModelSlots args: %v", err)
		}
		args["nodeSlotsLabel"] = restrictedLabel
		raw, err := json.Marshal(args)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Profiles[0].PluginConfig[i].Args.Raw = raw
		found = true
	}
	if !found {
		t.Fatal("the manifests' configuration has no ModelSlots pluginConfig")
	}
	configPath, err := writeConfig(cfg, restrictedName+".yaml")
	if err != nil {
		t.Fatal(err)
	}
	runFailoverScheduler(ctx, t, restrictedName, configPath, kubeconfig, env).waitReady(ctx, t)

	ns := testNamespace(ctx, t, "restricted")
	for i := range 4 {
		pod := modelPod(ns, fmt.Sprintf("llama-%d", i), "llama-3-8b", nil)
		pod.Spec.SchedulerName = restrictedName
		pod.Spec.NodeSelector = map[string]string{groupLabel: "restricted"}
		if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// The administrators' 2 slots hold, not the kubelet's 9.
	p := waitForPlacement(ctx, t, ns, "app=llama-3-8b", 2, 2, time.Minute)
	const reason = "model llama-3-8b: all 2 model slots on 1 node matching its node selector and affinity are in use"
	for pod, msg := range p.unschedulable {
		if !strings.Contains(msg, reason) {
			t.Errorf("pod %s waits with %q, want it to name the cap (%q)", pod, msg, reason)
		}
	}
}
