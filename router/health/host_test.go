package health

import (
	"sync"
	"testing"
	"time"
)

func TestFailEjectsWithGrowingBackoff(t *testing.T) {
	h := NewHost("198.18.0.1:8000", &EjectionPolicy{Base: 100 * time.Millisecond, Max: 350 * time.Millisecond})
	if h.Ejected() {
		t.Fatal("a new host is ejected")
	}
	want := []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 350 * time.Millisecond, 350 * time.Millisecond}
	for i, w := range want {
		if got := h.Fail(); got != w {
			t.Errorf("failure %d: ejected for %s, want %s", i+1, got, w)
		}
		if !h.Ejected() {
			t.Errorf("failure %d: host not ejected", i+1)
		}
	}
	if got := h.ConsecutiveFailures(); got != 4 {
		t.Errorf("consecutive failures = %d, want 4", got)
	}
	h.Succeed()
	if got := h.Fail(); got != 100*time.Millisecond {
		t.Errorf("after a success the next ejection lasts %s, want the base 100ms", got)
	}
}

func TestEjectionRunsOut(t *testing.T) {
	h := NewHost("198.18.0.1:8000", &EjectionPolicy{Base: 20 * time.Millisecond, Max: time.Second})
	h.Fail()
	start := time.Now()
	for h.Ejected() {
		if time.Since(start) > 2*time.Second {
			t.Fatal("host still ejected 2s after a 20ms ejection")
		}
		time.Sleep(time.Millisecond)
	}
	if d := time.Since(start); d < 15*time.Millisecond {
		t.Errorf("ejection ended after %s, want about 20ms", d)
	}
	if h.ejectedUntil.Load() != 0 {
		t.Error("an expired ejection was not cleared")
	}
}

func TestOldFailuresAreForgotten(t *testing.T) {
	h := NewHost("198.18.0.1:8000", &EjectionPolicy{Base: 5 * time.Millisecond, Max: 10 * time.Millisecond})
	h.Fail()
	h.Fail()
	time.Sleep(20 * time.Millisecond) // longer than Max: the streak is over
	if got := h.Fail(); got != 5*time.Millisecond {
		t.Errorf("a failure long after the last one ejected for %s, want the base 5ms", got)
	}
}

func TestZeroBaseDisablesEjection(t *testing.T) {
	h := NewHost("198.18.0.1:8000", &EjectionPolicy{})
	if d := h.Fail(); d != 0 || h.Ejected() {
		t.Errorf("Fail with ejection disabled: ejected %v for %s", h.Ejected(), d)
	}
}

func TestTryBeginNeverExceedsLimit(t *testing.T) {
	h := NewHost("198.18.0.1:8000", nil)
	const limit, workers = 5, 50
	var wg sync.WaitGroup
	var mu sync.Mutex
	admitted := 0
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if h.TryBegin(limit) {
				mu.Lock()
				admitted++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if admitted != limit || h.InFlight() != limit {
		t.Errorf("admitted %d with %d in flight, want %d", admitted, h.InFlight(), limit)
	}
	h.End()
	if !h.TryBegin(limit) {
		t.Error("TryBegin refused after a request ended")
	}
	if !h.TryBegin(0) || h.InFlight() != limit+1 {
		t.Errorf("TryBegin without a limit: %d in flight, want %d", h.InFlight(), limit+1)
	}
}

func TestRegistrySharesHostsByAddress(t *testing.T) {
	r := NewRegistry(EjectionPolicy{Base: time.Second, Max: time.Second})
	a := r.Acquire("198.18.0.1:8000")
	a.Begin()
	a.Fail()
	// A second pool (or a new generation of the same one) gets the same state.
	b := r.Acquire("198.18.0.1:8000")
	if a != b || b.InFlight() != 1 || !b.Ejected() {
		t.Fatalf("second Acquire returned a different host state (same=%v inflight=%d ejected=%v)", a == b, b.InFlight(), b.Ejected())
	}
	r.Release("198.18.0.1:8000")
	if _, ok := r.Get("198.18.0.1:8000"); !ok {
		t.Fatal("host forgotten while still referenced")
	}
	r.Release("198.18.0.1:8000")
	if _, ok := r.Get("198.18.0.1:8000"); ok || r.Len() != 0 {
		t.Fatal("host kept after its last reference was released")
	}
	if c := r.Acquire("198.18.0.1:8000"); c == a || c.InFlight() != 0 {
		t.Error("a forgotten address came back with its old state")
	}
	r.Release("198.18.0.9:8000") // unknown: no panic, no effect
}

func TestLoad(t *testing.T) {
	h := NewHost("198.18.0.1:8000", nil)
	if h.Load() != nil {
		t.Fatal("a new host has a load")
	}
	h.SetLoad(&Load{Waiting: 3, KVCacheUsage: 0.5})
	if l := h.Load(); l == nil || l.Waiting != 3 || l.KVCacheUsage != 0.5 {
		t.Errorf("Load() = %+v", l)
	}
	if w, kv := h.EngineLoad(); w != 3 || kv != 0.5 {
		t.Errorf("EngineLoad() = %v, %v; want 3, 0.5", w, kv)
	}
	h.SetLoad(nil)
	if h.Load() != nil {
		t.Error("SetLoad(nil) did not forget the load")
	}
	if w, kv := h.EngineLoad(); w != 0 || kv != 0 {
		t.Errorf("EngineLoad() after SetLoad(nil) = %v, %v; want 0, 0", w, kv)
	}
}
