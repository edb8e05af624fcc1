// Package gateway makes capstan-router a Gateway API implementation. It
// watches GatewayClasses whose controllerName is the router's, their
// Gateways, HTTPRoutes, ReferenceGrants, TLS Secrets and Namespaces, and
// the InferencePools routes may send traffic to;
// translates them into a route.HTTPTable that every router replica serves;
// and, on the replica that holds a leader-election Lease, writes the status
// of each object (conditions with reasons a person can act on), only when
// it changes.
//
// The translation is one pure function of the cached objects (translate),
// rerun in full on any change: a workqueue with a single key coalesces
// bursts of events, and endpoint changes never get here (they swap a
// route.Backend's pool instead).
package gateway

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
	inferencev1 "sigs.k8s.io/gateway-api-inference-extension/api/v1"
	inferenceclient "sigs.k8s.io/gateway-api-inference-extension/client-go/clientset/versioned"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"
	gatewayinformers "sigs.k8s.io/gateway-api/pkg/client/informers/externalversions"

	"github.com/capstan-dev/capstan/router/controller"
	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/leader"
	"github.com/capstan-dev/capstan/router/route"
)

// DefaultControllerName is the controllerName of the GatewayClasses the
// router serves unless told otherwise.
const DefaultControllerName = "capstan.dev/gateway-controller"

// Options configures a Controller.
type Options struct {
	// ControllerName selects the GatewayClasses to serve.
	ControllerName string
	// Namespaces limits Gateways, HTTPRoutes, ReferenceGrants and Secrets
	// to these namespaces; empty means all.
	Namespaces []string
	// SecretNamespaces, when set, are the only namespaces whose TLS Secrets
	// the router watches (it then needs RBAC for Secrets only there); a
	// listener whose certificate is elsewhere is not served. Empty means
	// the same namespaces as Namespaces.
	SecretNamespaces []string
	// Addresses says where Gateways are served.
	Addresses Addresses
	// Leader elects the one replica that writes status.
	Leader *leader.Elector
	// BindRetry is how soon a listen address that could not be bound is
	// tried again.
	BindRetry time.Duration
	// InferencePools, when the cluster serves the InferencePool API, lets
	// routes send traffic to pools; nil when it does not.
	InferencePools *InferencePools
}

// InferencePools are what the controller needs of the Gateway API
// Inference Extension's InferencePools.
type InferencePools struct {
	// Informers are the pool informers of the watched namespaces
	// (inferencepool.Controller.Informers), which their owner runs.
	Informers []cache.SharedIndexInformer
	// Client writes the pools' status.
	Client inferenceclient.Interface
}

// Services gives Service snapshots and Backends (route.Builder).
type Services interface {
	Service(types.NamespacedName) *discovery.Service
	SyncBackends([]route.BackendKey) map[route.BackendKey]*route.Backend
}

// Listeners opens and closes listen addresses, each mapped to whether it
// terminates TLS, and reports the ones it could not bind.
type Listeners interface {
	Reconcile(ctx context.Context, addresses map[string]bool) map[string]error
}

// syncKey is the only key in the queue: every change reruns the whole
// translation.
const syncKey = "sync"

// Controller serves the Gateway API resources of the router's
// GatewayClasses.
type Controller struct {
	opts      Options
	kube      kubernetes.Interface
	gateways  gatewayclient.Interface
	services  Services
	listeners Listeners
	// servicesSynced reports whether discovery has a snapshot of every
	// Service, so that the first translation does not call present
	// backends missing.
	servicesSynced func() bool

	informers   controller.Informers
	classInf    cache.SharedIndexInformer
	gatewayInfs []cache.SharedIndexInformer
	routeInfs   []cache.SharedIndexInformer
	grantInfs   []cache.SharedIndexInformer
	secretInfs  []cache.SharedIndexInformer
	// poolInfs are Options.InferencePools' informers, nil without the API.
	poolInfs []cache.SharedIndexInformer
	nsInf    cache.SharedIndexInformer
	// publishInf watches the Service whose address Gateways share, when
	// there is one.
	publishInf cache.SharedIndexInformer

	queue workqueue.TypedRateLimitingInterface[string]
	table atomic.Pointer[route.HTTPTable]
	ready atomic.Bool

	mu sync.Mutex
	// ports remembers each Service's port numbers, to resync only when a
	// Service appears, goes, or changes its ports.
	ports map[types.NamespacedName][]int32

	metrics *metrics
}

var _ discovery.Handler = (*Controller)(nil)

// New returns a Controller. Run starts it.
func New(kube kubernetes.Interface, gw gatewayclient.Interface, services Services, listeners Listeners, servicesSynced func() bool,
	reg prometheus.Registerer, opts Options) *Controller {
	c := &Controller{
		opts: opts, kube: kube, gateways: gw, services: services, listeners: listeners, servicesSynced: servicesSynced,
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedMaxOfRateLimiter(
				workqueue.NewTypedItemExponentialFailureRateLimiter[string](10*time.Millisecond, 30*time.Second),
				&workqueue.TypedBucketRateLimiter[string]{Limiter: rate.NewLimiter(rate.Limit(50), 100)},
			),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "capstan-router-gateway"}),
		ports:   map[types.NamespacedName][]int32{},
		metrics: newMetrics(reg),
	}
	namespaces := opts.Namespaces
	if len(namespaces) == 0 {
		namespaces = []string{metav1.NamespaceAll}
	}
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { c.enqueue() },
		UpdateFunc: func(any, any) { c.enqueue() },
		DeleteFunc: func(any) { c.enqueue() },
	}
	add := func(inf cache.SharedIndexInformer) cache.SharedIndexInformer {
		// AddEventHandler fails only once an informer has started.
		_, err := inf.AddEventHandler(handler)
		utilruntime.Must(err)
		c.informers.Synced = append(c.informers.Synced, inf.HasSynced)
		return inf
	}
	cluster := gatewayinformers.NewSharedInformerFactory(gw, 0)
	c.classInf = add(cluster.Gateway().V1().GatewayClasses().Informer())
	coreCluster := informers.NewSharedInformerFactory(kube, 0)
	c.nsInf = add(coreCluster.Core().V1().Namespaces().Informer())
	c.informers.Add(cluster)
	c.informers.Add(coreCluster)
	if ps := opts.Addresses.PublishService; ps.Name != "" {
		pf := informers.NewSharedInformerFactoryWithOptions(kube, 0, informers.WithNamespace(ps.Namespace),
			informers.WithTweakListOptions(func(o *metav1.ListOptions) {
				o.FieldSelector = fields.OneTermEqualSelector("metadata.name", ps.Name).String()
			}))
		c.publishInf = add(pf.Core().V1().Services().Informer())
		c.informers.Add(pf)
	}
	for _, ns := range namespaces {
		f := gatewayinformers.NewSharedInformerFactoryWithOptions(gw, 0, gatewayinformers.WithNamespace(ns))
		c.gatewayInfs = append(c.gatewayInfs, add(f.Gateway().V1().Gateways().Informer()))
		c.routeInfs = append(c.routeInfs, add(f.Gateway().V1().HTTPRoutes().Informer()))
		c.grantInfs = append(c.grantInfs, add(f.Gateway().V1().ReferenceGrants().Informer()))
		c.informers.Add(f)
	}
	if ip := opts.InferencePools; ip != nil {
		for _, inf := range ip.Informers {
			c.poolInfs = append(c.poolInfs, add(inf))
		}
	}
	secretNamespaces := namespaces
	if len(opts.SecretNamespaces) > 0 {
		secretNamespaces = opts.SecretNamespaces
	}
	for _, ns := range secretNamespaces {
		// Only TLS Secrets, which is all a listener may refer to: the
		// router does not cache the cluster's other Secrets.
		sf := informers.NewSharedInformerFactoryWithOptions(kube, 0, informers.WithNamespace(ns),
			informers.WithTweakListOptions(func(o *metav1.ListOptions) {
				o.FieldSelector = fields.OneTermEqualSelector("type", string(corev1.SecretTypeTLS)).String()
			}))
		c.secretInfs = append(c.secretInfs, add(sf.Core().V1().Secrets().Informer()))
		c.informers.Add(sf)
	}
	// A new leader checks every status at once.
	c.opts.Leader.Subscribe(func(leading bool) {
		if leading {
			c.enqueue()
		}
	})
	return c
}

func (c *Controller) enqueue() { c.queue.Add(syncKey) }

// Table returns the routing table the Gateways are served from.
func (c *Controller) Table() *route.HTTPTable { return c.table.Load() }

// HasSynced reports whether the first table has been published.
func (c *Controller) HasSynced() bool { return c.ready.Load() }

// ServiceChanged implements discovery.Handler: a Service that appears,
// goes, or changes its ports changes which backendRefs resolve, so the
// translation reruns; endpoint changes alone do not concern it.
func (c *Controller) ServiceChanged(key types.NamespacedName, svc *discovery.Service) {
	var ports []int32
	if svc != nil {
		ports = []int32{} // present, even with no ports
		for _, p := range svc.Ports {
			ports = append(ports, p.Number)
		}
	}
	c.mu.Lock()
	old, had := c.ports[key]
	switch {
	case svc == nil:
		delete(c.ports, key)
	default:
		c.ports[key] = ports
	}
	c.mu.Unlock()
	if had != (svc != nil) || !slices.Equal(old, ports) {
		c.enqueue()
	}
}

// Run starts the informers, waits for them and for discovery, publishes the
// first table, and then follows changes until ctx ends, writing status
// while Options.Leader leads.
func (c *Controller) Run(ctx context.Context) error {
	defer utilruntime.HandleCrashWithContext(ctx)
	defer c.queue.ShutDown()
	logger := klog.FromContext(ctx)
	logger.Info("Waiting for Gateway API caches")
	stop, err := c.informers.Start(ctx, "Gateway API")
	defer stop()
	if err != nil {
		return err
	}
	if err := wait.PollUntilContextCancel(ctx, 50*time.Millisecond, true, func(context.Context) (bool, error) {
		return c.servicesSynced(), nil
	}); err != nil {
		return fmt.Errorf("waiting for Service discovery: %w", err)
	}
	// The first pass publishes the table before the router calls itself
	// ready (a failed status write is retried later; the table stands).
	c.queue.Add(syncKey)
	if !c.processNextItem(ctx) {
		return nil
	}
	c.ready.Store(true)
	logger.Info("Gateway API caches synced", "controllerName", c.opts.ControllerName)
	controller.RunWorkers(ctx, c.queue, 1, c.processNextItem)
	return nil
}

func (c *Controller) processNextItem(ctx context.Context) bool {
	return controller.Process(ctx, c.queue, "Gateway API resources", func(ctx context.Context, _ string) error { return c.sync(ctx) })
}

// sync translates the current objects, publishes the table, binds its
// addresses and, on the leader, writes every status that changed.
func (c *Controller) sync(ctx context.Context) error {
	start := time.Now()
	t := translate(c.inputs())
	c.table.Store(t.table)
	addresses := map[string]bool{}
	for _, p := range t.table.Ports() {
		addresses[p.Address] = p.TLS
	}
	bindErrs := c.listeners.Reconcile(ctx, addresses)
	if len(bindErrs) > 0 && c.opts.BindRetry > 0 {
		c.queue.AddAfter(syncKey, c.opts.BindRetry)
	}
	c.metrics.syncSeconds.Observe(time.Since(start).Seconds())
	if !c.opts.Leader.Leading() {
		return nil
	}
	return c.writeStatus(ctx, t, func(addr string) error { return bindErrs[addr] })
}

func (c *Controller) inputs() *inputs {
	watched := map[string]bool{}
	for _, ns := range c.opts.Namespaces {
		watched[ns] = true
	}
	addresses := c.opts.Addresses
	if ps := addresses.PublishService; ps.Name != "" {
		addresses.Shared = ""
		if svc, ok := get[*corev1.Service](ps.String(), c.publishInf); ok {
			addresses.Shared = ServiceAddress(svc)
		}
	}
	return &inputs{
		controllerName: c.opts.ControllerName,
		addresses:      addresses,
		classes:        list[*gatewayv1.GatewayClass](c.classInf),
		gateways:       list[*gatewayv1.Gateway](c.gatewayInfs...),
		routes:         list[*gatewayv1.HTTPRoute](c.routeInfs...),
		grants:         newGrants(list[*gatewayv1.ReferenceGrant](c.grantInfs...)),
		namespaceLabels: func(name string) (labels.Set, bool) {
			ns, ok := get[*corev1.Namespace](name, c.nsInf)
			if !ok {
				return nil, false
			}
			return ns.Labels, true
		},
		secret: func(namespace, name string) (*corev1.Secret, bool) {
			return get[*corev1.Secret](namespace+"/"+name, c.secretInfs...)
		},
		secretNamespaces: c.opts.SecretNamespaces,
		service:          c.services.Service,
		poolsServed:      c.opts.InferencePools != nil,
		pool: func(key types.NamespacedName) *inferencev1.InferencePool {
			p, _ := get[*inferencev1.InferencePool](key.String(), c.poolInfs...)
			return p
		},
		watched:  func(ns string) bool { return len(watched) == 0 || watched[ns] },
		backends: c.services.SyncBackends,
	}
}

// list returns every object in the informers' caches.
func list[T any](infs ...cache.SharedIndexInformer) []T {
	var out []T
	for _, inf := range infs {
		for _, o := range inf.GetStore().List() {
			if v, ok := o.(T); ok {
				out = append(out, v)
			}
		}
	}
	return out
}

// get returns the object with a cache key from the first informer that has
// it.
func get[T any](k string, infs ...cache.SharedIndexInformer) (T, bool) {
	var zero T
	for _, inf := range infs {
		o, ok, err := inf.GetStore().GetByKey(k)
		if err == nil && ok {
			v, ok := o.(T)
			return v, ok
		}
	}
	return zero, false
}

// writeStatus updates the status of every owned object whose status differs
// from what the translation says, and removes this controller's parent
// entries from routes that no longer attach to its Gateways.
func (c *Controller) writeStatus(ctx context.Context, t *translation, bindErr func(string) error) error {
	now := metav1.NewTime(time.Now().Truncate(time.Second))
	var errs []error
	api := c.gateways.GatewayV1()
	for _, cr := range t.classes {
		want := classStatus(cr, now)
		if staleCache(cr.class.Generation, cr.class.Status.Conditions) || equality.Semantic.DeepEqual(cr.class.Status, want) {
			continue
		}
		obj := cr.class.DeepCopy()
		obj.Status = want
		_, err := api.GatewayClasses().UpdateStatus(ctx, obj, metav1.UpdateOptions{FieldManager: fieldManager})
		errs = append(errs, c.recordWrite(ctx, "GatewayClass", obj.Name, err))
	}
	for _, gr := range t.gateways {
		want := gatewayStatus(gr, bindErr, now)
		if staleCache(gr.gw.Generation, gr.gw.Status.Conditions) || equality.Semantic.DeepEqual(gr.gw.Status, want) {
			continue
		}
		obj := gr.gw.DeepCopy()
		obj.Status = want
		_, err := api.Gateways(obj.Namespace).UpdateStatus(ctx, obj, metav1.UpdateOptions{FieldManager: fieldManager})
		errs = append(errs, c.recordWrite(ctx, "Gateway", obj.Namespace+"/"+obj.Name, err))
	}
	controller := gatewayv1.GatewayController(c.opts.ControllerName)
	for _, r := range list[*gatewayv1.HTTPRoute](c.routeInfs...) {
		rr, ok := t.routes[types.NamespacedName{Namespace: r.Namespace, Name: r.Name}]
		if !ok {
			if !slices.ContainsFunc(r.Status.Parents, func(p gatewayv1.RouteParentStatus) bool { return p.ControllerName == controller }) {
				continue
			}
			rr = routeResult{route: r}
		}
		want := routeStatus(rr, controller, now)
		var conds [][]metav1.Condition
		for _, p := range r.Status.Parents {
			if p.ControllerName == controller {
				conds = append(conds, p.Conditions)
			}
		}
		if staleCache(r.Generation, conds...) || equality.Semantic.DeepEqual(r.Status, want) {
			continue
		}
		obj := r.DeepCopy()
		obj.Status = want
		_, err := api.HTTPRoutes(obj.Namespace).UpdateStatus(ctx, obj, metav1.UpdateOptions{FieldManager: fieldManager})
		errs = append(errs, c.recordWrite(ctx, "HTTPRoute", obj.Namespace+"/"+obj.Name, err))
	}
	if ip := c.opts.InferencePools; ip != nil {
		errs = append(errs, c.writePoolStatus(ctx, t, ip.Client, now))
	}
	return errors.Join(errs...)
}

// writePoolStatus updates the status of every InferencePool a route of an
// owned Gateway sends traffic to, and removes this controller's parents
// from pools no such route refers to any more.
func (c *Controller) writePoolStatus(ctx context.Context, t *translation, client inferenceclient.Interface, now metav1.Time) error {
	controller := inferencev1.ControllerName(c.opts.ControllerName)
	var errs []error
	for _, p := range list[*inferencev1.InferencePool](c.poolInfs...) {
		pr, ok := t.pools[types.NamespacedName{Namespace: p.Namespace, Name: p.Name}]
		if !ok {
			if !poolHasOurs(p, controller) {
				continue
			}
			pr = &poolResult{pool: p}
		}
		want := poolStatus(pr, controller, now)
		var conds [][]metav1.Condition
		for _, ps := range p.Status.Parents {
			if ps.ControllerName == controller {
				conds = append(conds, ps.Conditions)
			}
		}
		if staleCache(p.Generation, conds...) || equality.Semantic.DeepEqual(p.Status, want) {
			continue
		}
		obj := p.DeepCopy()
		obj.Status = want
		_, err := client.InferenceV1().InferencePools(obj.Namespace).UpdateStatus(ctx, obj, metav1.UpdateOptions{FieldManager: fieldManager})
		errs = append(errs, c.recordWrite(ctx, "InferencePool", obj.Namespace+"/"+obj.Name, err))
	}
	return errors.Join(errs...)
}

// fieldManager names the router's status writes.
const fieldManager = "capstan-router"

// recordWrite counts and logs one status write. A write for an object that
// has gone meanwhile is not an error; a conflict is, so the sync is retried
// with the newer object.
func (c *Controller) recordWrite(ctx context.Context, kind, name string, err error) error {
	switch {
	case err == nil:
		c.metrics.statusUpdates.WithLabelValues(kind, "updated").Inc()
		klog.FromContext(ctx).V(2).Info("Updated status", "kind", kind, "object", name)
		return nil
	case apierrors.IsNotFound(err):
		return nil
	}
	c.metrics.statusUpdates.WithLabelValues(kind, "error").Inc()
	return fmt.Errorf("updating the status of %s %s: %w", kind, name, err)
}

// metrics are the controller's Prometheus metrics.
type metrics struct {
	statusUpdates *prometheus.CounterVec
	syncSeconds   prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		statusUpdates: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "capstan_router", Subsystem: "gateway", Name: "status_updates_total",
			Help: "Status writes to Gateway API objects by kind and result (updated, error); only the leader writes, and only what changed.",
		}, []string{"kind", "result"}),
		syncSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "capstan_router", Subsystem: "gateway", Name: "sync_duration_seconds",
			Help:    "Time to translate the Gateway API objects into a routing table and bind its addresses.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
		}),
	}
	if reg != nil {
		reg.MustRegister(m.statusUpdates, m.syncSeconds)
	}
	return m
}
