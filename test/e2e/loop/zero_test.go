package loop

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
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

	ns := simulatedNamespace(ctx, t, "zero", nil)
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
	hpa := demandHPA(ns, "llama")
	if _, err := c.Client.AutoscalingV2().HorizontalPodAutoscalers(ns).Create(ctx, hpa, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	// Idle: the HPA takes the model to zero itself.
	waitReplicas(ctx, t, ns, 0, "the HPA to scale the idle model to zero")
	waitScaledToZero(ctx, t, ns)
	waitNoPods(ctx, t, ns)
	waitRoutersSeeNoReplica(ctx, t, routers)

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

	// Idle again: back to zero, and the router holds a request again,
	// saying the HPA will bring a replica back.
	waitReplicas(ctx, t, ns, 0, "the HPA to scale the model back to zero")
	waitScaledToZero(ctx, t, ns)
	waitNoPods(ctx, t, ns)
	waitRoutersSeeNoReplica(ctx, t, routers)
	heldCtx, leave := context.WithCancel(ctx)
	defer leave()
	answered := make(chan string, 1)
	go func() {
		req, _ := http.NewRequestWithContext(heldCtx, http.MethodPost, routers[0].URL+"/v1/completions", strings.NewReader(body))
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
			answered <- resp.Status
		}
	}()
	m := waitModel(ctx, t, routers[0].URL, "llama", "a request held at zero again", func(m modelInfo) bool {
		select {
		case status := <-answered:
			t.Fatalf("the request at zero was answered %s before it was seen held (%+v)", status, m)
		default:
		}
		return m.Held == 1
	})
	if !strings.Contains(m.Replicas, "scales it up on demand") {
		t.Errorf("/v1/models replicas at zero %q, want that the HPA scales it up on demand", m.Replicas)
	}
}

// A model scaled to zero by hand is off: its HPA has scaling disabled, and
// the router answers its requests 503 at once, saying so, instead of holding
// them; scaled to one by hand it is served again. A model whose only replica
// stays Pending for lack of model slots is held, and the 503 at the end of
// the hold names capstan-scheduler's reason.
func TestNoReplicaComing(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	c := testCluster
	const holdTimeout = 5 * time.Second

	ns := simulatedNamespace(ctx, t, "nocoming", map[string]string{"capstan.dev/model-slots": "1"})
	pool := map[string]string{"e2e.capstan.dev/pool": ns}
	sched, err := components.StartScheduler(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	defer sched.Stop(10 * time.Second)
	// The router runs as its manifests' ServiceAccount: the RBAC that lets
	// it see Deployments and HPAs is the installed one.
	installed, err := components.InstallRouter(ctx, c, "router", "Deployment")
	if err != nil {
		t.Fatal(err)
	}
	r := installed.StartTest(t, ctx, components.RouterOptions{Name: "capstan-router-nocoming",
		Args: []string{"--namespaces=" + ns, "--hold-timeout=" + holdTimeout.String()}})

	// The node's one slot goes to "filler"; "big" then waits for a slot.
	for _, m := range []cluster.ModelServer{
		{Namespace: ns, Name: "filler", Model: "filler", Replicas: 1, SchedulerName: "capstan-scheduler", NodeSelector: pool},
		{Namespace: ns, Name: "big", Model: "big", Replicas: 1, SchedulerName: "capstan-scheduler", NodeSelector: pool},
		{Namespace: ns, Name: "off", Model: "off", Replicas: 0},
	} {
		if err := c.Deploy(ctx, m); err != nil {
			t.Fatal(err)
		}
		if m.Name == "filler" {
			if _, err := c.WaitForReadyPods(ctx, ns, "app=filler", 1, 30*time.Second); err != nil {
				t.Fatal(err)
			}
		}
	}
	var reason string
	err = c.WaitFor(ctx, 30*time.Second, "big's replica to be Unschedulable for lack of model slots", func(ctx context.Context) (bool, error) {
		pods, err := c.Pods(ctx, ns, "app=big")
		if err != nil || len(pods) != 1 {
			return false, err
		}
		for _, cond := range pods[0].Status.Conditions {
			if cond.Type == corev1.PodScheduled && cond.Status == corev1.ConditionFalse && strings.Contains(cond.Message, "model slot") {
				reason = strings.TrimSuffix(cond.Message, ".")
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	heldStart := time.Now()
	big := make(chan outcome, 1)
	go func() { big <- post(ctx, r.URL, "big") }()

	if _, err := c.Client.AutoscalingV2().HorizontalPodAutoscalers(ns).Create(ctx, demandHPA(ns, "off"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitHPACondition(ctx, t, ns, "off", autoscalingv2.ScalingActive, corev1.ConditionFalse, "ScalingDisabled")
	start := time.Now()
	res := post(ctx, r.URL, "off")
	took := time.Since(start)
	if res.status != http.StatusServiceUnavailable || !strings.Contains(res.body, "the model is switched off: Deployment "+ns+"/off is scaled to 0 and scaling is disabled") ||
		strings.Contains(res.body, "held") {
		t.Errorf("a model scaled to zero by hand: %d %s, want 503 saying it is switched off, not held", res.status, res.body)
	}
	if took >= holdTimeout {
		t.Errorf("the switched-off model's 503 took %s, as long as a hold", took)
	}
	scale := []byte(`{"spec":{"replicas":1}}`)
	if _, err := c.Client.AppsV1().Deployments(ns).Patch(ctx, "off", types.MergePatchType, scale, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	// Scaled up by hand, a replica is coming once the router's watch has
	// seen the new count: the request is held until it is Ready, or served
	// at once if it already is.
	waitModel(ctx, t, r.URL, "off", "the router to see the Deployment scaled up", func(m modelInfo) bool {
		return !strings.Contains(m.Replicas, "switched off")
	})
	if res := post(ctx, r.URL, "off"); res.status != http.StatusOK {
		t.Errorf("the model scaled to one by hand: %d %s, want 200", res.status, res.body)
	}

	res = <-big
	held := time.Since(heldStart)
	if res.status != http.StatusServiceUnavailable {
		t.Fatalf("big after the hold: %d %s, want 503", res.status, res.body)
	}
	for _, want := range []string{"held 5s for a ready endpoint", "1 Pending: " + reason} {
		if !strings.Contains(res.body, want) {
			t.Errorf("big's 503 %s does not say %q", res.body, want)
		}
	}
	if held < holdTimeout {
		t.Errorf("big was answered after %s, before its %s hold ended", held, holdTimeout)
	}
}

type outcome struct {
	status int
	body   string
}

// post sends a short completion for model and reads the whole answer.
func post(ctx context.Context, url, model string) outcome {
	body := fmt.Sprintf(`{"model":%q,"prompt":"x","max_tokens":2}`, model)
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url+"/v1/completions", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return outcome{body: err.Error()}
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return outcome{status: resp.StatusCode, body: string(data)}
}

// modelInfo is what GET /v1/models/{model} says of a model with no Ready
// endpoint.
type modelInfo struct {
	Held      int    `json:"held"`
	Replicas  string `json:"replicas"`
	Endpoints struct {
		Ready int `json:"ready"`
	} `json:"endpoints"`
}

// waitRoutersSeeNoReplica waits for each router to see no Ready endpoint of
// llama. The pods are gone from the API before the EndpointSlice controller
// and the routers' informers catch up; a request sent in between goes to
// the last pod's address and is refused (502), rightly.
func waitRoutersSeeNoReplica(ctx context.Context, t *testing.T, routers []*components.Component) {
	t.Helper()
	for _, r := range routers {
		waitModel(ctx, t, r.URL, "llama", "the router to see no Ready endpoint of llama", func(m modelInfo) bool {
			return m.Endpoints.Ready == 0
		})
	}
}

// waitModel polls GET /v1/models/{model} until done says yes.
func waitModel(ctx context.Context, t *testing.T, url, model, what string, done func(modelInfo) bool) modelInfo {
	t.Helper()
	var m modelInfo
	err := testCluster.WaitFor(ctx, 10*time.Second, what, func(ctx context.Context) (bool, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url+"/v1/models/"+model, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return false, err
		}
		defer resp.Body.Close()
		m = modelInfo{}
		if err := json.NewDecoder(resp.Body).Decode(&m); err != nil {
			return false, err
		}
		return done(m), nil
	})
	if err != nil {
		t.Fatalf("%v; last %+v", err, m)
	}
	return m
}

// simulatedNamespace creates a namespace, a node named after it (labelled
// e2e.capstan.dev/pool=<namespace> and with labels), and the fleet
// simulator for the namespace until the test ends.
func simulatedNamespace(ctx context.Context, t *testing.T, prefix string, labels map[string]string) string {
	t.Helper()
	c := testCluster
	ns, err := c.CreateNamespace(ctx, prefix)
	if err != nil {
		t.Fatal(err)
	}
	nodeLabels := map[string]string{"e2e.capstan.dev/pool": ns}
	maps.Copy(nodeLabels, labels)
	if err := c.CreateNodes(ctx, cluster.Node{Name: ns, Labels: nodeLabels}); err != nil {
		t.Fatal(err)
	}
	sim := fleet.New(c.Client, fleet.Options{Namespace: ns})
	simCtx, stopSim := context.WithCancel(ctx)
	t.Cleanup(func() { stopSim(); sim.Wait() })
	if err := sim.Start(simCtx); err != nil {
		t.Fatal(err)
	}
	return ns
}

// demandHPA scales Deployment name between 0 and 2 replicas on
// requests_demand and requests_waiting, quick to scale down.
func demandHPA(ns, name string) *autoscalingv2.HorizontalPodAutoscaler {
	target := autoscalingv2.CrossVersionObjectReference{APIVersion: "apps/v1", Kind: "Deployment", Name: name}
	return &autoscalingv2.HorizontalPodAutoscaler{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: autoscalingv2.HorizontalPodAutoscalerSpec{
			ScaleTargetRef: target,
			MinReplicas:    ptr.To[int32](0), MaxReplicas: 2,
			Metrics: []autoscalingv2.MetricSpec{{Type: autoscalingv2.ObjectMetricSourceType, Object: &autoscalingv2.ObjectMetricSource{
				DescribedObject: target,
				Metric:          autoscalingv2.MetricIdentifier{Name: "requests_demand"},
				Target:          autoscalingv2.MetricTarget{Type: autoscalingv2.AverageValueMetricType, AverageValue: resource.NewQuantity(8, resource.DecimalSI)},
			}}, {Type: autoscalingv2.ObjectMetricSourceType, Object: &autoscalingv2.ObjectMetricSource{
				// An engine metric beside it, as manifests/examples does:
				// it has no value at zero replicas.
				DescribedObject: target,
				Metric:          autoscalingv2.MetricIdentifier{Name: "requests_waiting"},
				Target:          autoscalingv2.MetricTarget{Type: autoscalingv2.AverageValueMetricType, AverageValue: resource.NewQuantity(2, resource.DecimalSI)},
			}}},
			Behavior: &autoscalingv2.HorizontalPodAutoscalerBehavior{
				ScaleDown: &autoscalingv2.HPAScalingRules{StabilizationWindowSeconds: ptr.To[int32](3)},
				ScaleUp:   &autoscalingv2.HPAScalingRules{StabilizationWindowSeconds: ptr.To[int32](0)},
			},
		},
	}
}

// waitNoPods waits until model llama has no pod left, terminating or not.
func waitNoPods(ctx context.Context, t *testing.T, ns string) {
	t.Helper()
	if err := testCluster.WaitFor(ctx, 30*time.Second, "the model's pods to be gone", func(ctx context.Context) (bool, error) {
		p, err := testCluster.Pods(ctx, ns, "app=llama")
		return err == nil && len(p) == 0, err
	}); err != nil {
		t.Fatal(err)
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
	waitHPACondition(ctx, t, ns, "llama", autoscalingv2.ScaledToZero, corev1.ConditionTrue, "")
}

// waitHPACondition waits for a condition of HPA name with this status and,
// unless empty, reason.
func waitHPACondition(ctx context.Context, t *testing.T, ns, name string, cond autoscalingv2.HorizontalPodAutoscalerConditionType, status corev1.ConditionStatus, reason string) {
	t.Helper()
	err := testCluster.WaitFor(ctx, 30*time.Second, fmt.Sprintf("HPA %s's condition %s=%s %s", name, cond, status, reason), func(ctx context.Context) (bool, error) {
		h, err := testCluster.Client.AutoscalingV2().HorizontalPodAutoscalers(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		for _, c := range h.Status.Conditions {
			if c.Type == cond {
				return c.Status == status && (reason == "" || c.Reason == reason), nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
