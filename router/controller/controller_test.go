package controller

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/util/workqueue"
)

// RunWorkers returns only after ctx ended, the queue was shut down and every
// worker has returned.
func TestRunWorkersWaitsForEveryWorker(t *testing.T) {
	queue := workqueue.NewTyped[string]()
	ctx, cancel := context.WithCancel(context.Background())
	var running, done atomic.Int32
	process := func(context.Context) bool {
		running.Add(1)
		defer done.Add(1)
		_, shutdown := queue.Get() // blocks until the queue shuts down
		return !shutdown
	}
	returned := make(chan struct{})
	go func() {
		RunWorkers(ctx, queue, 3, process)
		close(returned)
	}()
	deadline := time.Now().Add(5 * time.Second)
	for running.Load() < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("%d of 3 workers started", running.Load())
		}
		time.Sleep(time.Millisecond) // polling for the workers to start, bounded above
	}
	select {
	case <-returned:
		t.Fatal("RunWorkers returned before ctx ended")
	default:
	}
	cancel()
	<-returned
	if !queue.ShuttingDown() {
		t.Error("the queue was not shut down")
	}
	if done.Load() != running.Load() {
		t.Errorf("RunWorkers returned with %d of %d workers still running", running.Load()-done.Load(), running.Load())
	}
}

func TestInformersStart(t *testing.T) {
	client := fake.NewClientset()
	var i Informers
	f := informers.NewSharedInformerFactory(client, 0)
	i.Add(f, f.Core().V1().Services().Informer().HasSynced)
	ctx, cancel := context.WithCancel(context.Background())
	stop, err := i.Start(ctx, "Service")
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	stop() // returns once the informers have stopped

	// Caches that cannot sync because ctx ended say which.
	g := informers.NewSharedInformerFactory(client, 0)
	never := Informers{}
	never.Add(g, func() bool { return false })
	ctx, cancel = context.WithCancel(context.Background())
	cancel()
	stop, err = never.Start(ctx, "Gateway API")
	stop()
	if err == nil || !strings.Contains(err.Error(), "Gateway API caches did not sync") {
		t.Errorf("Start with a cancelled context: %v", err)
	}
}
