// Package controller holds the run loop the router's informer-driven
// controllers (discovery, inferencepool, gateway) share, after
// sample-controller's: start the informer factories, wait for their caches,
// run workers until the context ends, and return only once every worker and
// informer has stopped; and the snapshots the keyed ones keep.
package controller

import (
	"context"
	"fmt"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
)

// Factory is an informer factory: client-go's and the generated Gateway API
// one alike.
type Factory interface {
	Start(stopCh <-chan struct{})
	// Shutdown waits for the informers Start started to stop.
	Shutdown()
}

// Informers are a controller's informer factories and what tells that their
// caches have synced.
type Informers struct {
	Factories []Factory
	Synced    []cache.InformerSynced
}

// Add records a factory and the HasSynced of the informers it holds.
func (i *Informers) Add(f Factory, synced ...cache.InformerSynced) {
	i.Factories = append(i.Factories, f)
	i.Synced = append(i.Synced, synced...)
}

// Start starts the factories and waits for every cache to sync. It returns
// a function that stops them, which must be called once ctx has ended
// (Shutdown waits for informers whose stop channel is ctx's), also when
// the caches did not sync.
func (i *Informers) Start(ctx context.Context, what string) (stop func(), err error) {
	for _, f := range i.Factories {
		f.Start(ctx.Done())
	}
	stop = func() {
		for _, f := range i.Factories {
			f.Shutdown()
		}
	}
	if !cache.WaitForCacheSync(ctx.Done(), i.Synced...) {
		return stop, fmt.Errorf("%s caches did not sync: %w", what, context.Cause(ctx))
	}
	return stop, nil
}

// Queue is the part of a workqueue RunWorkers stops.
type Queue interface{ ShutDown() }

// RunWorkers runs n workers until ctx ends, then shuts the queue down and
// waits for them. A worker calls process until it returns false (the queue
// is shutting down); one that returns early is started again a second
// later.
func RunWorkers(ctx context.Context, queue Queue, n int, process func(context.Context) bool) {
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			wait.UntilWithContext(ctx, func(ctx context.Context) {
				for process(ctx) {
				}
			}, time.Second)
		})
	}
	<-ctx.Done()
	queue.ShutDown()
	wg.Wait()
}

// Process takes the next key off queue and syncs it: a success forgets the
// key's backoff, a failure is logged and the key requeued with backoff. It
// returns false once the queue is shutting down. what names what sync
// rebuilds, for the log.
func Process[K comparable](ctx context.Context, queue workqueue.TypedRateLimitingInterface[K], what string, sync func(context.Context, K) error) bool {
	key, shutdown := queue.Get()
	if shutdown {
		return false
	}
	defer queue.Done(key)
	if err := sync(ctx, key); err != nil {
		utilruntime.HandleErrorWithContext(ctx, err, "Syncing failed; retrying", "what", what, "key", key)
		queue.AddRateLimited(key)
		return true
	}
	queue.Forget(key)
	return true
}

// LenQueue is a queue that says how many keys wait in it.
type LenQueue interface {
	Queue
	Len() int
}

// RunKeyed runs a controller whose workers rebuild one snapshot per key:
// it starts the informers and waits for their caches, processes every key
// the initial lists enqueued, calls synced (so that a controller that
// reports synced has a snapshot of every object it saw at start), and then
// runs workers until ctx ends.
func RunKeyed(ctx context.Context, informers *Informers, what string, queue LenQueue, workers int, process func(context.Context) bool, synced func()) error {
	defer utilruntime.HandleCrashWithContext(ctx)
	defer queue.ShutDown()
	logger := klog.FromContext(ctx)
	logger.Info("Waiting for caches", "what", what)
	stop, err := informers.Start(ctx, what)
	defer stop()
	if err != nil {
		return err
	}
	for queue.Len() > 0 {
		if !process(ctx) {
			return nil
		}
	}
	synced()
	RunWorkers(ctx, queue, workers, process)
	return nil
}

// Snapshots holds the latest immutable snapshot of each object a keyed
// controller rebuilds. Its methods are safe for concurrent use.
type Snapshots[S any] struct {
	// equal reports whether two snapshots would route the same way.
	equal func(a, b *S) bool
	mu    sync.RWMutex
	m     map[types.NamespacedName]*S
}

// NewSnapshots returns an empty Snapshots that compares with equal.
func NewSnapshots[S any](equal func(a, b *S) bool) *Snapshots[S] {
	return &Snapshots[S]{equal: equal, m: map[types.NamespacedName]*S{}}
}

// Store swaps in key's new snapshot, or drops it when snap is nil, and
// reports whether that changed anything: a caller tells its handler only
// then.
func (s *Snapshots[S]) Store(key types.NamespacedName, snap *S) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	old, had := s.m[key]
	switch {
	case snap == nil && !had, snap != nil && had && s.equal(old, snap):
		return false
	case snap == nil:
		delete(s.m, key)
	default:
		s.m[key] = snap
	}
	return true
}

// Get returns key's snapshot, or nil.
func (s *Snapshots[S]) Get(key types.NamespacedName) *S {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.m[key]
}

// Len is the number of snapshots.
func (s *Snapshots[S]) Len() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.m)
}

// Range calls f with every snapshot, under the read lock: f must not call
// the Snapshots' other methods.
func (s *Snapshots[S]) Range(f func(key types.NamespacedName, snap *S)) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for k, v := range s.m {
		f(k, v)
	}
}

// ObjectHandler enqueues an object (the new one on an update) whenever it is
// added, changed or deleted. enqueue never sees a tombstone: a deleted
// object's last known state is unwrapped from it.
func ObjectHandler(enqueue func(obj any)) cache.ResourceEventHandlerFuncs {
	return cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueue,
		UpdateFunc: func(_, new any) { enqueue(new) },
		DeleteFunc: func(obj any) { enqueue(untomb(obj)) },
	}
}

func untomb(obj any) any {
	if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		return tomb.Obj
	}
	return obj
}

// MemberHandler is the handler of objects that are part of another's
// snapshot (a Service's EndpointSlices, a pool's pods): an update enqueues
// the old object and the new one, since a change of labels may move it from
// one owner to another, unless it is a resync that changed nothing. enqueue
// never sees a tombstone.
func MemberHandler(enqueue func(obj any)) cache.ResourceEventHandlerFuncs {
	return cache.ResourceEventHandlerFuncs{
		AddFunc: enqueue,
		UpdateFunc: func(old, new any) {
			o, ok1 := old.(metav1.Object)
			n, ok2 := new.(metav1.Object)
			if ok1 && ok2 && o.GetResourceVersion() == n.GetResourceVersion() {
				return
			}
			enqueue(old)
			enqueue(new)
		},
		DeleteFunc: func(obj any) { enqueue(untomb(obj)) },
	}
}
