package provider

import (
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2/ktesting"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/scrape"
)

// adapterFixture is fixture's pods of Deployment "llama" reporting their
// LoRA adapters: a runs support-bot-v3 with support-bot-v3 and sql-bot
// waiting, b runs sql-bot with support-bot-v3 waiting, c's list is stale
// (sql-bot and summarizer waiting) and d was never scraped.
func adapterFixture(t *testing.T) *Provider {
	t.Helper()
	p := fixture(t)
	id := func(name string) int { i, _ := cat.ID(name); return i }
	running, waiting := id(catalogue.LoRAAdapterRunningPods), id(catalogue.LoRAAdapterWaitingPods)
	for _, pod := range []struct {
		name             string
		at               time.Time
		running, waiting []string
	}{
		{"a", now, []string{"support-bot-v3"}, []string{"support-bot-v3", "sql-bot"}},
		{"b", now.Add(-time.Second), []string{"sql-bot"}, []string{"support-bot-v3"}},
		{"c", now.Add(-10 * time.Second), nil, []string{"sql-bot", "summarizer"}},
	} {
		v := cat.NewValues()
		v.Has[running], v.Adapters[running] = true, pod.running
		v.Has[waiting], v.Adapters[waiting] = true, pod.waiting
		p.Store.Observe(scrape.Target{Key: types.NamespacedName{Namespace: "ml", Name: pod.name}}, pod.at, v)
	}
	return p
}

func TestAdapterMetrics(t *testing.T) {
	p := adapterFixture(t)
	_, ctx := ktesting.NewTestContext(t)
	cases := map[string]struct {
		resource, object, metric, selector string
		want                               string
	}{
		"pods where an adapter waits": {"deployments.apps", "llama", "lora_adapter_waiting_pods", "adapter=support-bot-v3", "2"},
		"== selects too":              {"deployments.apps", "llama", "lora_adapter_waiting_pods", "adapter==sql-bot", "1"},
		"a stale pod is left out":     {"deployments.apps", "llama", "lora_adapter_waiting_pods", "adapter=summarizer", "0"},
		"an adapter no pod lists":     {"deployments.apps", "llama", "lora_adapter_waiting_pods", "adapter=nobody", "0"},
		"the hottest adapter":         {"deployments.apps", "llama", "lora_adapter_waiting_pods", "", "2"},
		"the hotter of two":           {"deployments.apps", "llama", "lora_adapter_waiting_pods", "adapter in (sql-bot,nobody)", "1"},
		"running":                     {"deployments.apps", "llama", "lora_adapter_running_pods", "adapter=sql-bot", "1"},
		"hottest running":             {"services", "llama", "lora_adapter_running_pods", "", "1"},
		"average over reporting pods": {"deployments.apps", "llama", "lora_adapter_waiting_pods_avg", "adapter=sql-bot", "500m"},
		"hottest average":             {"statefulsets.apps", "llama", "lora_adapter_waiting_pods_avg", "", "1"},
		"a pod":                       {"pods", "a", "lora_adapter_waiting_pods", "adapter=sql-bot", "1"},
		"a pod without the adapter":   {"pods", "b", "lora_adapter_waiting_pods", "adapter=sql-bot", "0"},
		"a pod's hottest adapter":     {"pods", "b", "lora_adapter_waiting_pods", "", "1"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			sel, err := labels.Parse(tc.selector)
			if err != nil {
				t.Fatal(err)
			}
			mv, err := p.GetMetricByName(ctx, types.NamespacedName{Namespace: "ml", Name: tc.object}, info(tc.resource, tc.metric), sel)
			if err != nil {
				t.Fatal(err)
			}
			if got := mv.Value.String(); got != tc.want {
				t.Errorf("value %s, want %s", got, tc.want)
			}
			wantTime := now.Add(-time.Second) // b's, the oldest list used
			if tc.object == "a" {
				wantTime = now
			}
			if !mv.Timestamp.Time.Equal(wantTime) || mv.WindowSeconds != nil {
				t.Errorf("timestamp %s, window %v; want %s and none", mv.Timestamp.Time, mv.WindowSeconds, wantTime)
			}
			var wantSelector *metav1.LabelSelector
			if tc.selector != "" {
				wantSelector, _ = metav1.ParseToLabelSelector(tc.selector)
			}
			if diff := cmp.Diff(wantSelector, mv.Metric.Selector); diff != "" {
				t.Errorf("metric selector (-want +got):\n%s", diff)
			}
		})
	}

	list, err := p.GetMetricBySelector(ctx, "ml", labels.SelectorFromSet(labels.Set{"app": "llama"}), info("pods", "lora_adapter_waiting_pods"),
		labels.SelectorFromSet(labels.Set{"adapter": "sql-bot"}))
	if err != nil {
		t.Fatal(err)
	}
	byPod := map[string]string{}
	for _, mv := range list.Items {
		byPod[mv.DescribedObject.Name] = mv.Value.String()
	}
	if diff := cmp.Diff(map[string]string{"a": "1", "b": "0"}, byPod); diff != "" {
		t.Errorf("pods by selector (-want +got):\n%s", diff)
	}

	notFound := map[string]struct{ resource, object string }{
		"a stale pod":                       {"pods", "c"},
		"a pod never scraped":               {"pods", "d"},
		"a deployment without scraped pods": {"deployments.apps", "empty"},
	}
	for name, tc := range notFound {
		t.Run(name, func(t *testing.T) {
			sel, _ := labels.Parse("adapter=sql-bot")
			if mv, err := p.GetMetricByName(ctx, types.NamespacedName{Namespace: "ml", Name: tc.object}, info(tc.resource, "lora_adapter_waiting_pods"), sel); !apierrors.IsNotFound(err) {
				t.Errorf("got %v, %v; want NotFound", mv, err)
			}
		})
	}
}

func TestUnsupportedMetricSelectors(t *testing.T) {
	p := adapterFixture(t)
	_, ctx := ktesting.NewTestContext(t)
	for selector, metric := range map[string]string{
		"adapter!=sql-bot":          "lora_adapter_waiting_pods",
		"adapter notin (sql-bot)":   "lora_adapter_waiting_pods",
		"adapter":                   "lora_adapter_waiting_pods",
		"!adapter":                  "lora_adapter_waiting_pods",
		"model=llama":               "lora_adapter_waiting_pods",
		"adapter=a,model=llama":     "lora_adapter_waiting_pods",
		"adapter=sql-bot,adapter=b": "lora_adapter_running_pods",
		"adapter=sql-bot":           "requests_waiting",
	} {
		t.Run(selector+" on "+metric, func(t *testing.T) {
			sel, err := labels.Parse(selector)
			if err != nil {
				t.Fatal(err)
			}
			_, err = p.GetMetricByName(ctx, types.NamespacedName{Namespace: "ml", Name: "llama"}, info("deployments.apps", metric), sel)
			if !apierrors.IsBadRequest(err) {
				t.Fatalf("got %v, want BadRequest", err)
			}
			t.Log(err)
			_, err = p.GetMetricBySelector(ctx, "ml", labels.Everything(), info("pods", metric), sel)
			if !apierrors.IsBadRequest(err) {
				t.Errorf("by selector: got %v, want BadRequest", err)
			}
		})
	}
}
