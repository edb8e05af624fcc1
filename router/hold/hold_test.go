package hold

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
)

// A gate lets n requests go on, one per call of try.
type gate struct {
	mu   sync.Mutex
	open int
}

func (g *gate) try() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.open == 0 {
		return false
	}
	g.open--
	return true
}

func (g *gate) let(n int) {
	g.mu.Lock()
	g.open += n
	g.mu.Unlock()
}

func TestHeldRequestsGoOnInArrivalOrder(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := New(10)
		var g gate
		var mu sync.Mutex
		var order []int
		for i := range 4 {
			go func() {
				if err := q.Wait(t.Context(), "m", g.try); err != nil {
					t.Errorf("request %d: %v", i, err)
					return
				}
				mu.Lock()
				order = append(order, i)
				mu.Unlock()
			}()
			synctest.Wait() // each is queued before the next arrives
		}
		if n := q.Len("m"); n != 4 || !q.Holding() {
			t.Fatalf("%d held (holding %v), want 4", n, q.Holding())
		}
		// Room for two: the two oldest go on, the others stay.
		g.let(2)
		q.Kick("m")
		synctest.Wait()
		if !slices.Equal(order, []int{0, 1}) || q.Len("m") != 2 {
			t.Fatalf("after room for two: went on %v, %d held; want [0 1] and 2", order, q.Len("m"))
		}
		// A kick without room lets nobody go.
		q.Kick("m")
		synctest.Wait()
		if len(order) != 2 {
			t.Fatalf("a kick without room let %v go on", order)
		}
		g.let(2)
		q.Kick("m")
		synctest.Wait()
		if !slices.Equal(order, []int{0, 1, 2, 3}) || q.Len("m") != 0 || q.Holding() {
			t.Fatalf("went on %v, %d held; want all four in order", order, q.Len("m"))
		}
	})
}

func TestNoWaitWhenNothingIsHeld(t *testing.T) {
	q := New(1)
	tries := 0
	if err := q.Wait(context.Background(), "m", func() bool { tries++; return true }); err != nil || tries != 1 {
		t.Fatalf("Wait = %v after %d tries, want nil after 1", err, tries)
	}
}

func TestFullQueueRefuses(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := New(2)
		never := func() bool { return false }
		ctx, cancel := context.WithCancel(t.Context())
		for range 2 {
			go q.Wait(ctx, "m", never)
		}
		synctest.Wait()
		if err := q.Wait(ctx, "m", never); !errors.Is(err, ErrFull) {
			t.Errorf("third request: %v, want ErrFull", err)
		}
		// Another model has a queue of its own.
		go q.Wait(ctx, "other", never)
		synctest.Wait()
		if q.Len("other") != 1 {
			t.Errorf("other model: %d held, want 1", q.Len("other"))
		}
		cancel()
		synctest.Wait()
	})
}

// A request whose client leaves is out of the queue at once, and the next
// one moves up to the head.
func TestLeavingRequestLeavesTheQueue(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := New(10)
		var g gate
		first, leave := context.WithCancel(t.Context())
		errs := make(chan error, 2)
		go func() { errs <- q.Wait(first, "m", g.try) }()
		synctest.Wait()
		go func() { errs <- q.Wait(t.Context(), "m", g.try) }()
		synctest.Wait()
		g.let(1) // room, but no kick: only the head's leaving moves the queue
		leave()
		if err := <-errs; !errors.Is(err, context.Canceled) {
			t.Fatalf("the leaving request: %v, want context.Canceled", err)
		}
		if err := <-errs; err != nil {
			t.Fatalf("the request behind it: %v", err)
		}
		if q.Len("m") != 0 || q.Holding() {
			t.Errorf("%d still held", q.Len("m"))
		}
	})
}
