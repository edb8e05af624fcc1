package fleet

import (
	"context"
	"sync"
	"time"
)

// engine simulates one model server's scheduler: at most maxRunning requests
// run at once and the rest wait in FIFO order, the way vLLM's running and
// waiting queues behave. Its counts feed the metric gauges.
type engine struct {
	mu         sync.Mutex
	maxRunning int
	running    int
	queue      []chan struct{} // waiters, oldest first; closed when admitted
}

func newEngine(maxRunning int) *engine {
	return &engine{maxRunning: maxRunning}
}

// admit blocks until the request may run or ctx ends. On success the caller
// must call release.
func (e *engine) admit(ctx context.Context) error {
	e.mu.Lock()
	if e.running < e.maxRunning && len(e.queue) == 0 {
		e.running++
		e.mu.Unlock()
		return nil
	}
	ch := make(chan struct{})
	e.queue = append(e.queue, ch)
	e.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		e.mu.Lock()
		defer e.mu.Unlock()
		for i, w := range e.queue {
			if w == ch {
				e.queue = append(e.queue[:i], e.queue[i+1:]...)
				return ctx.Err()
			}
		}
		// Admitted at the same moment the client gave up: hand the slot on.
		e.releaseLocked()
		return ctx.Err()
	}
}

func (e *engine) release() {
	e.mu.Lock()
	e.releaseLocked()
	e.mu.Unlock()
}

func (e *engine) releaseLocked() {
	if len(e.queue) > 0 && e.running <= e.maxRunning {
		next := e.queue[0]
		e.queue = e.queue[1:]
		close(next) // the slot passes straight to the oldest waiter
		return
	}
	e.running--
}

func (e *engine) Running() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.running
}

func (e *engine) Waiting() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.queue)
}

func (e *engine) MaxRunning() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.maxRunning
}

// setMaxRunning resizes the batch, admitting waiters if it grew.
func (e *engine) setMaxRunning(n int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.maxRunning = n
	for e.running < e.maxRunning && len(e.queue) > 0 {
		close(e.queue[0])
		e.queue = e.queue[1:]
		e.running++
	}
}

// KVCacheUsage is proportional to the running batch: a full batch is a full
// cache.
func (e *engine) KVCacheUsage() float64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.maxRunning == 0 {
		return 0
	}
	return float64(e.running) / float64(e.maxRunning)
}

// sleep waits d or until ctx ends, and reports whether the full time passed.
func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
