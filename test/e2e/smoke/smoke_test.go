// Package smoke checks the foundation every other e2e suite stands on: the
// local control plane, kwok's readiness stages and the fleet simulator.
package smoke

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2/ktesting"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/fleet"
)

var testCluster *cluster.Cluster

func TestMain(m *testing.M) { os.Exit(cluster.RunTests(m, cluster.Config{}, &testCluster)) }

func TestSmoke(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	c := testCluster

	if err := c.CreateNodes(ctx, cluster.Node{Name: "smoke-0"}, cluster.Node{Name: "smoke-1"}); err != nil {
		t.Fatal(err)
	}
	ns, err := c.CreateNamespace(ctx, "smoke")
	if err != nil {
		t.Fatal(err)
	}
	sim := fleet.New(c.Client, fleet.Options{Namespace: ns})
	simCtx, stopSim := context.WithCancel(ctx)
	if err := sim.Start(simCtx); err != nil {
		t.Fatal(err)
	}
	defer func() { stopSim(); sim.Wait() }()

	llama := cluster.ModelServer{Namespace: ns, Name: "llama", Model: "llama-3-8b", Replicas: 3}
	start := time.Now()
	if err := c.Deploy(ctx, llama); err != nil {
		t.Fatal(err)
	}
	pods, err := c.WaitForReadyPods(ctx, ns, "app=llama", 3, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("3 replicas Ready in %s", time.Since(start).Round(time.Millisecond))
	nodes := map[string]bool{}
	for _, p := range pods {
		nodes[p.Spec.NodeName] = true
	}
	if len(nodes) != 2 {
		t.Errorf("pods landed on %d nodes, want both", len(nodes))
	}

	t.Run("every pod serves metrics and a completion on its pod IP", func(t *testing.T) {
		for _, p := range pods {
			waitServing(ctx, t, p.Status.PodIP)
			families := scrapeMetrics(t, "http://"+p.Status.PodIP+":8000/metrics")
			if _, ok := families["vllm:num_requests_waiting"]; !ok {
				t.Errorf("pod %s: no vllm:num_requests_waiting in its metrics", p.Name)
			}
			resp, err := http.Post("http://"+p.Status.PodIP+":8000/v1/completions", "application/json",
				strings.NewReader(`{"model":"llama-3-8b","prompt":"hello","max_tokens":4}`))
			if err != nil {
				t.Fatalf("pod %s: completion: %v", p.Name, err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `"text_completion"`) {
				t.Errorf("pod %s: completion answered %d %s", p.Name, resp.StatusCode, body)
			}
			if got := sim.Served(types.NamespacedName{Namespace: ns, Name: p.Name}); got != 1 {
				t.Errorf("pod %s: simulator counted %d requests, want 1", p.Name, got)
			}
		}
	})

	t.Run("scaling to 1 converges the EndpointSlice", func(t *testing.T) {
		start := time.Now()
		scale, err := c.Client.AppsV1().Deployments(ns).GetScale(ctx, "llama", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		// Unconditional: the Deployment controller may write the Deployment
		// between the read and this update, which is no conflict for a scale.
		scale.Spec.Replicas, scale.ResourceVersion = 1, ""
		if _, err := c.Client.AppsV1().Deployments(ns).UpdateScale(ctx, "llama", scale, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		remaining, err := c.WaitForReadyPods(ctx, ns, "app=llama", 1, 30*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		err = c.WaitFor(ctx, 10*time.Second, "the slice to hold only the remaining pod", func(ctx context.Context) (bool, error) {
			ready, notReady, err := c.Endpoints(ctx, ns, "llama")
			return slices.Equal(ready, []string{remaining[0].Status.PodIP}) && len(notReady) == 0, err
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("EndpointSlice converged %s after scaling to 1", time.Since(start).Round(time.Millisecond))
	})

	t.Run("a pod with delayed readiness stays out of the ready endpoints", func(t *testing.T) {
		const delay = 3 * time.Second
		slow := cluster.ModelServer{Namespace: ns, Name: "loading", Model: "mistral", Replicas: 1,
			Annotations: map[string]string{"sim.capstan.dev/ready-after": delay.String()}}
		if err := c.Deploy(ctx, slow); err != nil {
			t.Fatal(err)
		}
		var pod corev1.Pod
		err := c.WaitFor(ctx, 10*time.Second, "the loading pod to run with an IP", func(ctx context.Context) (bool, error) {
			pods, err := c.Pods(ctx, ns, "app=loading")
			if err != nil || len(pods) != 1 || pods[0].Status.PodIP == "" {
				return false, err
			}
			pod = pods[0]
			return pod.Status.Phase == corev1.PodRunning, nil
		})
		if err != nil {
			t.Fatal(err)
		}
		runningAt := time.Now()
		if modelserver.IsReady(&pod) {
			t.Fatal("the pod was Ready at once despite its readiness delay")
		}
		// The engine is up (it answers) but still "loading": its endpoint is
		// in the slice, not ready, until the delay has passed.
		waitServing(ctx, t, pod.Status.PodIP)
		err = c.WaitFor(ctx, 5*time.Second, "the loading pod's endpoint to be listed as not ready", func(ctx context.Context) (bool, error) {
			_, notReady, err := c.Endpoints(ctx, ns, "loading")
			return slices.Contains(notReady, pod.Status.PodIP), err
		})
		if err != nil {
			t.Fatal(err)
		}
		err = c.WaitFor(ctx, 10*time.Second, "the loading pod's endpoint to become ready", func(ctx context.Context) (bool, error) {
			ready, _, err := c.Endpoints(ctx, ns, "loading")
			return slices.Contains(ready, pod.Status.PodIP), err
		})
		if err != nil {
			t.Fatal(err)
		}
		// kwok starts the delay when the pod starts running, a moment before
		// this test saw it do so.
		if waited := time.Since(runningAt); waited < delay-500*time.Millisecond {
			t.Errorf("endpoint became ready %s after the pod started, before its %s readiness delay", waited, delay)
		}
	})

	t.Run("a fault-injected pod refuses connections", func(t *testing.T) {
		refusing := cluster.ModelServer{Namespace: ns, Name: "refusing", Model: "qwen", Replicas: 1,
			Annotations: map[string]string{fleet.FaultAnnotation: string(fleet.FaultRefuse)}}
		if err := c.Deploy(ctx, refusing); err != nil {
			t.Fatal(err)
		}
		pods, err := c.WaitForReadyPods(ctx, ns, "app=refusing", 1, 30*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		_, err = net.DialTimeout("tcp", pods[0].Status.PodIP+":8000", time.Second)
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("dialing the refusing pod: got %v, want connection refused", err)
		}
	})
}

// waitServing waits until the simulator listens on the pod IP: it starts
// serving when it sees the pod's IP, a moment after kwok sets it.
func waitServing(ctx context.Context, t *testing.T, ip string) {
	t.Helper()
	err := cluster.WaitFor(ctx, 10*time.Second, "the simulator to serve "+ip, func(ctx context.Context) (bool, error) {
		conn, err := net.DialTimeout("tcp", ip+":8000", time.Second)
		if err != nil {
			return false, err
		}
		return true, conn.Close()
	})
	if err != nil {
		t.Fatal(err)
	}
}

func scrapeMetrics(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("%s: %v", url, err)
	}
	return families
}
