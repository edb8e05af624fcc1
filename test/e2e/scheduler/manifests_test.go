package scheduler

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2/ktesting"
	schedconfig "k8s.io/kubernetes/pkg/scheduler/apis/config"
	schedvalidation "k8s.io/kubernetes/pkg/scheduler/apis/config/validation"
	kresource "sigs.k8s.io/kustomize/api/resource"

	"github.com/capstan-dev/capstan/plugins/apis/config"
	"github.com/capstan-dev/capstan/plugins/apis/config/scheme"
	"github.com/capstan-dev/capstan/plugins/apis/config/validation"
	"github.com/capstan-dev/capstan/plugins/modelslots"
	"github.com/capstan-dev/capstan/test/components"
)

// manifests/scheduler builds with kustomize, every object passes the API
// server's validation and admission (a server-side dry run, Deployment
// included), its configuration is valid for capstan-scheduler, and the
// scheduler runs with just the RBAC it grants: it holds its own lease, and
// may not read Secrets.
func TestManifests(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	sched := startScheduler(t)
	c := testCluster

	resources, err := components.Render("scheduler")
	if err != nil {
		t.Fatal(err)
	}
	stream, err := components.YAML(resources)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.DryRunApply(ctx, "", bytes.NewReader(stream)); err != nil {
		t.Fatalf("server-side dry run of manifests/scheduler: %v", err)
	}
	if _, err := c.Client.AppsV1().Deployments(systemNamespace).Get(ctx, "capstan-scheduler", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("the dry run created the Deployment (get: %v)", err)
	}

	t.Run("configuration", func(t *testing.T) {
		cfg := decodedConfig(t, resources)
		if err := schedvalidation.ValidateKubeSchedulerConfiguration(cfg); err != nil {
			t.Errorf("kube-scheduler rejects the configuration: %v", err)
		}
		if len(cfg.Profiles) != 1 || cfg.Profiles[0].SchedulerName != schedulerName {
			t.Fatalf("profiles %v, want just %s: the cluster's scheduler keeps the default profile", profileNames(cfg), schedulerName)
		}
		le := cfg.LeaderElection
		if !le.LeaderElect || le.ResourceName != schedulerName || le.ResourceNamespace != systemNamespace {
			t.Errorf("leader election %+v, want on, with lease %s/%s", le, systemNamespace, schedulerName)
		}
		var args *config.ModelSlotsArgs
		for _, pc := range cfg.Profiles[0].PluginConfig {
			if pc.Name == modelslots.Name {
				args, _ = pc.Args.(*config.ModelSlotsArgs)
			}
		}
		if args == nil {
			t.Fatal("no ModelSlots args in the profile")
		}
		if err := validation.ValidateModelSlotsArgs(nil, args); err != nil {
			t.Errorf("ModelSlots args: %v", err)
		}
		if !enabled(cfg.Profiles[0].Plugins.MultiPoint, modelslots.Name) {
			t.Error("ModelSlots is not enabled in the profile")
		}
		// The running scheduler reports the order it calls plugins in: a
		// full node should be turned away by ModelSlots before the default
		// plugins spend time on it. Its PreFilter must come after
		// DynamicResources', whose PostFilter fails when its PreFilter did
		// not run (TestReplicasBeyondSlotsWaitWithReason shows the effect).
		order := pluginOrder(t, sched.LogPath)
		if names := order["Filter"]; len(names) == 0 || names[0] != modelslots.Name {
			t.Errorf("Filter plugins run in the order %v, want %s first", names, modelslots.Name)
		}
		pre := order["PreFilter"]
		if i, dra := slices.Index(pre, modelslots.Name), slices.Index(pre, "DynamicResources"); i < 0 || i < dra {
			t.Errorf("PreFilter plugins run in the order %v, want %s after DynamicResources", pre, modelslots.Name)
		}
	})

	t.Run("deployment", func(t *testing.T) {
		ds, err := components.Decode[appsv1.Deployment](resources, "Deployment")
		if err != nil || len(ds) != 1 {
			t.Fatalf("want one Deployment in manifests/scheduler, got %d: %v", len(ds), err)
		}
		d := ds[0]
		spec := d.Spec.Template.Spec
		if d.Namespace != systemNamespace || spec.ServiceAccountName != "capstan-scheduler" {
			t.Errorf("Deployment %s/%s runs as %q", d.Namespace, d.Name, spec.ServiceAccountName)
		}
		if spec.SchedulerName != "" && spec.SchedulerName != corev1.DefaultSchedulerName {
			t.Errorf("capstan-scheduler's own pod asks for scheduler %q; it must not depend on itself", spec.SchedulerName)
		}
		sc := spec.SecurityContext
		if sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot {
			t.Error("the pod does not insist on running as non-root")
		}
		ctr := spec.Containers[0]
		if ctr.Image != "ghcr.io/capstan-dev/capstan-scheduler:v0.1.0" {
			t.Errorf("image %s", ctr.Image)
		}
		if ctr.LivenessProbe == nil || ctr.ReadinessProbe == nil || ctr.StartupProbe == nil {
			t.Error("the container lacks a liveness, readiness or startup probe")
		}
		csc := ctr.SecurityContext
		if csc == nil || csc.AllowPrivilegeEscalation == nil || *csc.AllowPrivilegeEscalation ||
			csc.ReadOnlyRootFilesystem == nil || !*csc.ReadOnlyRootFilesystem {
			t.Error("the container may escalate privileges or write its root filesystem")
		}
		var configMap string
		for _, v := range spec.Volumes {
			if v.ConfigMap != nil {
				configMap = v.ConfigMap.Name
			}
		}
		if !hasResource(resources, "ConfigMap", configMap) {
			t.Errorf("the Deployment mounts ConfigMap %q, which the manifests do not have", configMap)
		}
	})

	t.Run("rbac", func(t *testing.T) {
		kubeconfig, err := c.ServiceAccountKubeconfig(ctx, systemNamespace, "capstan-scheduler")
		if err != nil {
			t.Fatal(err)
		}
		restConfig, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			t.Fatal(err)
		}
		client := kubernetes.NewForConfigOrDie(restConfig)
		// The running scheduler renews its lease as this ServiceAccount.
		lease, err := client.CoordinationV1().Leases(systemNamespace).Get(ctx, schedulerName, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("reading its own lease: %v", err)
		}
		if lease.Spec.HolderIdentity == nil || *lease.Spec.HolderIdentity == "" {
			t.Error("nobody holds the capstan-scheduler lease")
		}
		if _, err := client.CoordinationV1().Leases("kube-system").Get(ctx, "kube-controller-manager", metav1.GetOptions{}); !apierrors.IsForbidden(err) {
			t.Errorf("reading another component's lease: %v, want Forbidden", err)
		}
		if _, err := client.CoreV1().Secrets(systemNamespace).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
			t.Errorf("listing Secrets: %v, want Forbidden", err)
		}
	})

	// /metrics is served to authorized callers only, which needs delegated
	// authentication and authorization to work with the manifests' RBAC
	// (the client CA from kube-system, SubjectAccessReviews), and shows the
	// replicas ModelSlots keeps waiting.
	t.Run("metrics", func(t *testing.T) {
		resp, err := insecureClient(t, "", "").Get(sched.URL + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized && resp.StatusCode != http.StatusForbidden {
			t.Errorf("/metrics without credentials: %s, want 401 or 403", resp.Status)
		}

		// A replica whose node selector matches none of the nodes that have
		// slots: ModelSlots turns it away (with no nodes at all, the
		// scheduler would not get as far as asking the plugins).
		ns := testNamespace(ctx, t, "metrics")
		slotNodes(ctx, t, "metrics", 1)
		pod := modelPod(ns, "nowhere", "llama-3-8b", nil)
		pod.Spec.NodeSelector = map[string]string{groupLabel: "no-such-group"}
		if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		admin := insecureClient(t, c.RESTConfig.CertFile, c.RESTConfig.KeyFile)
		var waiting, leader float64
		err = c.WaitFor(ctx, 30*time.Second, "ModelSlots to count a waiting replica in /metrics", func(context.Context) (bool, error) {
			resp, err := admin.Get(sched.URL + "/metrics")
			if err != nil {
				return false, err
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return false, fmt.Errorf("/metrics as admin: %s", resp.Status)
			}
			parser := expfmt.NewTextParser(model.UTF8Validation)
			families, err := parser.TextToMetricFamilies(resp.Body)
			if err != nil {
				return false, err
			}
			waiting = gauge(families["scheduler_unschedulable_pods"], map[string]string{"plugin": modelslots.Name, "profile": schedulerName})
			leader = gauge(families["leader_election_master_status"], map[string]string{"name": "kube-scheduler"})
			return waiting >= 1, nil
		})
		if err != nil {
			t.Errorf("%v (scheduler_unschedulable_pods = %v)", err, waiting)
		}
		// The one replica holds the Lease, and says so.
		if leader != 1 {
			t.Errorf("leader_election_master_status{name=kube-scheduler} = %v, want 1", leader)
		}
	})
}

// pluginOrder reads, from kube-scheduler's log (-v=2 and up), the plugins its
// profile runs at each extension point, in order.
func pluginOrder(t *testing.T, logPath string) map[string][]string {
	t.Helper()
	data, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	const marker = `"the scheduler starts to work with those plugins"`
	for _, line := range strings.Split(string(data), "\n") {
		if !strings.Contains(line, marker) {
			continue
		}
		_, plugins, ok := strings.Cut(line, " Plugins=")
		if !ok {
			break
		}
		var points map[string]struct{ Enabled []struct{ Name string } }
		if err := json.Unmarshal([]byte(plugins), &points); err != nil {
			t.Fatalf("the scheduler's plugin list: %v\n%s", err, line)
		}
		order := map[string][]string{}
		for point, set := range points {
			for _, p := range set.Enabled {
				order[point] = append(order[point], p.Name)
			}
		}
		return order
	}
	t.Fatalf("no %s line in %s", marker, logPath)
	return nil
}

// insecureClient is an HTTPS client for the scheduler's self-signed serving
// certificate, presenting a client certificate when given one.
func insecureClient(t *testing.T, certFile, keyFile string) *http.Client {
	t.Helper()
	cfg := &tls.Config{InsecureSkipVerify: true} //nolint:gosec // a process of this test, on loopback
	if certFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	tr := &http.Transport{TLSClientConfig: cfg}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 5 * time.Second}
}

// gauge returns the value of the family's gauge with the given labels.
func gauge(family *dto.MetricFamily, labels map[string]string) float64 {
	if family == nil {
		return 0
	}
	for _, m := range family.GetMetric() {
		matched := 0
		for _, l := range m.GetLabel() {
			if labels[l.GetName()] == l.GetValue() {
				matched++
			}
		}
		if matched == len(labels) {
			return m.GetGauge().GetValue()
		}
	}
	return 0
}

// decodedConfig decodes the manifests' configuration as capstan-scheduler
// does: strictly, through kube-scheduler's scheme with Capstan's args types.
func decodedConfig(t *testing.T, resources []*kresource.Resource) *schedconfig.KubeSchedulerConfiguration {
	t.Helper()
	for _, r := range resources {
		if r.GetKind() == "ConfigMap" {
			obj, _, err := scheme.Codecs.UniversalDecoder().Decode([]byte(r.GetDataMap()["config.yaml"]), nil, nil)
			if err != nil {
				t.Fatalf("decoding the configuration: %v", err)
			}
			cfg, ok := obj.(*schedconfig.KubeSchedulerConfiguration)
			if !ok {
				t.Fatalf("the configuration decoded to a %T", obj)
			}
			return cfg
		}
	}
	t.Fatal("no ConfigMap in manifests/scheduler")
	return nil
}

func hasResource(resources []*kresource.Resource, kind, name string) bool {
	for _, r := range resources {
		if r.GetKind() == kind && r.GetName() == name {
			return true
		}
	}
	return false
}

func enabled(set schedconfig.PluginSet, name string) bool {
	for _, p := range set.Enabled {
		if p.Name == name {
			return true
		}
	}
	return false
}

func profileNames(cfg *schedconfig.KubeSchedulerConfiguration) []string {
	var names []string
	for _, p := range cfg.Profiles {
		names = append(names, p.SchedulerName)
	}
	return names
}
