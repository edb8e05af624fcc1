package loop

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2/ktesting"
	"k8s.io/utils/ptr"

	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/components"
	"github.com/capstan-dev/capstan/test/fleet"
)

// The HPA takes an idle model to zero replicas; 50 concurrent requests then,
// 25 through each of two router replicas, are held, counted once each in
// requests_demand by the metrics adapter, scale the model back up and are
// all answered once a replica is Ready, no faster than each router's
// per-endpoint limit lets them go (a release past it would be a 429); idle
// again, the model goes back to zero.
func TestScaleFromZero(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithTimeout(ctx, 4*time.Minute)
	defer cancel()
	c := testCluster
	const loadTime = 4 * time.Second // the simulated model load

	ns, err := c.CreateNamespace(ctx, "zero")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.CreateNodes(ctx, cluster.Node{Name: "zero-0"}); err != nil {
		t.Fatal(err)
	}
	sim := fleet.New(c.Client, fleet.Options{Namespace: ns})
	simCtx, stopSim := context.WithCancel(ctx)
	defer func() { stopSim(); sim.Wait() }()
	if err := sim.Start(simCtx); err != nil {
		t.Fatal(err)
	}
	adapter, err := components.StartAdapter(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	defer adapter.Stop(10 * time.Second)
	installed, err := components.InstallRouter(ctx, c, "router", "Deployment")
	if err != nil {
		t.Fatal(err)
	}
	var routers []*components.Component
	for i := range 2 {
		name := fmt.Sprintf("capstan-router-zero-%d", i)
		ip, err := components.RouterPod(ctx, c, name)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = components.DeleteRouterPod(context.Background(), c, name) })
		routers = append(routers, installed.StartTest(t, ctx, components.RouterOptions{Name: name, AdminAddr: ip + ":8081",
			Args: []string{"--namespaces=" + ns, "--hold-timeout=2m", "--max-requests-per-endpoint=4"}}))
	}

	model := cluster.ModelServer{Namespace: ns, Name: "llama", Model: "llama", Replicas: 1,
		Annotations: map[string]string{"sim.capstan.dev/ready-after": loadTime.String()}}
	if err := c.Deploy(ctx, model); err != nil {
		t.Fatal(err)
	}
	pods := watchPods(ctx, t, ns)
	hpa := &autoscalingv2.HorizontalPodAutoscaler{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "llama"},
		Spec: autoscalingv2.HorizontalPodAutoscalerSpec{
			ScaleTargetRef: autoscalingv2.CrossVersionObjectReference{APIVersion: "apps/v1", Kind: "Deployment", Name: "llama"},
			MinReplicas:    ptr.To[int32](0), MaxReplicas: 2,
			Metrics: []autoscalingv2.MetricSpec{{Type: autoscalingv2.ObjectMetricSourceType, Object: &autoscalingv2.ObjectMetricSource{
				DescribedObject: autoscalingv2.CrossVersionObjectReference{APIVersion: "apps/v1", Kind: "Deployment", Name: "llama"},
				Metric:          autoscalingv2.MetricIdentifier{Name: "requests_demand"},
				Target:          autoscalingv2.MetricTarget{Type: autoscalingv2.AverageValueMetricType, AverageValue: resource.NewQuantity(8, resource.DecimalSI)},
			}}, {Type: autoscalingv2.ObjectMetricSourceType, Object: &autoscalingv2.ObjectMetricSource{
				// An engine metric beside it, as manifests/examples does:
				// it has no value at zero replicas.
				DescribedObject: autoscalingv2.CrossVersionObjectReference{APIVersion: "apps/v1", Kind: "Deployment", Name: "llama"},
				Metric:          autoscalingv2.MetricIdentifier{Name: "requests_waiting"},
				Target:          autoscalingv2.MetricTarget{Type: autoscalingv2.AverageValueMetricType, AverageValue: resource.NewQuantity(2, resource.DecimalSI)},
			}}},
			Behavior: &autoscalingv2.HorizontalPodAutoscalerBehavior{
				ScaleDown: &autoscalingv2.HPAScalingRules{StabilizationWindowSeconds: ptr.To[int32](3)},
				ScaleUp:   &autoscalingv2.HPAScalingRules{StabilizationWindowSeconds: ptr.To[int32](0)},
			},
		},
	}
	if _, err := c.Client.AutoscalingV2().HorizontalPodAutoscalers(ns).Create(ctx, hpa, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	// Idle: the HPA takes the model to zero itself.
	waitReplicas(ctx, t, ns, 0, "the HPA to scale the idle model to zero")
	waitScaledToZero(ctx, t, ns)
	if err := c.WaitFor(ctx, 30*time.Second, "the model's pods to be gone", func(ctx context.Context) (bool, error) {
		p, err := c.Pods(ctx, ns, "app=llama")
		return err == nil && len(p) == 0, err
	}); err != nil {
		t.Fatal(err)
	}

	// 50 requests at once, to a model with no replica.
	const n = 50
	start := time.Now()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstByte time.Duration
	var failures []string
	body := `{"model":"llama","prompt":"hello from zero","max_tokens":4}`
	for i := range n {
		r := routers[i%len(routers)]
		wg.Go(func() {
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, r.URL+"/v1/completions", strings.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			resp, err := http.DefaultClient.Do(req)
			at := time.Since(start)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				failures = append(failures, err.Error())
				return
			}
			defer resp.Body.Close()
			data, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != http.StatusOK {
				failures = append(failures, fmt.Sprintf("%d %s", resp.StatusCode, data))
				return
			}
			if firstByte == 0 || at < firstByte {
				firstByte = at
			}
		})
	}
	// While they are held, the adapter serves their sum over the routers.
	demandPath := "/apis/custom.metrics.k8s.io/v1beta2/namespaces/" + ns + "/deployments.apps/llama/requests_demand"
	var demand string
	err = c.WaitFor(ctx, loadTime, "requests_demand to count both routers' held requests", func(ctx context.Context) (bool, error) {
		raw, err := c.Client.CoreV1().RESTClient().Get().AbsPath(demandPath).DoRaw(ctx)
		if err != nil {
			return false, nil
		}
		var list struct {
			Items []struct {
				Value resource.Quantity `json:"value"`
			} `json:"items"`
		}
		if err := json.Unmarshal(raw, &list); err != nil || len(list.Items) != 1 {
			return false, err
		}
		demand = list.Items[0].Value.String()
		return list.Items[0].Value.Value() == n, nil
	})
	if err != nil {
		t.Errorf("%v; last requests_demand %s", err, demand)
	}
	wg.Wait()
	if len(failures) > 0 {
		t.Fatalf("%d of %d requests failed, e.g. %q", len(failures), n, failures[:min(3, len(failures))])
	}
	created, ready, ok := pods.newest()
	if !ok {
		t.Fatal("no pod of the model was seen created and Ready")
	}
	startup := ready.Sub(created)
	t.Logf("first request → first byte %s; pod created %s after the first request, Ready %s later (start-up, %s of it the simulated load); "+
		"the router's and the HPA's share: %s",
		firstByte.Round(time.Millisecond), created.Sub(start).Round(time.Millisecond), startup.Round(time.Millisecond), loadTime,
		(firstByte - startup).Round(time.Millisecond))

	// Idle again: back to zero, and the router knows the model still.
	waitReplicas(ctx, t, ns, 0, "the HPA to scale the model back to zero")
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, routers[0].URL+"/v1/models/llama", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("GET /v1/models/llama at zero: %d", resp.StatusCode)
	}
}

func waitReplicas(ctx context.Context, t *testing.T, ns string, want int32, what string) {
	t.Helper()
	err := testCluster.WaitFor(ctx, 90*time.Second, what, func(ctx context.Context) (bool, error) {
		d, err := testCluster.Client.AppsV1().Deployments(ns).Get(ctx, "llama", metav1.GetOptions{})
		return err == nil && d.Spec.Replicas != nil && *d.Spec.Replicas == want, err
	})
	if err != nil {
		t.Fatal(err)
	}
}

// waitScaledToZero waits for the HPA's ScaledToZero condition, without which
// the HPA controller does not scale from zero.
func waitScaledToZero(ctx context.Context, t *testing.T, ns string) {
	t.Helper()
	err := testCluster.WaitFor(ctx, 30*time.Second, "the HPA's ScaledToZero condition", func(ctx context.Context) (bool, error) {
		h, err := testCluster.Client.AutoscalingV2().HorizontalPodAutoscalers(ns).Get(ctx, "llama", metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		for _, c := range h.Status.Conditions {
			if c.Type == autoscalingv2.ScaledToZero {
				return c.Status == corev1.ConditionTrue, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
