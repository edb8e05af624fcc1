// Package scheduler tests capstan-scheduler and its ModelSlots plugin against
// a real control plane: the scheduler runs as a separate process, started
// from manifests/scheduler (its configuration, as its ServiceAccount with the
// manifests' RBAC), beside the cluster's own kube-scheduler.
package scheduler

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	schedv1 "k8s.io/kube-scheduler/config/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/kustomize/api/krusty"
	kresource "sigs.k8s.io/kustomize/api/resource"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/plugins/modelslots"
	"github.com/capstan-dev/capstan/test/cluster"
)

const (
	// schedulerName is the profile of capstan-scheduler in manifests/scheduler.
	schedulerName = "capstan-scheduler"
	// systemNamespace is where manifests/scheduler puts capstan-scheduler.
	systemNamespace = "capstan-system"
	// groupLabel marks the nodes one test creates, for node selectors and
	// clean-up.
	groupLabel = "e2e.capstan.dev/group"
	// benchEnv turns on the throughput benchmark (hack/bench-scheduler.sh);
	// it also leaves the cluster's kube-scheduler out.
	benchEnv = "CAPSTAN_BENCH_SCHEDULER"
)

var testCluster *cluster.Cluster

func TestMain(m *testing.M) {
	os.Exit(cluster.RunTests(m, cluster.Config{WithoutScheduler: os.Getenv(benchEnv) != ""}, &testCluster))
}

// renderManifests builds manifests/scheduler with kustomize, as
// `kubectl apply -k` would.
func renderManifests() ([]*kresource.Resource, error) {
	root, err := cluster.RepoRoot()
	if err != nil {
		return nil, err
	}
	resMap, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), filepath.Join(root, "manifests", "scheduler"))
	if err != nil {
		return nil, fmt.Errorf("kustomize build manifests/scheduler: %w", err)
	}
	return resMap.Resources(), nil
}

// asYAML joins resources into one YAML stream.
func asYAML(resources []*kresource.Resource) ([]byte, error) {
	var buf bytes.Buffer
	for _, r := range resources {
		y, err := r.AsYAML()
		if err != nil {
			return nil, err
		}
		buf.WriteString("---\n")
		buf.Write(y)
	}
	return buf.Bytes(), nil
}

// manifestConfig returns the KubeSchedulerConfiguration in the manifests'
// ConfigMap, decoded strictly.
func manifestConfig(resources []*kresource.Resource) (*schedv1.KubeSchedulerConfiguration, error) {
	for _, r := range resources {
		if r.GetKind() != "ConfigMap" || !strings.HasPrefix(r.GetName(), "capstan-scheduler-config") {
			continue
		}
		var cfg schedv1.KubeSchedulerConfiguration
		if err := yaml.UnmarshalStrict([]byte(r.GetDataMap()["config.yaml"]), &cfg); err != nil {
			return nil, fmt.Errorf("the ConfigMap's config.yaml: %w", err)
		}
		return &cfg, nil
	}
	return nil, fmt.Errorf("manifests/scheduler has no capstan-scheduler-config ConfigMap")
}

// runningScheduler is the capstan-scheduler all tests share, started on
// first use.
type runningScheduler struct {
	*cluster.Process
	// URL is where it serves /healthz, /readyz, /livez and /metrics.
	URL string
}

var (
	schedulerOnce sync.Once
	schedulerProc *runningScheduler
	schedulerErr  error
)

// startScheduler runs capstan-scheduler the way manifests/scheduler does,
// once for the package: it applies the manifests (all but the Deployment,
// whose pod kwok would only pretend to run), then starts the freshly built
// binary with the ConfigMap's configuration, authenticated as the
// ServiceAccount, so it has exactly the manifests' RBAC. It returns once the
// scheduler holds its leader-election lease.
func startScheduler(t testing.TB) *runningScheduler {
	t.Helper()
	schedulerOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		schedulerProc, schedulerErr = runFromManifests(ctx)
	})
	if schedulerErr != nil {
		t.Fatalf("starting capstan-scheduler: %v", schedulerErr)
	}
	return schedulerProc
}

func runFromManifests(ctx context.Context) (*runningScheduler, error) {
	c := testCluster
	resources, err := renderManifests()
	if err != nil {
		return nil, err
	}
	var apply []*kresource.Resource
	for _, r := range resources {
		if r.GetKind() != "Deployment" {
			apply = append(apply, r)
		}
	}
	stream, err := asYAML(apply)
	if err != nil {
		return nil, err
	}
	if err := c.Apply(ctx, "", bytes.NewReader(stream)); err != nil {
		return nil, fmt.Errorf("applying manifests/scheduler: %w", err)
	}
	kubeconfig, err := c.ServiceAccountKubeconfig(ctx, systemNamespace, "capstan-scheduler")
	if err != nil {
		return nil, err
	}
	cfg, err := manifestConfig(resources)
	if err != nil {
		return nil, err
	}
	// In a pod the scheduler uses its mounted token; here, the same
	// ServiceAccount's token in a kubeconfig.
	cfg.ClientConnection.Kubeconfig = kubeconfig
	configPath, err := writeConfig(cfg, "capstan-scheduler.yaml")
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	bin, err := cluster.Binary("capstan-scheduler")
	if err != nil {
		return nil, err
	}
	p, err := c.Run("capstan-scheduler", bin,
		"--config="+configPath,
		"--bind-address=127.0.0.1", "--secure-port="+strconv.Itoa(port),
		"--authentication-kubeconfig="+kubeconfig, "--authorization-kubeconfig="+kubeconfig,
		"-v=4")
	if err != nil {
		return nil, err
	}
	url := fmt.Sprintf("https://127.0.0.1:%d", port)
	if err := p.WaitHealthy(ctx, url+"/readyz", time.Minute); err != nil {
		return nil, err
	}
	leaseName := cfg.LeaderElection.ResourceName
	err = c.WaitFor(ctx, time.Minute, "capstan-scheduler to hold its lease", func(ctx context.Context) (bool, error) {
		lease, err := c.Client.CoordinationV1().Leases(systemNamespace).Get(ctx, leaseName, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return false, nil
		}
		return err == nil && ptr.Deref(lease.Spec.HolderIdentity, "") != "", err
	})
	if err != nil {
		return nil, p.Failure(err.Error())
	}
	return &runningScheduler{Process: p, URL: url}, nil
}

// writeConfig writes a KubeSchedulerConfiguration into the cluster's folder.
func writeConfig(cfg *schedv1.KubeSchedulerConfiguration, name string) (string, error) {
	cfg.APIVersion, cfg.Kind = schedv1.SchemeGroupVersion.String(), "KubeSchedulerConfiguration"
	data, err := yaml.Marshal(cfg)
	if err != nil {
		return "", err
	}
	path := filepath.Join(testCluster.Dir, name)
	return path, os.WriteFile(path, data, 0o600)
}

// freePort returns a loopback port nothing listens on; inside the test's
// private network namespace nothing else takes it before the scheduler binds.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// slotNodes creates kwok nodes named <group>-<i> in the node group, with
// slots[i] model slots (-1: no label), as createNodes does.
func slotNodes(ctx context.Context, t *testing.T, group string, slots ...int) []string {
	t.Helper()
	var nodes []cluster.Node
	for i, s := range slots {
		nodes = append(nodes, slotNode(fmt.Sprintf("%s-%d", group, i), group, s))
	}
	return createNodes(ctx, t, nodes...)
}

// slotNode describes a node in the group with slots model slots (-1: no
// label).
func slotNode(name, group string, slots int) cluster.Node {
	n := cluster.Node{Name: name, Labels: map[string]string{groupLabel: group}}
	if slots >= 0 {
		n.Labels[modelslots.NodeSlotsLabel] = strconv.Itoa(slots)
	}
	return n
}

// createNodes creates kwok nodes, waits until they are Ready and the node
// lifecycle controller has lifted the not-ready taint every new node starts
// with, deletes them when the test ends, and returns their names.
func createNodes(ctx context.Context, t *testing.T, nodes ...cluster.Node) []string {
	t.Helper()
	var names []string
	for _, n := range nodes {
		names = append(names, n.Name)
	}
	t.Cleanup(func() { deleteNodes(t, names...) })
	if err := testCluster.CreateNodes(ctx, nodes...); err != nil {
		t.Fatal(err)
	}
	err := testCluster.WaitFor(ctx, 30*time.Second, "the not-ready taint to leave the new nodes", func(ctx context.Context) (bool, error) {
		for _, name := range names {
			n, err := testCluster.Client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			for _, taint := range n.Spec.Taints {
				if taint.Key == corev1.TaintNodeNotReady {
					return false, nil
				}
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return names
}

func deleteNodes(t *testing.T, names ...string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := testCluster
	for _, n := range names {
		if err := c.Client.CoreV1().Nodes().Delete(ctx, n, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("deleting node %s: %v", n, err)
		}
	}
	err := c.WaitFor(ctx, 30*time.Second, "test nodes to be deleted", func(ctx context.Context) (bool, error) {
		for _, n := range names {
			if _, err := c.Client.CoreV1().Nodes().Get(ctx, n, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				return false, err
			}
		}
		return true, nil
	})
	if err != nil {
		t.Error(err)
	}
}

// testNamespace creates a namespace that is emptied and deleted when the test
// ends. Its pods are deleted at once (not gracefully) and waited for, so that
// no pending pod of one test can take a slot in the next.
func testNamespace(ctx context.Context, t *testing.T, prefix string) string {
	t.Helper()
	c := testCluster
	ns, err := c.CreateNamespace(ctx, prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := c.Client.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{}); err != nil {
			t.Errorf("deleting namespace %s: %v", ns, err)
		}
		err := c.WaitFor(ctx, 30*time.Second, "the pods of "+ns+" to be gone", func(ctx context.Context) (bool, error) {
			err := c.Client.CoreV1().Pods(ns).DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}, metav1.ListOptions{})
			if err != nil {
				return false, err
			}
			pods, err := c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
			return err == nil && len(pods.Items) == 0, err
		})
		if err != nil {
			t.Error(err)
		}
	})
	return ns
}

// modelPod is a bare model-server pod for capstan-scheduler.
func modelPod(ns, name, model string, annotations map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Annotations: annotations,
			Labels: map[string]string{modelserver.ModelLabel: model, "app": model}},
		Spec: corev1.PodSpec{
			SchedulerName: schedulerName,
			Containers: []corev1.Container{{Name: "engine", Image: "capstan.dev/simulated-vllm:latest",
				Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: modelserver.DefaultPort}}}},
		},
	}
}

// unschedulable returns the message of a pod's PodScheduled=False condition
// with reason Unschedulable, and whether it has one.
func unschedulable(p *corev1.Pod) (string, bool) {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionFalse && c.Reason == corev1.PodReasonUnschedulable {
			return c.Message, true
		}
	}
	return "", false
}

// placement sorts pods into bound (by node) and unschedulable ones (with
// their condition's message).
type placement struct {
	bound         map[string][]corev1.Pod // node -> pods
	unschedulable map[string]string       // pod -> message
	waiting       int                     // neither yet
}

func (p placement) boundCount() int {
	n := 0
	for _, pods := range p.bound {
		n += len(pods)
	}
	return n
}

func placementOf(pods []corev1.Pod) placement {
	p := placement{bound: map[string][]corev1.Pod{}, unschedulable: map[string]string{}}
	for _, pod := range pods {
		if pod.DeletionTimestamp != nil {
			continue
		}
		if pod.Spec.NodeName != "" {
			p.bound[pod.Spec.NodeName] = append(p.bound[pod.Spec.NodeName], pod)
		} else if msg, ok := unschedulable(&pod); ok {
			p.unschedulable[pod.Name] = msg
		} else {
			p.waiting++
		}
	}
	return p
}

// waitForPlacement waits until the pods matching selector are placed as
// wanted: bound pods in total, and the rest unschedulable.
func waitForPlacement(ctx context.Context, t *testing.T, ns, selector string, bound, unschedulableCount int, timeout time.Duration) placement {
	t.Helper()
	var p placement
	err := testCluster.WaitFor(ctx, timeout, fmt.Sprintf("%d pods bound and %d unschedulable in %s", bound, unschedulableCount, ns),
		func(ctx context.Context) (bool, error) {
			pods, err := testCluster.Pods(ctx, ns, selector)
			if err != nil {
				return false, err
			}
			p = placementOf(pods)
			return p.boundCount() == bound && len(p.unschedulable) == unschedulableCount && p.waiting == 0, nil
		})
	if err != nil {
		t.Fatalf("%v; last seen: %d bound, %d unschedulable %v, %d waiting", err, p.boundCount(), len(p.unschedulable), p.unschedulable, p.waiting)
	}
	return p
}

// cpuNode is a node in group with cpu allocatable, optionally tainted.
func cpuNode(name, group, cpu string, labels map[string]string, taints ...corev1.Taint) cluster.Node {
	l := map[string]string{groupLabel: group}
	for k, v := range labels {
		l[k] = v
	}
	return cluster.Node{Name: name, Labels: l, Taints: taints,
		Allocatable: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse(cpu)}}
}

// sortedKeys lists a map's keys in order, for stable messages.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
