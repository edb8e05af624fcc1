package discovery

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/router/controller"
)

// Handler receives every new snapshot of a Service. svc is nil when the
// Service is gone or no longer selected. Calls for one Service are never
// concurrent; calls for different Services may be.
type Handler interface {
	ServiceChanged(key types.NamespacedName, svc *Service)
}

// Handlers hands every snapshot to several handlers, in order.
type Handlers []Handler

func (hs Handlers) ServiceChanged(key types.NamespacedName, svc *Service) {
	for _, h := range hs {
		h.ServiceChanged(key, svc)
	}
}

var _ Handler = Handlers(nil)

// Options configures a Controller.
type Options struct {
	// Namespaces to watch; empty means all.
	Namespaces []string
	// ServiceSelector selects the Services to watch, as a label selector.
	// Default: every Service labelled capstan.dev/model.
	ServiceSelector string
	// AllServices snapshots every Service in the namespaces, whatever its
	// labels, and ignores ServiceSelector: Gateway API routes may send
	// traffic to any Service.
	AllServices bool
	// Resync is the informers' resync period; 0 disables resync.
	Resync time.Duration
}

// serviceIndex indexes EndpointSlices by "<namespace>/<service name>".
const serviceIndex = "service"

// Controller watches Services and EndpointSlices and keeps a snapshot of each
// selected Service's endpoints.
type Controller struct {
	handler   Handler
	selector  labels.Selector
	informers controller.Informers
	// services and slices have one entry per watched namespace, or one for
	// all namespaces under "".
	services map[string]corelisters.ServiceLister
	slices   []cache.SharedIndexInformer
	queue    workqueue.TypedRateLimitingInterface[cache.ObjectName]

	snapshots *controller.Snapshots[Service]

	ready atomic.Bool
}

// New returns a Controller that reports to handler. Run starts it.
func New(client kubernetes.Interface, handler Handler, opts Options) (*Controller, error) {
	if opts.ServiceSelector == "" {
		opts.ServiceSelector = modelserver.ModelLabel
	}
	selector, err := labels.Parse(opts.ServiceSelector)
	if err != nil {
		return nil, fmt.Errorf("service selector: %w", err)
	}
	if opts.AllServices {
		selector, opts.ServiceSelector = labels.Everything(), ""
	}
	namespaces := opts.Namespaces
	if len(namespaces) == 0 {
		namespaces = []string{metav1.NamespaceAll}
	}
	c := &Controller{
		handler:  handler,
		selector: selector,
		services: map[string]corelisters.ServiceLister{},
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			// Per-item exponential backoff for a Service whose sync fails,
			// and an overall bucket, as sample-controller does.
			workqueue.NewTypedMaxOfRateLimiter(
				workqueue.NewTypedItemExponentialFailureRateLimiter[cache.ObjectName](5*time.Millisecond, 30*time.Second),
				&workqueue.TypedBucketRateLimiter[cache.ObjectName]{Limiter: rate.NewLimiter(rate.Limit(100), 500)},
			),
			workqueue.TypedRateLimitingQueueConfig[cache.ObjectName]{Name: "capstan-router-discovery"}),
		snapshots: controller.NewSnapshots((*Service).equal),
	}
	for _, ns := range namespaces {
		svcFactory := informers.NewSharedInformerFactoryWithOptions(client, opts.Resync, informers.WithNamespace(ns),
			informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = opts.ServiceSelector }))
		sliceFactory := informers.NewSharedInformerFactoryWithOptions(client, opts.Resync, informers.WithNamespace(ns),
			informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = discoveryv1.LabelServiceName }))
		svcInformer := svcFactory.Core().V1().Services()
		sliceInformer := sliceFactory.Discovery().V1().EndpointSlices().Informer()
		c.informers.Add(svcFactory, svcInformer.Informer().HasSynced)
		c.informers.Add(sliceFactory, sliceInformer.HasSynced)
		c.services[ns] = svcInformer.Lister()
		c.slices = append(c.slices, sliceInformer)

		// AddIndexers and AddEventHandler fail only after the informer has
		// started, which cannot have happened yet.
		utilruntime.Must(sliceInformer.AddIndexers(cache.Indexers{serviceIndex: indexByService}))
		_, err := svcInformer.Informer().AddEventHandler(controller.ObjectHandler(c.enqueueService))
		utilruntime.Must(err)
		_, err = sliceInformer.AddEventHandler(controller.MemberHandler(c.enqueueSlice))
		utilruntime.Must(err)
	}
	return c, nil
}

func indexByService(obj any) ([]string, error) {
	slice, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return nil, nil
	}
	name := slice.Labels[discoveryv1.LabelServiceName]
	if name == "" {
		return nil, nil
	}
	return []string{slice.Namespace + "/" + name}, nil
}

func (c *Controller) enqueueService(obj any) {
	if svc, ok := obj.(*corev1.Service); ok {
		c.queue.Add(cache.ObjectName{Namespace: svc.Namespace, Name: svc.Name})
	}
}

// enqueueSlice enqueues the slice's Service if it is one the controller
// watches; slices of other Services are ignored.
func (c *Controller) enqueueSlice(obj any) {
	slice, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return
	}
	name := slice.Labels[discoveryv1.LabelServiceName]
	if name == "" {
		return
	}
	if _, err := c.serviceLister(slice.Namespace).Services(slice.Namespace).Get(name); err != nil {
		return
	}
	c.queue.Add(cache.ObjectName{Namespace: slice.Namespace, Name: name})
}

func (c *Controller) serviceLister(namespace string) corelisters.ServiceLister {
	if l, ok := c.services[metav1.NamespaceAll]; ok {
		return l
	}
	return c.services[namespace]
}

// Run starts the informers, waits for their caches, builds every watched
// Service's snapshot, marks the controller synced, and then follows changes
// with workers goroutines until ctx ends.
func (c *Controller) Run(ctx context.Context, workers int) error {
	return controller.RunKeyed(ctx, &c.informers, "Service and EndpointSlice", c.queue, workers, c.processNextItem, func() {
		c.ready.Store(true)
		klog.FromContext(ctx).Info("Caches synced", "services", c.Len())
	})
}

// HasSynced reports whether the caches have synced and every Service seen in
// the first list has a snapshot.
func (c *Controller) HasSynced() bool { return c.ready.Load() }

func (c *Controller) processNextItem(ctx context.Context) bool {
	return controller.Process(ctx, c.queue, "Service endpoints", c.sync)
}

// sync rebuilds one Service's snapshot from the caches.
func (c *Controller) sync(ctx context.Context, key cache.ObjectName) error {
	logger := klog.FromContext(ctx)
	nn := types.NamespacedName{Namespace: key.Namespace, Name: key.Name}
	svc, err := c.serviceLister(key.Namespace).Services(key.Namespace).Get(key.Name)
	switch {
	case apierrors.IsNotFound(err):
		// Deleted, or no longer matches the selector.
		c.store(ctx, nn, nil)
		return nil
	case err != nil:
		return err
	case !c.selector.Matches(labels.Set(svc.Labels)):
		// The informer's selector already filters; this guards a cache
		// that saw a label change as an update.
		c.store(ctx, nn, nil)
		return nil
	}
	snap := &Service{Key: nn, UID: svc.UID, Labels: svc.Labels, Annotations: svc.Annotations, Created: svc.CreationTimestamp.Time}
	port, ok := ServicePort(svc)
	if !ok {
		snap.Problem = fmt.Sprintf("Service %s has no TCP port", nn)
	} else {
		snap.Port = port.Name
		var all []*discoveryv1.EndpointSlice
		for _, inf := range c.slices {
			objs, err := inf.GetIndexer().ByIndex(serviceIndex, key.String())
			if err != nil {
				return err
			}
			for _, o := range objs {
				all = append(all, o.(*discoveryv1.EndpointSlice))
			}
		}
		for _, p := range svc.Spec.Ports {
			if p.Protocol != "" && p.Protocol != corev1.ProtocolTCP {
				continue
			}
			sp := Port{Name: p.Name, Number: p.Port}
			if p.Name == port.Name {
				snap.Endpoints = BuildEndpoints(all, port)
				sp.Endpoints = snap.Endpoints
			} else {
				sp.Endpoints = BuildEndpoints(all, p)
			}
			snap.Ports = append(snap.Ports, sp)
		}
	}
	if logger.V(5).Enabled() {
		ready, notReady, terminating := snap.Counts()
		logger.V(5).Info("Rebuilt Service endpoints", "service", nn, "ready", ready, "notReady", notReady, "terminating", terminating)
	}
	c.store(ctx, nn, snap)
	return nil
}

// store swaps in a Service's new snapshot (nil to drop it) and tells the
// handler, unless nothing changed.
func (c *Controller) store(ctx context.Context, key types.NamespacedName, snap *Service) {
	if !c.snapshots.Store(key, snap) {
		return
	}
	klog.FromContext(ctx).V(4).Info("Service endpoints changed", "service", key, "present", snap != nil)
	c.handler.ServiceChanged(key, snap)
}

// Service returns the current snapshot of a Service, or nil.
func (c *Controller) Service(key types.NamespacedName) *Service { return c.snapshots.Get(key) }

// Len is the number of Services with a snapshot.
func (c *Controller) Len() int { return c.snapshots.Len() }

// HandlerFunc is a function that handles snapshots.
type HandlerFunc func(key types.NamespacedName, svc *Service)

func (f HandlerFunc) ServiceChanged(key types.NamespacedName, svc *Service) { f(key, svc) }

var _ Handler = HandlerFunc(nil)
