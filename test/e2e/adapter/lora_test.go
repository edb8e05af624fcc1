package adapter

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	autoscalingv2 "k8s.io/api/autoscaling/v2"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/fleet"
)

// The per-adapter metrics of a base model, read through the aggregator with
// a metric label selector, and the real HPA controller scaling the base
// model's Deployment on one adapter's queue.
//
// Two pods of llama-3-8b serve the adapters support-bot-v3 and sql-bot with
// one running sequence each (vLLM's paged engine, simulated), so further
// requests wait. Pod 0 runs a support-bot-v3 request, and one for each
// adapter waits; pod 1 runs a sql-bot request, and one for support-bot-v3
// waits. support-bot-v3 is the hottest adapter, waiting on both pods; sql-bot
// waits on one.
func TestPerAdapterMetricsScaleTheBaseModel(t *testing.T) {
	ctx, ns, _ := setup(t, "lora", 3*time.Minute)
	c := testCluster
	const model = "llama-3-8b"
	m := cluster.ModelServer{Namespace: ns, Name: model, Model: model, Replicas: 2, Annotations: map[string]string{
		fleet.SchedulerAnnotation:    "vllm",
		fleet.LoRAAdaptersAnnotation: "support-bot-v3,sql-bot",
		fleet.MaxLoRAsAnnotation:     "1",
		fleet.MaxNumSeqsAnnotation:   "1",
		fleet.OutputTokensAnnotation: "100000", // minutes of decoding: the requests stay
	}}
	if err := c.Deploy(ctx, m); err != nil {
		t.Fatal(err)
	}
	pods, err := c.WaitForReadyPods(ctx, ns, "app="+model, 2, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	ip0, ip1 := pods[0].Status.PodIP, pods[1].Status.PodIP
	waitServing(ctx, t, ip0)
	waitServing(ctx, t, ip1)

	loadCtx, stopLoad := context.WithCancel(ctx)
	defer stopLoad()
	// No max_tokens: each request decodes for minutes unless cancelled.
	story := func(adapter string) string {
		return fmt.Sprintf(`{"model":%q,"prompt":"tell me a long story about adapters"}`, adapter)
	}
	wgs := []*sync.WaitGroup{loadBody(loadCtx, t, ip0, story("support-bot-v3"), 1), loadBody(loadCtx, t, ip1, story("sql-bot"), 1)}
	waitGauge(ctx, t, ip0, "vllm:num_requests_running", 1)
	waitGauge(ctx, t, ip1, "vllm:num_requests_running", 1)
	wgs = append(wgs, loadBody(loadCtx, t, ip0, story("support-bot-v3"), 1), loadBody(loadCtx, t, ip0, story("sql-bot"), 1),
		loadBody(loadCtx, t, ip1, story("support-bot-v3"), 1))
	waitGauge(ctx, t, ip0, "vllm:num_requests_waiting", 2)
	waitGauge(ctx, t, ip1, "vllm:num_requests_waiting", 1)

	api := "/apis/custom.metrics.k8s.io/v1beta2/namespaces/" + ns + "/"
	deployment := api + "deployments.apps/" + model + "/"
	bySelector := func(metric, selector string) string {
		return metric + "?metricLabelSelector=" + url.QueryEscape(selector)
	}
	// Both pods' pages must have been scraped since their last request.
	err = c.WaitFor(ctx, 10*time.Second, "the adapter to see every request", func(ctx context.Context) (bool, error) {
		support, _, err1 := metricValues(ctx, deployment+bySelector("lora_adapter_waiting_pods", "adapter=support-bot-v3"))
		sql, _, err2 := metricValues(ctx, deployment+bySelector("lora_adapter_waiting_pods", "adapter=sql-bot"))
		return err1 == nil && err2 == nil && support[model] == "2" && sql[model] == "1", nil
	})
	if err != nil {
		t.Fatal(err)
	}
	pod0, pod1 := pods[0].Name, pods[1].Name
	for path, want := range map[string]map[string]string{
		deployment + bySelector("lora_adapter_waiting_pods", "adapter==sql-bot"):                            {model: "1"},
		deployment + bySelector("lora_adapter_waiting_pods", "adapter=summarizer"):                          {model: "0"}, // no pod lists it
		deployment + "lora_adapter_waiting_pods":                                                            {model: "2"}, // the hottest adapter
		deployment + bySelector("lora_adapter_waiting_pods_avg", "adapter=sql-bot"):                         {model: "500m"},
		deployment + bySelector("lora_adapter_running_pods", "adapter=sql-bot"):                             {model: "1"},
		deployment + bySelector("lora_adapter_running_pods", "adapter in (sql-bot,other)"):                  {model: "1"},
		api + "services/" + model + "/" + bySelector("lora_adapter_running_pods", "adapter=support-bot-v3"): {model: "1"},
		api + "pods/*/" + bySelector("lora_adapter_waiting_pods", "adapter=sql-bot"):                        {pod0: "1", pod1: "0"},
		api + "pods/*/" + bySelector("lora_adapter_running_pods", "adapter=sql-bot"):                        {pod0: "0", pod1: "1"},
		// The older API version too.
		strings.Replace(deployment, "v1beta2", "v1beta1", 1) + bySelector("lora_adapter_waiting_pods", "adapter=support-bot-v3"): {model: "2"},
	} {
		got, list, err := metricValues(ctx, path)
		if err != nil {
			t.Errorf("GET %s: %v", path, err)
			continue
		}
		if !maps.Equal(want, got) {
			t.Errorf("GET %s = %v, want %v", path, got, want)
		}
		// v1beta1 carries the selector elsewhere, which this decoding drops.
		if strings.Contains(path, "v1beta2") && strings.Contains(path, "metricLabelSelector") && list.Items[0].Metric.Selector == nil {
			t.Errorf("GET %s: the answer does not name its metric selector", path)
		}
	}
	// Selectors the adapter does not take are 400s that say what it takes.
	for path, want := range map[string]string{
		deployment + bySelector("lora_adapter_waiting_pods", "adapter!=sql-bot"): "select adapters with adapter=<name> or adapter in (<name>,...)",
		deployment + bySelector("lora_adapter_waiting_pods", "model="+model):     "select adapters with adapter=<name> or adapter in (<name>,...)",
		deployment + bySelector("requests_waiting", "adapter=sql-bot"):           "only the per-adapter metrics take one (adapter=<name>)",
		deployment + bySelector("lora_adapter_waiting_pods", "adapter=("):        `invalid metric label selector "adapter=(": unable to parse requirement`,
	} {
		raw, err := getRaw(ctx, path)
		status := metav1.Status{}
		if jsonErr := json.Unmarshal(raw, &status); err == nil || jsonErr != nil {
			t.Errorf("GET %s: %v, %s; want an error Status", path, err, raw)
			continue
		}
		t.Logf("GET %s: %d %s: %s", path, status.Code, status.Reason, status.Message)
		if status.Code != http.StatusBadRequest || status.Reason != metav1.StatusReasonBadRequest || !strings.Contains(status.Message, want) {
			t.Errorf("GET %s: %d %s %q, want 400 BadRequest saying %q", path, status.Code, status.Reason, status.Message, want)
		}
	}

	// An HPA on sql-bot's queue, aiming at a pod where it waits per three
	// replicas: sql-bot waits on 1 pod, so 4 replicas (1/0.333 rounded up).
	// Had the selector been lost on the way, the hottest adapter (2 pods)
	// would ask for 7, capped at 6, and the HPA would read 2 pods, not 1.
	third := resource.MustParse("333m")
	h := hpaFor(model, autoscalingv2.MetricSpec{Type: autoscalingv2.ObjectMetricSourceType, Object: &autoscalingv2.ObjectMetricSource{
		DescribedObject: autoscalingv2.CrossVersionObjectReference{APIVersion: "apps/v1", Kind: "Deployment", Name: model},
		Metric: autoscalingv2.MetricIdentifier{Name: "lora_adapter_waiting_pods",
			Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"adapter": "sql-bot"}}},
		Target: autoscalingv2.MetricTarget{Type: autoscalingv2.AverageValueMetricType, AverageValue: &third},
	}})
	h.Spec.MaxReplicas = 6
	if _, err := c.Client.AutoscalingV2().HorizontalPodAutoscalers(ns).Create(ctx, h, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	up := scaleTo(ctx, t, ns, model, 4, 30*time.Second)
	t.Logf("scaled 2 -> 4 replicas %s after the HPA was created", up.Round(100*time.Millisecond))
	// At 4 replicas the HPA reports 1 pod over 4 replicas: 250m.
	var last string
	err = c.WaitFor(ctx, 10*time.Second, "the HPA to read sql-bot's queue at 4 replicas", func(ctx context.Context) (bool, error) {
		h, err := c.Client.AutoscalingV2().HorizontalPodAutoscalers(ns).Get(ctx, model, metav1.GetOptions{})
		if err != nil || len(h.Status.CurrentMetrics) != 1 || h.Status.CurrentMetrics[0].Object == nil {
			return false, err
		}
		cur := h.Status.CurrentMetrics[0].Object.Current.AverageValue
		last = fmt.Sprintf("replicas %d, desired %d, average %v", h.Status.CurrentReplicas, h.Status.DesiredReplicas, cur)
		return h.Status.CurrentReplicas == 4 && cur != nil && cur.MilliValue() == 250, nil
	})
	if err != nil {
		t.Fatalf("%v (last: %s)", err, last)
	}
	stopLoad()
	for _, wg := range wgs {
		wg.Wait()
	}
	down := scaleTo(ctx, t, ns, model, 1, 30*time.Second)
	t.Logf("scaled 4 -> 1 replica %s after the load stopped", down.Round(100*time.Millisecond))
}

// waitGauge waits until a pod serves a gauge's value.
func waitGauge(ctx context.Context, t *testing.T, ip, family string, want float64) {
	t.Helper()
	err := cluster.WaitFor(ctx, 10*time.Second, family+" on "+ip, func(ctx context.Context) (bool, error) {
		v, ok, err := podGauge(ctx, ip, family, nil)
		return err == nil && ok && v == want, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
