package controller

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"
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

// Store reports a change only when a snapshot appears, goes or differs, so
// that handlers are not told of resyncs.
func TestSnapshotsStore(t *testing.T) {
	type snap struct{ v int }
	s := NewSnapshots(func(a, b *snap) bool { return a.v == b.v })
	k := types.NamespacedName{Namespace: "ns", Name: "a"}
	steps := []struct {
		name string
		snap *snap
		want bool
	}{
		{"dropping what is not there", nil, false},
		{"a first snapshot", &snap{1}, true},
		{"an equal one", &snap{1}, false},
		{"a different one", &snap{2}, true},
		{"dropping it", nil, true},
		{"dropping it again", nil, false},
	}
	for _, st := range steps {
		if got := s.Store(k, st.snap); got != st.want {
			t.Errorf("%s: Store = %v, want %v", st.name, got, st.want)
		}
		if got := s.Get(k); (got == nil) != (st.snap == nil) || (got != nil && got.v != st.snap.v) {
			t.Errorf("%s: Get = %v, want %v", st.name, got, st.snap)
		}
	}
	if s.Len() != 0 {
		t.Errorf("Len = %d after the only snapshot went", s.Len())
	}
}

// MemberHandler enqueues the old and the new object of a real change, skips
// a resync, and unwraps tombstones.
func TestMemberHandler(t *testing.T) {
	var got []string
	h := MemberHandler(func(obj any) {
		got = append(got, obj.(*metav1.ObjectMeta).Name+"@"+obj.(*metav1.ObjectMeta).ResourceVersion)
	})
	v1, v2 := &metav1.ObjectMeta{Name: "a", ResourceVersion: "1"}, &metav1.ObjectMeta{Name: "b", ResourceVersion: "2"}
	h.OnUpdate(v1, v1)
	h.OnUpdate(v1, v2)
	h.OnDelete(cache.DeletedFinalStateUnknown{Key: "ns/b", Obj: v2})
	if diff := cmp.Diff([]string{"a@1", "b@2", "b@2"}, got); diff != "" {
		t.Errorf("enqueued (-want +got):\n%s", diff)
	}
}
