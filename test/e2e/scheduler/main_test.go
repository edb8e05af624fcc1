// Package scheduler tests capstan-scheduler and its ModelSlots plugin against
// a real control plane: the scheduler runs as a separate process, started
// from manifests/scheduler (its configuration, as its ServiceAccount with the
// manifests' RBAC), beside the cluster's own kube-scheduler.
package scheduler

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	schedv1 "k8s.io/kube-scheduler/config/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/plugins/modelslots"
	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/components"
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

var (
	schedulerOnce sync.Once
	schedulerProc *components.Component
	schedulerErr  error
)

// startScheduler runs capstan-scheduler the way manifests/scheduler does
// (components.StartScheduler), once for the package.
func startScheduler(t testing.TB) *components.Component {
	t.Helper()
	schedulerOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		schedulerProc, schedulerErr = components.StartScheduler(ctx, testCluster, "-v=4")
	})
	if schedulerErr != nil {
		t.Fatalf("starting capstan-scheduler: %v", schedulerErr)
	}
	return schedulerProc
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

// createNodes creates kwok nodes as cluster.CreateNodes does (Ready, without
// the not-ready taint), deletes them when the test ends, and returns their
// names.
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
