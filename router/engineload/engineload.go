// Package load feeds what the model servers report about their own load
// (queue depth, KV-cache usage) into the router's hosts, for the load-aware
// balancer. The scraping itself is the metrics adapter's
// (metricsadapter/scrape): Targets keeps its target set to the model pods,
// and Feeder copies the latest fresh values into each Ready endpoint's
// health.Host, where a pick reads them without locks or allocations.
package load

import (
	"context"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/metricsadapter/scrape"
	"github.com/capstan-dev/capstan/router/health"
	"github.com/capstan-dev/capstan/router/route"
)

// Source gives a pod's latest fresh load, or false when there is none.
type Source interface {
	Load(pod types.NamespacedName) (health.Load, bool)
}

// ScraperSource reads loads from the metrics adapter's scraper.
type ScraperSource struct{ Scraper *scrape.Scraper }

var _ Source = ScraperSource{}

// Load converts the scraper's engine-neutral load. A value the engine does
// not report (TGI has no KV-cache usage) counts as 0.
func (s ScraperSource) Load(pod types.NamespacedName) (health.Load, bool) {
	l, ok := s.Scraper.Load(pod)
	if !ok {
		return health.Load{}, false
	}
	var out health.Load
	if l.HasRequestsWaiting {
		out.Waiting = l.RequestsWaiting
	}
	if l.HasRequestsRunning {
		out.Running = l.RequestsRunning
	}
	if l.HasKVCacheUsage {
		out.KVCacheUsage = l.KVCacheUsage
	}
	return out, true
}

// Feeder copies loads from a Source into the hosts of the routing table.
type Feeder struct {
	Source Source
	Table  func() *route.Table
	// Interval between passes; a fraction of the scrape interval keeps the
	// lag small.
	Interval time.Duration
}

// Run feeds every Interval until ctx ends.
func (f *Feeder) Run(ctx context.Context) {
	wait.UntilWithContext(ctx, func(context.Context) { f.Sync() }, f.Interval)
}

// Sync makes one pass: every Ready endpoint's host gets its pod's latest
// load, or none when the pod has no fresh sample.
func (f *Feeder) Sync() {
	for _, m := range f.Table().Models() {
		for _, e := range m.Pool.Endpoints() {
			ns, name, ok := strings.Cut(e.Pod, "/")
			if !ok {
				e.Host.SetLoad(nil)
				continue
			}
			l, ok := f.Source.Load(types.NamespacedName{Namespace: ns, Name: name})
			switch cur := e.Host.Load(); {
			case !ok:
				if cur != nil {
					e.Host.SetLoad(nil)
				}
			case cur == nil || *cur != l:
				e.Host.SetLoad(&l)
			}
		}
	}
}

// TargetSetter is the scraper's write side.
type TargetSetter interface {
	SetTargets([]scrape.Target)
}

// Targets keeps a scraper's targets equal to the scrapable model pods
// (Ready, with an IP, not being deleted) in some namespaces. Pod events only
// enqueue; one worker rebuilds the whole set from the lister.
type Targets struct {
	setter    TargetSetter
	factories []informers.SharedInformerFactory
	listers   []corelisters.PodLister
	synced    []cache.InformerSynced
	queue     workqueue.TypedRateLimitingInterface[string]
}

// resyncKey is the only queue item: every change rebuilds the whole set,
// which is cheap next to a scrape of every pod.
const resyncKey = "targets"

// NewTargets watches model pods in namespaces (all when empty).
func NewTargets(client kubernetes.Interface, setter TargetSetter, namespaces []string) (*Targets, error) {
	if len(namespaces) == 0 {
		namespaces = []string{metav1.NamespaceAll}
	}
	t := &Targets{
		setter: setter,
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[string](),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "capstan-router-scrape-targets"}),
	}
	enqueue := func(any) { t.queue.Add(resyncKey) }
	for _, ns := range namespaces {
		f := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithNamespace(ns),
			informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = modelserver.ModelLabel }))
		pods := f.Core().V1().Pods()
		if _, err := pods.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc: enqueue, UpdateFunc: func(_, o any) { enqueue(o) }, DeleteFunc: enqueue,
		}); err != nil {
			return nil, err
		}
		t.factories = append(t.factories, f)
		t.listers = append(t.listers, pods.Lister())
		t.synced = append(t.synced, pods.Informer().HasSynced)
	}
	return t, nil
}

// Run follows pod changes until ctx ends.
func (t *Targets) Run(ctx context.Context) error {
	defer utilruntime.HandleCrashWithContext(ctx)
	defer t.queue.ShutDown()
	for _, f := range t.factories {
		f.Start(ctx.Done())
	}
	defer func() {
		for _, f := range t.factories {
			f.Shutdown()
		}
	}()
	if !cache.WaitForCacheSync(ctx.Done(), t.synced...) {
		return fmt.Errorf("pod cache did not sync: %w", context.Cause(ctx))
	}
	t.queue.Add(resyncKey)
	go wait.UntilWithContext(ctx, func(ctx context.Context) {
		for t.processNext(ctx) {
		}
	}, time.Second)
	<-ctx.Done()
	return nil
}

func (t *Targets) processNext(ctx context.Context) bool {
	key, shutdown := t.queue.Get()
	if shutdown {
		return false
	}
	defer t.queue.Done(key)
	if err := t.sync(ctx); err != nil {
		utilruntime.HandleErrorWithContext(ctx, err, "Updating scrape targets failed; retrying")
		t.queue.AddRateLimited(key)
		return true
	}
	t.queue.Forget(key)
	return true
}

func (t *Targets) sync(ctx context.Context) error {
	var targets []scrape.Target
	for _, l := range t.listers {
		pods, err := l.List(labels.Everything())
		if err != nil {
			return err
		}
		targets = appendTargets(ctx, targets, pods)
	}
	t.setter.SetTargets(targets)
	return nil
}

func appendTargets(ctx context.Context, targets []scrape.Target, pods []*corev1.Pod) []scrape.Target {
	for _, p := range pods {
		if !modelserver.Scrapable(p) {
			continue
		}
		target, err := scrape.TargetForPod(p)
		if err != nil {
			// A bad engine label or metrics annotation: this pod's load
			// stays unknown, which the balancer treats as idle.
			klog.FromContext(ctx).V(2).Info("Not scraping pod", "pod", klog.KObj(p), "err", err)
			continue
		}
		targets = append(targets, target)
	}
	return targets
}
