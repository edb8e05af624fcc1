package inferencepool

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
	inferencev1 "sigs.k8s.io/gateway-api-inference-extension/api/v1"
	inferenceclient "sigs.k8s.io/gateway-api-inference-extension/client-go/clientset/versioned"
	inferenceinformers "sigs.k8s.io/gateway-api-inference-extension/client-go/informers/externalversions"

	"github.com/capstan-dev/capstan/router/controller"
)

// Handler receives every new snapshot of a pool. pool is nil when the
// InferencePool is gone. Calls for one pool are never concurrent; calls for
// different pools may be.
type Handler interface {
	PoolChanged(key types.NamespacedName, pool *Pool)
}

// Controller watches InferencePools and the pods of their namespaces and
// keeps a snapshot of each pool's endpoints.
type Controller struct {
	handler   Handler
	informers controller.Informers
	// pools and pods have one informer per watched namespace, or one for
	// all namespaces.
	pools []cache.SharedIndexInformer
	pods  []cache.SharedIndexInformer
	queue workqueue.TypedRateLimitingInterface[cache.ObjectName]

	snapshots *controller.Snapshots[Pool]

	ready atomic.Bool
}

var _ prometheus.Collector = (*Controller)(nil)

// New returns a Controller for namespaces (empty: all) that reports to
// handler. Run starts it. Only call it when the InferencePool API is
// served: its informers would otherwise never sync.
func New(kube kubernetes.Interface, client inferenceclient.Interface, handler Handler, namespaces []string) *Controller {
	if len(namespaces) == 0 {
		namespaces = []string{metav1.NamespaceAll}
	}
	c := &Controller{
		handler: handler,
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedMaxOfRateLimiter(
				workqueue.NewTypedItemExponentialFailureRateLimiter[cache.ObjectName](5*time.Millisecond, 30*time.Second),
				&workqueue.TypedBucketRateLimiter[cache.ObjectName]{Limiter: rate.NewLimiter(rate.Limit(100), 500)},
			),
			workqueue.TypedRateLimitingQueueConfig[cache.ObjectName]{Name: "capstan-router-inferencepool"}),
		snapshots: controller.NewSnapshots((*Pool).equal),
	}
	for _, ns := range namespaces {
		pf := inferenceinformers.NewSharedInformerFactoryWithOptions(client, 0, inferenceinformers.WithNamespace(ns))
		pools := pf.Inference().V1().InferencePools().Informer()
		kf := informers.NewSharedInformerFactoryWithOptions(kube, 0, informers.WithNamespace(ns))
		pods := kf.Core().V1().Pods().Informer()
		// SetTransform and AddEventHandler fail only once an informer has
		// started.
		utilruntime.Must(pods.SetTransform(Slim))
		c.informers.Add(pf, pools.HasSynced)
		c.informers.Add(kf, pods.HasSynced)
		c.pools = append(c.pools, pools)
		c.pods = append(c.pods, pods)
		_, err := pools.AddEventHandler(controller.ObjectHandler(c.enqueuePool))
		utilruntime.Must(err)
		_, err = pods.AddEventHandler(controller.MemberHandler(c.enqueuePod))
		utilruntime.Must(err)
	}
	return c
}

// Informers are the InferencePool informers, one per watched namespace (or
// one for all), for the Gateway API controller to list pools from and
// follow them; this controller runs them.
func (c *Controller) Informers() []cache.SharedIndexInformer { return c.pools }

func (c *Controller) enqueuePool(obj any) {
	if pool, ok := obj.(*inferencev1.InferencePool); ok {
		c.queue.Add(cache.ObjectName{Namespace: pool.Namespace, Name: pool.Name})
	}
}

// enqueuePod enqueues every pool of the pod's namespace that selects it;
// pods no pool selects cost a lookup and nothing else.
func (c *Controller) enqueuePod(obj any) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	for _, pool := range c.poolsIn(pod.Namespace) {
		if Selector(pool).Matches(labels.Set(pod.Labels)) {
			c.queue.Add(cache.ObjectName{Namespace: pool.Namespace, Name: pool.Name})
		}
	}
}

// poolsIn returns the cached pools of a namespace.
func (c *Controller) poolsIn(namespace string) []*inferencev1.InferencePool {
	var out []*inferencev1.InferencePool
	for _, inf := range c.pools {
		objs, err := inf.GetIndexer().ByIndex(cache.NamespaceIndex, namespace)
		if err != nil {
			continue // the factory's informers always have the namespace index
		}
		for _, o := range objs {
			if pool, ok := o.(*inferencev1.InferencePool); ok {
				out = append(out, pool)
			}
		}
	}
	return out
}

// podsIn returns the cached pods of a namespace.
func (c *Controller) podsIn(namespace string) ([]*corev1.Pod, error) {
	var out []*corev1.Pod
	for _, inf := range c.pods {
		objs, err := inf.GetIndexer().ByIndex(cache.NamespaceIndex, namespace)
		if err != nil {
			return nil, err
		}
		for _, o := range objs {
			if pod, ok := o.(*corev1.Pod); ok {
				out = append(out, pod)
			}
		}
	}
	return out, nil
}

// Run starts the informers, waits for their caches, builds every pool's
// snapshot, marks the controller synced, and then follows changes with
// workers goroutines until ctx ends.
func (c *Controller) Run(ctx context.Context, workers int) error {
	return controller.RunKeyed(ctx, &c.informers, "InferencePool and Pod", c.queue, workers, c.processNextItem, func() {
		c.ready.Store(true)
		klog.FromContext(ctx).Info("InferencePool caches synced", "pools", c.Len())
	})
}

// HasSynced reports whether the caches have synced and every pool seen in
// the first list has a snapshot.
func (c *Controller) HasSynced() bool { return c.ready.Load() }

func (c *Controller) processNextItem(ctx context.Context) bool {
	return controller.Process(ctx, c.queue, "InferencePool endpoints", c.sync)
}

// sync rebuilds one pool's snapshot from the caches.
func (c *Controller) sync(ctx context.Context, key cache.ObjectName) error {
	nn := types.NamespacedName{Namespace: key.Namespace, Name: key.Name}
	var pool *inferencev1.InferencePool
	for _, inf := range c.pools {
		o, ok, err := inf.GetStore().GetByKey(key.String())
		if err != nil {
			return err
		}
		if ok {
			pool = o.(*inferencev1.InferencePool)
			break
		}
	}
	if pool == nil {
		c.store(ctx, nn, nil)
		return nil
	}
	pods, err := c.podsIn(key.Namespace)
	if err != nil {
		return err
	}
	snap := Build(pool, pods)
	if logger := klog.FromContext(ctx); logger.V(5).Enabled() {
		ready, notReady, terminating := snap.Counts()
		logger.V(5).Info("Rebuilt InferencePool endpoints", "inferencePool", nn, "ready", ready, "notReady", notReady, "terminating", terminating)
	}
	c.store(ctx, nn, snap)
	return nil
}

// store swaps in a pool's new snapshot (nil to drop it) and tells the
// handler, unless nothing changed.
func (c *Controller) store(ctx context.Context, key types.NamespacedName, snap *Pool) {
	if !c.snapshots.Store(key, snap) {
		return
	}
	klog.FromContext(ctx).V(4).Info("InferencePool endpoints changed", "inferencePool", key, "present", snap != nil)
	c.handler.PoolChanged(key, snap)
}

// Len is the number of pools with a snapshot.
func (c *Controller) Len() int { return c.snapshots.Len() }

var readyDesc = prometheus.NewDesc("capstan_router_inferencepool_ready_endpoints",
	"Ready, non-terminating endpoints (pod IP and target port) of each InferencePool, the ones the router sends its requests to.",
	[]string{"namespace", "inferencepool"}, nil)

// Describe implements prometheus.Collector.
func (c *Controller) Describe(ch chan<- *prometheus.Desc) { ch <- readyDesc }

// Collect implements prometheus.Collector: the counts are read from the
// snapshots when Prometheus scrapes, so they cost nothing on a change.
func (c *Controller) Collect(ch chan<- prometheus.Metric) {
	c.snapshots.Range(func(key types.NamespacedName, p *Pool) {
		ready, _, _ := p.Counts()
		ch <- prometheus.MustNewConstMetric(readyDesc, prometheus.GaugeValue, float64(ready), key.Namespace, key.Name)
	})
}
