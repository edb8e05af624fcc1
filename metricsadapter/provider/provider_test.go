package provider

import (
	"math"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/klog/v2/ktesting"
	"k8s.io/metrics/pkg/apis/custom_metrics"
	cmprovider "sigs.k8s.io/custom-metrics-apiserver/pkg/provider"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/metricsadapter/scrape"
	"github.com/capstan-dev/capstan/metricsadapter/store"
)

var (
	cat = catalogue.Builtin()
	now = time.Date(2026, 11, 22, 10, 0, 40, 0, time.UTC)
)

func mapper() apimeta.RESTMapper {
	m := apimeta.NewDefaultRESTMapper(nil)
	m.Add(schema.GroupVersionKind{Version: "v1", Kind: "Pod"}, apimeta.RESTScopeNamespace)
	m.Add(schema.GroupVersionKind{Version: "v1", Kind: "Service"}, apimeta.RESTScopeNamespace)
	m.Add(schema.GroupVersionKind{Version: "v1", Kind: "Node"}, apimeta.RESTScopeRoot)
	m.Add(schema.GroupVersionKind{Group: "apps", Version: "v1", Kind: "Deployment"}, apimeta.RESTScopeNamespace)
	m.Add(schema.GroupVersionKind{Group: "apps", Version: "v1", Kind: "StatefulSet"}, apimeta.RESTScopeNamespace)
	return m
}

func pod(name string, labels map[string]string) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "ml", Name: name, Labels: labels}}
}

var llama = map[string]string{"app": "llama", modelserver.ModelLabel: "llama"}

// fixture: pods a, b (fresh, 40s of samples), c (stale: last sample 10s
// ago), d (never scraped) of Deployment, StatefulSet and Service "llama";
// pod e of Deployment "empty", which has no scraped pods.
func fixture(t *testing.T) *Provider {
	t.Helper()
	st, err := store.New(store.Options{Window: 30 * time.Second, MaxAge: 5 * time.Second, Catalogue: cat})
	if err != nil {
		t.Fatal(err)
	}
	id := func(name string) int { i, _ := cat.ID(name); return i }
	waiting, prompt, ttft := id("requests_waiting"), id("prompt_tokens_per_second"), id("time_to_first_token_seconds")
	bounds := []float64{0.1, 1, 10, math.Inf(1)}
	for sec := 0; sec <= 40; sec++ {
		at := now.Add(time.Duration(sec-40) * time.Second)
		for _, p := range []struct {
			name          string
			waiting, rate float64
			slow          bool
			until         int
		}{{"a", 2, 10, false, 40}, {"b", 6, 30, true, 40}, {"c", 100, 100, false, 30}} {
			if sec > p.until {
				continue
			}
			v := cat.NewValues()
			v.Has[waiting], v.Scalar[waiting] = true, p.waiting
			v.Has[prompt], v.Scalar[prompt] = true, p.rate*float64(sec)
			n := float64(sec)
			counts := []float64{n, n, n, n}
			if p.slow {
				counts = []float64{0, 0, n, n}
			}
			v.Has[ttft], v.Hist[ttft] = true, catalogue.HistogramValue{Bounds: bounds, Counts: counts, Count: n}
			st.Observe(scrape.Target{Key: types.NamespacedName{Namespace: "ml", Name: p.name}}, at, v)
		}
	}

	selector := &metav1.LabelSelector{MatchLabels: map[string]string{"app": "llama"}}
	objects := []any{
		pod("a", llama), pod("b", llama), pod("c", llama), pod("d", llama),
		pod("e", map[string]string{"app": "empty"}),
		&appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: "ml", Name: "llama", Labels: map[string]string{modelserver.ModelLabel: "llama"}},
			Spec: appsv1.DeploymentSpec{Selector: selector, Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: llama}}}},
		// A model at zero replicas.
		&appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: "ml", Name: "zero"},
			Spec: appsv1.DeploymentSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "zero"}},
				Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": "zero", modelserver.ModelLabel: "mistral"}}}}},
		&appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: "ml", Name: "empty"},
			Spec: appsv1.DeploymentSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "empty"}}}},
		&appsv1.StatefulSet{ObjectMeta: metav1.ObjectMeta{Namespace: "ml", Name: "llama"}, Spec: appsv1.StatefulSetSpec{Selector: selector}},
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ml", Name: "llama", Labels: map[string]string{modelserver.ModelLabel: "llama"}},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "llama"}}},
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ml", Name: "external"}},
	}
	factory := informers.NewSharedInformerFactory(fake.NewClientset(), 0)
	for _, o := range objects {
		var err error
		switch o := o.(type) {
		case *corev1.Pod:
			err = factory.Core().V1().Pods().Informer().GetIndexer().Add(o)
		case *corev1.Service:
			err = factory.Core().V1().Services().Informer().GetIndexer().Add(o)
		case *appsv1.Deployment:
			err = factory.Apps().V1().Deployments().Informer().GetIndexer().Add(o)
		case *appsv1.StatefulSet:
			err = factory.Apps().V1().StatefulSets().Informer().GetIndexer().Add(o)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	return New(Config{
		Catalogue: cat, Store: st, Mapper: mapper(), Now: func() time.Time { return now },
		Pods: factory.Core().V1().Pods().Lister(), Services: factory.Core().V1().Services().Lister(),
		Deployments: factory.Apps().V1().Deployments().Lister(), StatefulSets: factory.Apps().V1().StatefulSets().Lister(),
	})
}

func info(resource, metric string) cmprovider.CustomMetricInfo {
	return cmprovider.CustomMetricInfo{GroupResource: schema.ParseGroupResource(resource), Namespaced: true, Metric: metric}
}

// got is a comparable summary of a MetricValue.
type got struct {
	Kind, APIVersion, Name, Metric, Value string
	Time                                  time.Time
	Window                                int64
}

func summarize(mv custom_metrics.MetricValue) got {
	g := got{Kind: mv.DescribedObject.Kind, APIVersion: mv.DescribedObject.APIVersion, Name: mv.DescribedObject.Name,
		Metric: mv.Metric.Name, Value: mv.Value.String(), Time: mv.Timestamp.Time}
	if mv.WindowSeconds != nil {
		g.Window = *mv.WindowSeconds
	}
	return g
}

func TestGetMetricByName(t *testing.T) {
	p := fixture(t)
	_, ctx := ktesting.NewTestContext(t)
	ok := map[string]struct {
		resource, object, metric string
		want                     got
	}{
		"pod gauge": {"pods", "a", "requests_waiting",
			got{Kind: "Pod", APIVersion: "v1", Name: "a", Metric: "requests_waiting", Value: "2", Time: now}},
		"pod rate with its window": {"pods", "b", "prompt_tokens_per_second",
			got{Kind: "Pod", APIVersion: "v1", Name: "b", Metric: "prompt_tokens_per_second", Value: "30", Time: now, Window: 30}},
		"pod quantile": {"pods", "b", "time_to_first_token_seconds_p50",
			got{Kind: "Pod", APIVersion: "v1", Name: "b", Metric: "time_to_first_token_seconds_p50", Value: "5500m", Time: now, Window: 30}},
		"deployment sum over fresh pods": {"deployments.apps", "llama", "requests_waiting",
			got{Kind: "Deployment", APIVersion: "apps/v1", Name: "llama", Metric: "requests_waiting", Value: "8", Time: now}},
		"deployment average over pods with a value": {"deployments.apps", "llama", "requests_waiting_avg",
			got{Kind: "Deployment", APIVersion: "apps/v1", Name: "llama", Metric: "requests_waiting_avg", Value: "4", Time: now}},
		"deployment rate": {"deployments.apps", "llama", "prompt_tokens_per_second",
			got{Kind: "Deployment", APIVersion: "apps/v1", Name: "llama", Metric: "prompt_tokens_per_second", Value: "40", Time: now, Window: 30}},
		"deployment pooled quantile": {"deployments.apps", "llama", "time_to_first_token_seconds_p90",
			got{Kind: "Deployment", APIVersion: "apps/v1", Name: "llama", Metric: "time_to_first_token_seconds_p90", Value: "8200m", Time: now, Window: 30}},
		"singular resource name": {"deployment.apps", "llama", "requests_waiting",
			got{Kind: "Deployment", APIVersion: "apps/v1", Name: "llama", Metric: "requests_waiting", Value: "8", Time: now}},
		"statefulset": {"statefulsets.apps", "llama", "requests_waiting_avg",
			got{Kind: "StatefulSet", APIVersion: "apps/v1", Name: "llama", Metric: "requests_waiting_avg", Value: "4", Time: now}},
		"service": {"services", "llama", "requests_waiting",
			got{Kind: "Service", APIVersion: "v1", Name: "llama", Metric: "requests_waiting", Value: "8", Time: now}},
	}
	for name, tc := range ok {
		t.Run(name, func(t *testing.T) {
			mv, err := p.GetMetricByName(ctx, types.NamespacedName{Namespace: "ml", Name: tc.object}, info(tc.resource, tc.metric), labels.Everything())
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, summarize(*mv)); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}

	notFound := map[string]struct{ resource, object, metric string }{
		"a stale pod":                       {"pods", "c", "requests_waiting"},
		"a pod never scraped":               {"pods", "d", "requests_waiting"},
		"a gauge the pod does not report":   {"pods", "a", "kv_cache_usage"},
		"an unknown metric":                 {"pods", "a", "gpu_temperature"},
		"no average variant for pods":       {"pods", "a", "requests_waiting_avg"},
		"no average variant of a quantile":  {"deployments.apps", "llama", "time_to_first_token_seconds_p90_avg"},
		"a deployment without scraped pods": {"deployments.apps", "empty", "requests_waiting"},
		"a deployment that does not exist":  {"deployments.apps", "nope", "requests_waiting"},
		"a service without a selector":      {"services", "external", "requests_waiting"},
		"an unsupported resource":           {"configmaps", "x", "requests_waiting"},
	}
	for name, tc := range notFound {
		t.Run(name, func(t *testing.T) {
			mv, err := p.GetMetricByName(ctx, types.NamespacedName{Namespace: "ml", Name: tc.object}, info(tc.resource, tc.metric), labels.Everything())
			if !apierrors.IsNotFound(err) {
				t.Errorf("got %v, %v; want NotFound", mv, err)
			}
		})
	}

	t.Run("a metric label selector is a bad request", func(t *testing.T) {
		_, err := p.GetMetricByName(ctx, types.NamespacedName{Namespace: "ml", Name: "a"}, info("pods", "requests_waiting"), labels.SelectorFromSet(labels.Set{"model": "x"}))
		if !apierrors.IsBadRequest(err) {
			t.Errorf("got %v, want BadRequest", err)
		}
	})
	t.Run("cluster-scoped resources have no metrics", func(t *testing.T) {
		i := info("nodes", "requests_waiting")
		i.Namespaced = false
		if _, err := p.GetMetricByName(ctx, types.NamespacedName{Name: "n"}, i, labels.Everything()); !apierrors.IsNotFound(err) {
			t.Errorf("got %v, want NotFound", err)
		}
	})
}

func TestGetMetricBySelector(t *testing.T) {
	p := fixture(t)
	_, ctx := ktesting.NewTestContext(t)
	names := func(l *custom_metrics.MetricValueList) map[string]string {
		out := map[string]string{}
		for _, mv := range l.Items {
			out[mv.DescribedObject.Name] = mv.Value.String()
		}
		return out
	}
	// Pods c (stale) and d (never scraped) are left out: a partial answer,
	// not a zero for them, and not an error.
	list, err := p.GetMetricBySelector(ctx, "ml", labels.SelectorFromSet(labels.Set{"app": "llama"}), info("pods", "requests_waiting"), labels.Everything())
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(map[string]string{"a": "2", "b": "6"}, names(list)); diff != "" {
		t.Errorf("pods (-want +got):\n%s", diff)
	}
	list, err = p.GetMetricBySelector(ctx, "ml", labels.Everything(), info("deployments.apps", "requests_waiting"), labels.Everything())
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(map[string]string{"llama": "8"}, names(list)); diff != "" {
		t.Errorf("deployments (-want +got):\n%s", diff)
	}
	for _, tc := range []struct{ what, selector string }{
		{"only pods without fresh values", "app=llama,name in (c)"},
		{"no pods at all", "app=nothing"},
	} {
		sel, _ := labels.Parse(tc.selector)
		if _, err := p.GetMetricBySelector(ctx, "ml", sel, info("pods", "requests_waiting"), labels.Everything()); !apierrors.IsNotFound(err) {
			t.Errorf("%s: got %v, want NotFound", tc.what, err)
		}
	}
}

func TestListAllMetrics(t *testing.T) {
	p := fixture(t)
	all := map[cmprovider.CustomMetricInfo]bool{}
	for _, i := range p.ListAllMetrics() {
		all[i] = true
	}
	for _, want := range []cmprovider.CustomMetricInfo{
		{GroupResource: Pods, Namespaced: true, Metric: "requests_waiting"},
		{GroupResource: Pods, Namespaced: true, Metric: "vllm_num_requests_waiting"},
		{GroupResource: Pods, Namespaced: true, Metric: "time_to_first_token_seconds_p90"},
		{GroupResource: Deployments, Namespaced: true, Metric: "requests_waiting_avg"},
		{GroupResource: StatefulSets, Namespaced: true, Metric: "kv_cache_usage_avg"},
		{GroupResource: Services, Namespaced: true, Metric: "e2e_request_latency_seconds_p50"},
	} {
		if !all[want] {
			t.Errorf("ListAllMetrics lacks %s", want)
		}
	}
	for _, unwanted := range []cmprovider.CustomMetricInfo{
		{GroupResource: Pods, Namespaced: true, Metric: "requests_waiting_avg"},
		{GroupResource: Deployments, Namespaced: true, Metric: "time_to_first_token_seconds_p90_avg"},
	} {
		if all[unwanted] {
			t.Errorf("ListAllMetrics has %s", unwanted)
		}
	}
}

func TestQuantity(t *testing.T) {
	for v, want := range map[float64]string{0.25: "250m", 7: "7", 1234.5678: "1234568m", 0: "0", -3: "-3"} {
		if got := Quantity(v); got.String() != want {
			t.Errorf("Quantity(%v) = %s, want %s", v, got.String(), want)
		}
	}
}

// fakeDemand has demand for the models in it, read at at.
type fakeDemand map[string]float64

var demandAt = now.Add(-time.Second)

func (f fakeDemand) Value(model string, _ time.Time) (float64, time.Time, bool) {
	if f == nil {
		return 0, time.Time{}, false
	}
	return f[model], demandAt, true
}

// requests_demand is served on the objects of a model, found by the
// capstan.dev/model label of a Deployment's pod template or of a Service,
// whether or not the model has pods; not on pods.
func TestRequestsDemand(t *testing.T) {
	p := fixture(t)
	p.Demand = fakeDemand{"llama": 7, "mistral": 3}
	_, ctx := ktesting.NewTestContext(t)
	for _, tc := range []struct{ resource, name, want string }{
		{"deployments.apps", "llama", "7"},
		{"services", "llama", "7"},
		{"deployments.apps", "zero", "3"}, // no pod at all
	} {
		mv, err := p.GetMetricByName(ctx, types.NamespacedName{Namespace: "ml", Name: tc.name}, info(tc.resource, RequestsDemand), labels.Everything())
		if err != nil {
			t.Errorf("%s %s: %v", tc.resource, tc.name, err)
			continue
		}
		if g := summarize(*mv); g.Value != tc.want || !g.Time.Equal(demandAt) {
			t.Errorf("%s %s: %+v, want %s at %s", tc.resource, tc.name, g, tc.want, demandAt)
		}
	}
	list, err := p.GetMetricBySelector(ctx, "ml", labels.Everything(), info("deployments.apps", RequestsDemand), labels.Everything())
	if err != nil || len(list.Items) != 2 {
		t.Errorf("requests_demand of every Deployment: %v %v, want llama's and zero's", list, err)
	}
	for _, tc := range []struct{ resource, name string }{{"pods", "a"}, {"deployments.apps", "empty"}} {
		if _, err := p.GetMetricByName(ctx, types.NamespacedName{Namespace: "ml", Name: tc.name}, info(tc.resource, RequestsDemand), labels.Everything()); !apierrors.IsNotFound(err) {
			t.Errorf("requests_demand of %s %s (no model): %v, want NotFound", tc.resource, tc.name, err)
		}
	}
	// No router answered: NotFound, not 0.
	p.Demand = fakeDemand(nil)
	if _, err := p.GetMetricByName(ctx, types.NamespacedName{Namespace: "ml", Name: "llama"}, info("deployments.apps", RequestsDemand), labels.Everything()); !apierrors.IsNotFound(err) {
		t.Errorf("with no router's value: %v, want NotFound", err)
	}
}
