// Package controller holds the run loop the router's informer-driven
// controllers (discovery, gateway) share, after sample-controller's: start
// the informer factories, wait for their caches, run workers until the
// context ends, and return only once every worker and informer has stopped.
package controller

import (
	"context"
	"fmt"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/tools/cache"
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
