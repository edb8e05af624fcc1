// Package hold keeps requests for a model that has no Ready endpoint
// waiting, in arrival order, until one can take them: a model scaled to
// zero gets a replica back on demand instead of failing its first requests.
//
// Only the request at the head of a model's queue tries to go on, so the
// order holds and a fresh pod is offered requests one at a time, as its
// per-endpoint limit allows. Whatever may let the head go on — a new routing
// table, a request of the model finishing — kicks the queue; nothing polls.
package hold

import (
	"container/list"
	"context"
	"errors"
	"sync"
	"sync/atomic"
)

// ErrFull is returned when a model's queue is at its length limit.
var ErrFull = errors.New("the queue of held requests is full")

// Queues are the held requests of every model.
type Queues struct {
	max int

	// held counts the requests held over every model, so that a request
	// for a model with endpoints checks one atomic and no lock.
	held atomic.Int64

	mu     sync.Mutex
	models map[string]*list.List // of *waiter, oldest first
}

type waiter struct {
	// wake has room for one kick, so that one sent while the waiter is
	// between a try and its wait is not lost.
	wake chan struct{}
}

// New returns queues that hold at most max requests per model.
func New(max int) *Queues {
	return &Queues{max: max, models: map[string]*list.List{}}
}

// Holding reports whether any request is held, for any model.
func (q *Queues) Holding() bool { return q.held.Load() > 0 }

// Len is how many requests are held for model.
func (q *Queues) Len(model string) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	if l := q.models[model]; l != nil {
		return l.Len()
	}
	return 0
}

// Wait holds a request for model until try succeeds while it is at the
// head of the queue, or ctx ends (its error is returned). try is called
// with the queue locked and must not block; it is called at once when no
// request is held for model, so a request that need not wait does not. Wait
// returns ErrFull, without holding, when max requests are held already.
func (q *Queues) Wait(ctx context.Context, model string, try func() bool) error {
	q.mu.Lock()
	l := q.models[model]
	if l == nil || l.Len() == 0 {
		if try() {
			q.mu.Unlock()
			return nil
		}
	}
	if l != nil && l.Len() >= q.max {
		q.mu.Unlock()
		return ErrFull
	}
	if l == nil {
		l = list.New()
		q.models[model] = l
	}
	w := &waiter{wake: make(chan struct{}, 1)}
	el := l.PushBack(w)
	q.held.Add(1)
	q.mu.Unlock()

	for {
		select {
		case <-w.wake:
			q.mu.Lock()
			if l.Front() == el && try() {
				q.remove(model, l, el)
				q.mu.Unlock()
				return nil
			}
			q.mu.Unlock()
		case <-ctx.Done():
			q.mu.Lock()
			q.remove(model, l, el)
			q.mu.Unlock()
			return context.Cause(ctx)
		}
	}
}

// remove takes el out of model's queue and kicks the new head, which may
// be able to go on too.
func (q *Queues) remove(model string, l *list.List, el *list.Element) {
	wasHead := l.Front() == el
	l.Remove(el)
	q.held.Add(-1)
	if l.Len() == 0 {
		delete(q.models, model)
		return
	}
	if wasHead {
		kick(l)
	}
}

// Kick lets the head of model's queue try again. Call it whenever a held
// request of model might now go on.
func (q *Queues) Kick(model string) {
	if !q.Holding() {
		return
	}
	q.mu.Lock()
	if l := q.models[model]; l != nil {
		kick(l)
	}
	q.mu.Unlock()
}

func kick(l *list.List) {
	select {
	case l.Front().Value.(*waiter).wake <- struct{}{}:
	default:
	}
}
