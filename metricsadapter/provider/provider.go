// Package provider answers custom.metrics.k8s.io queries from the store: per
// pod, and per Deployment, StatefulSet or Service over the pods its selector
// matches. It only reads: from the store and from informer caches, never
// from the API server or the pods, so an answer takes microseconds whatever
// state the pods are in.
//
// A pod without a fresh value is left out of a selector query's answer (a
// partial list is correct: the HPA controller handles pods without metrics
// itself), and a query is NotFound only when no pod has a value. An object's
// metric <name> is the sum over its pods that have a value; <name>_avg
// divides that sum by how many pods had one. Quantiles of an object pool the
// histogram increases of its pods, so <name>_p90 of a Deployment is the 90th
// percentile of all its requests, and has no _avg variant.
//
// An Adapters metric (catalogue.Adapters: lora_adapter_waiting_pods, ...) is
// per LoRA adapter: the number of pods whose engine lists the adapter. A
// metric label selector on AdapterLabel picks the adapter; without one, or
// with several adapters selected, the value is the largest over them, the
// hottest adapter's.
package provider

import (
	"context"
	"fmt"
	"math"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/apimachinery/pkg/types"
	appslisters "k8s.io/client-go/listers/apps/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/klog/v2"
	"k8s.io/metrics/pkg/apis/custom_metrics"
	cmprovider "sigs.k8s.io/custom-metrics-apiserver/pkg/provider"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/metricsadapter/store"
)

// The resources metrics are served for.
var (
	Pods         = schema.GroupResource{Resource: "pods"}
	Deployments  = schema.GroupResource{Group: "apps", Resource: "deployments"}
	StatefulSets = schema.GroupResource{Group: "apps", Resource: "statefulsets"}
	Services     = schema.GroupResource{Resource: "services"}
)

var kinds = map[schema.GroupResource]schema.GroupVersionKind{
	Pods:         {Version: "v1", Kind: "Pod"},
	Deployments:  {Group: "apps", Version: "v1", Kind: "Deployment"},
	StatefulSets: {Group: "apps", Version: "v1", Kind: "StatefulSet"},
	Services:     {Version: "v1", Kind: "Service"},
}

// Config is what a Provider reads.
type Config struct {
	Catalogue *catalogue.Catalogue
	Store     *store.Store
	// Pods lists the model-server pods (the adapter's filtered informer).
	Pods         corelisters.PodLister
	Deployments  appslisters.DeploymentLister
	StatefulSets appslisters.StatefulSetLister
	Services     corelisters.ServiceLister
	// Mapper normalizes resource names (deployment, deployments.apps, ...).
	Mapper apimeta.RESTMapper
	// Demand, when set, serves RequestsDemand.
	Demand Demand
	// Now is the clock; default time.Now.
	Now func() time.Time
}

// RequestsDemand is the metric of a model's Deployment, StatefulSet or
// Service that counts the model's requests the routers hold or have in
// flight. It has a value while the model has no pod, so an HPA can scale
// the model from zero on it.
const RequestsDemand = "requests_demand"

// AdapterLabel is the metric label that selects the adapter of an Adapters
// metric: adapter=support-bot-v3, or adapter in (a,b) for the larger of two.
const AdapterLabel = "adapter"

// Demand gives a model's requests_demand, summed over the router replicas
// with a fresh value, and the time of the oldest of them; false when none
// has one.
type Demand interface {
	Value(model string, now time.Time) (float64, time.Time, bool)
}

// Provider is a custom metrics provider backed by the store.
type Provider struct {
	Config
	all []cmprovider.CustomMetricInfo
}

var _ cmprovider.CustomMetricsProvider = &Provider{}

// New returns a provider. The metric list is computed once from the
// catalogue: ListAllMetrics answers from memory.
func New(cfg Config) *Provider {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	p := &Provider{Config: cfg}
	for _, s := range cfg.Catalogue.Served() {
		p.all = append(p.all, cmprovider.CustomMetricInfo{GroupResource: Pods, Namespaced: true, Metric: s.Name})
		for _, gr := range []schema.GroupResource{Deployments, StatefulSets, Services} {
			p.all = append(p.all, cmprovider.CustomMetricInfo{GroupResource: gr, Namespaced: true, Metric: s.Name})
			if s.Quantile == 0 {
				p.all = append(p.all, cmprovider.CustomMetricInfo{GroupResource: gr, Namespaced: true, Metric: s.Name + catalogue.AvgSuffix})
			}
		}
	}
	if cfg.Demand != nil {
		for _, gr := range []schema.GroupResource{Deployments, StatefulSets, Services} {
			p.all = append(p.all, cmprovider.CustomMetricInfo{GroupResource: gr, Namespaced: true, Metric: RequestsDemand})
		}
	}
	return p
}

// ListAllMetrics implements provider.CustomMetricsProvider.
func (p *Provider) ListAllMetrics() []cmprovider.CustomMetricInfo { return p.all }

// query is a resolved request.
type query struct {
	gr     schema.GroupResource
	metric string // as asked
	served catalogue.ServedName
	avg    bool
	// demand is set for RequestsDemand, which is not the pods'.
	demand bool
	// adapters is set for an Adapters metric, whose value is the largest
	// over the selected adapters (every adapter when selected is nil);
	// selector echoes the selection in answers.
	adapters bool
	selected []string
	selector *metav1.LabelSelector
}

func (p *Provider) resolve(info cmprovider.CustomMetricInfo, metricSelector labels.Selector) (query, error) {
	q, err := p.resolveMetric(info)
	if err != nil || metricSelector == nil || metricSelector.Empty() {
		return q, err
	}
	if !q.adapters {
		return q, apierrors.NewBadRequest(fmt.Sprintf("metric label selectors are not supported for %s (got %q): it has no labels; only the per-adapter metrics take one (%s=<name>)", q.metric, metricSelector, AdapterLabel))
	}
	reqs, _ := metricSelector.Requirements()
	if len(reqs) != 1 || reqs[0].Key() != AdapterLabel ||
		reqs[0].Operator() != selection.Equals && reqs[0].Operator() != selection.DoubleEquals && reqs[0].Operator() != selection.In {
		return q, apierrors.NewBadRequest(fmt.Sprintf("metric label selector %q is not supported for %s: select adapters with %s=<name> or %s in (<name>,...)", metricSelector, q.metric, AdapterLabel, AdapterLabel))
	}
	q.selected = reqs[0].ValuesUnsorted()
	if q.selector, err = metav1.ParseToLabelSelector(metricSelector.String()); err != nil {
		return q, apierrors.NewBadRequest(fmt.Sprintf("metric label selector %q: %v", metricSelector, err))
	}
	return q, nil
}

// resolveMetric resolves the resource and the metric name.
func (p *Provider) resolveMetric(info cmprovider.CustomMetricInfo) (query, error) {
	q := query{gr: info.GroupResource, metric: info.Metric}
	if p.Mapper != nil {
		if n, _, err := info.Normalized(p.Mapper); err == nil {
			q.gr = n.GroupResource
		}
	}
	if _, ok := kinds[q.gr]; !ok || !info.Namespaced {
		return q, cmprovider.NewMetricNotFoundError(info.GroupResource, info.Metric)
	}
	if info.Metric == RequestsDemand && p.Demand != nil && q.gr != Pods {
		q.demand = true
		return q, nil
	}
	if s, ok := p.Catalogue.Lookup(info.Metric); ok {
		q.served = s
	} else if base, ok := strings.CutSuffix(info.Metric, catalogue.AvgSuffix); ok && q.gr != Pods {
		if s, ok := p.Catalogue.Lookup(base); ok && s.Quantile == 0 {
			q.served, q.avg = s, true
		}
	}
	if q.served.Name == "" {
		return q, cmprovider.NewMetricNotFoundError(q.gr, info.Metric)
	}
	q.adapters = p.Catalogue.Metrics()[q.served.Metric].Kind == catalogue.Adapters
	return q, nil
}

// GetMetricByName implements provider.CustomMetricsProvider.
func (p *Provider) GetMetricByName(ctx context.Context, name types.NamespacedName, info cmprovider.CustomMetricInfo, metricSelector labels.Selector) (*custom_metrics.MetricValue, error) {
	q, err := p.resolve(info, metricSelector)
	if err != nil {
		return nil, err
	}
	now := p.Now()
	var v store.Value
	var ok bool
	switch {
	case q.demand:
		model, err := p.modelOf(q.gr, name)
		if err != nil {
			return nil, err
		}
		v, ok = p.demand(model, now)
	case q.gr == Pods:
		v, ok = p.podValue(name, q, now)
	default:
		selector, err := p.selectorOf(q.gr, name)
		if err != nil {
			return nil, err
		}
		v, ok = p.aggregate(name.Namespace, selector, q, now)
	}
	if !ok {
		klog.FromContext(ctx).V(5).Info("No fresh value", "resource", q.gr, "object", name, "metric", q.metric)
		return nil, cmprovider.NewMetricNotFoundForError(q.gr, q.metric, name.Name)
	}
	mv := metricValue(q, name, v)
	return &mv, nil
}

// GetMetricBySelector implements provider.CustomMetricsProvider.
func (p *Provider) GetMetricBySelector(ctx context.Context, namespace string, selector labels.Selector, info cmprovider.CustomMetricInfo, metricSelector labels.Selector) (*custom_metrics.MetricValueList, error) {
	q, err := p.resolve(info, metricSelector)
	if err != nil {
		return nil, err
	}
	now := p.Now()
	out := &custom_metrics.MetricValueList{}
	add := func(name string, v store.Value) {
		out.Items = append(out.Items, metricValue(q, types.NamespacedName{Namespace: namespace, Name: name}, v))
	}
	switch q.gr {
	case Pods:
		pods, err := p.Pods.Pods(namespace).List(selector)
		if err != nil {
			return nil, apierrors.NewInternalError(err)
		}
		out.Items = make([]custom_metrics.MetricValue, 0, len(pods))
		for _, pod := range pods {
			if v, ok := p.podValue(types.NamespacedName{Namespace: namespace, Name: pod.Name}, q, now); ok {
				add(pod.Name, v)
			}
		}
	default:
		objects, err := p.listObjects(q.gr, namespace, selector)
		if err != nil {
			return nil, apierrors.NewInternalError(err)
		}
		for _, o := range objects {
			v, ok := store.Value{}, false
			if q.demand {
				v, ok = p.demand(o.model, now)
			} else {
				v, ok = p.aggregate(namespace, o.selector, q, now)
			}
			if ok {
				add(o.name, v)
			}
		}
	}
	if len(out.Items) == 0 {
		klog.FromContext(ctx).V(5).Info("No object has a fresh value", "resource", q.gr, "namespace", namespace, "selector", selector, "metric", q.metric)
		return nil, cmprovider.NewMetricNotFoundForSelectorError(q.gr, q.metric, "*", selector)
	}
	return out, nil
}

// aggregate pools the metric over the model-server pods the selector matches.
func (p *Provider) aggregate(namespace string, selector labels.Selector, q query, now time.Time) (store.Value, bool) {
	if selector.Empty() {
		return store.Value{}, false // a Service without a selector has no pods of its own
	}
	pods, err := p.Pods.Pods(namespace).List(selector)
	if err != nil || len(pods) == 0 {
		return store.Value{}, false
	}
	keys := make([]types.NamespacedName, len(pods))
	for i, pod := range pods {
		keys[i] = types.NamespacedName{Namespace: namespace, Name: pod.Name}
	}
	var v store.Value
	var n int
	if q.adapters {
		v, n = q.adapterValue(p.Store.AdapterPods(keys, q.served.Metric, now))
	} else {
		v, n = p.Store.Aggregate(keys, q.served, now)
	}
	if n == 0 {
		return store.Value{}, false
	}
	if q.avg {
		v.Value /= float64(n)
	}
	return v, true
}

func (p *Provider) podValue(key types.NamespacedName, q query, now time.Time) (store.Value, bool) {
	if !q.adapters {
		return p.Store.PodValue(key, q.served, now)
	}
	v, n := q.adapterValue(p.Store.AdapterPods([]types.NamespacedName{key}, q.served.Metric, now))
	return v, n > 0
}

// adapterValue is the most pods any selected adapter is listed on (0 for an
// adapter no pod lists), and how many pods report the metric.
func (q query) adapterValue(ap store.AdapterPods) (store.Value, int) {
	most := 0
	if q.selected == nil {
		for _, n := range ap.Pods {
			most = max(most, n)
		}
	}
	for _, a := range q.selected {
		most = max(most, ap.Pods[a])
	}
	return store.Value{Value: float64(most), Time: ap.Time}, ap.Reporting
}

// selectorOf returns the pod selector of a Deployment, StatefulSet or
// Service.
func (p *Provider) selectorOf(gr schema.GroupResource, name types.NamespacedName) (labels.Selector, error) {
	// A lister's NotFound names the object, and is what the client gets.
	switch gr {
	case Deployments:
		d, err := p.Deployments.Deployments(name.Namespace).Get(name.Name)
		if err != nil {
			return nil, err
		}
		return selectorFrom(d.Spec.Selector)
	case StatefulSets:
		s, err := p.StatefulSets.StatefulSets(name.Namespace).Get(name.Name)
		if err != nil {
			return nil, err
		}
		return selectorFrom(s.Spec.Selector)
	default:
		s, err := p.Services.Services(name.Namespace).Get(name.Name)
		if err != nil {
			return nil, err
		}
		return labels.SelectorFromValidatedSet(s.Spec.Selector), nil
	}
}

func selectorFrom(ls *metav1.LabelSelector) (labels.Selector, error) {
	if ls == nil {
		return labels.Nothing(), nil
	}
	sel, err := metav1.LabelSelectorAsSelector(ls)
	if err != nil {
		return nil, apierrors.NewInternalError(fmt.Errorf("invalid pod selector: %w", err))
	}
	return sel, nil
}

type object struct {
	name     string
	selector labels.Selector
	model    string // its capstan.dev/model, for RequestsDemand
}

func (p *Provider) demand(model string, now time.Time) (store.Value, bool) {
	if model == "" {
		return store.Value{}, false
	}
	v, at, ok := p.Demand.Value(model, now)
	return store.Value{Value: v, Time: at}, ok
}

// modelOf is the model an object serves: the capstan.dev/model label of a
// Deployment's or StatefulSet's pod template, or of a Service, as the
// router reads it.
func (p *Provider) modelOf(gr schema.GroupResource, name types.NamespacedName) (string, error) {
	switch gr {
	case Deployments:
		d, err := p.Deployments.Deployments(name.Namespace).Get(name.Name)
		if err != nil {
			return "", err
		}
		return modelserver.Model(d.Spec.Template.Labels), nil
	case StatefulSets:
		s, err := p.StatefulSets.StatefulSets(name.Namespace).Get(name.Name)
		if err != nil {
			return "", err
		}
		return modelserver.Model(s.Spec.Template.Labels), nil
	default:
		s, err := p.Services.Services(name.Namespace).Get(name.Name)
		if err != nil {
			return "", err
		}
		return modelserver.Model(s.Labels), nil
	}
}

func (p *Provider) listObjects(gr schema.GroupResource, namespace string, selector labels.Selector) ([]object, error) {
	var out []object
	switch gr {
	case Deployments:
		list, err := p.Deployments.Deployments(namespace).List(selector)
		if err != nil {
			return nil, err
		}
		for _, d := range list {
			if sel, err := selectorFrom(d.Spec.Selector); err == nil {
				out = append(out, object{d.Name, sel, modelserver.Model(d.Spec.Template.Labels)})
			}
		}
	case StatefulSets:
		list, err := p.StatefulSets.StatefulSets(namespace).List(selector)
		if err != nil {
			return nil, err
		}
		for _, s := range list {
			if sel, err := selectorFrom(s.Spec.Selector); err == nil {
				out = append(out, object{s.Name, sel, modelserver.Model(s.Spec.Template.Labels)})
			}
		}
	case Services:
		list, err := p.Services.Services(namespace).List(selector)
		if err != nil {
			return nil, err
		}
		for _, s := range list {
			out = append(out, object{s.Name, labels.SelectorFromValidatedSet(s.Spec.Selector), modelserver.Model(s.Labels)})
		}
	}
	return out, nil
}

func metricValue(q query, name types.NamespacedName, v store.Value) custom_metrics.MetricValue {
	gvk := kinds[q.gr]
	mv := custom_metrics.MetricValue{
		DescribedObject: custom_metrics.ObjectReference{
			APIVersion: gvk.GroupVersion().String(), Kind: gvk.Kind, Namespace: name.Namespace, Name: name.Name,
		},
		Metric:    custom_metrics.MetricIdentifier{Name: q.metric, Selector: q.selector},
		Timestamp: metav1.NewTime(v.Time),
		Value:     Quantity(v.Value),
	}
	if v.Window > 0 {
		w := int64(math.Round(v.Window.Seconds()))
		mv.WindowSeconds = &w
	}
	return mv
}

// Quantity turns a value into a Quantity with milli precision, the way
// metrics APIs carry fractions (0.25 is "250m").
func Quantity(v float64) resource.Quantity {
	return *resource.NewMilliQuantity(int64(math.Round(v*1000)), resource.DecimalSI)
}
