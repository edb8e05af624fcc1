package health

import (
	"sync"
	"sync/atomic"
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

// fakeClock is a monotonic clock the test moves.
type fakeClock struct{ t atomic.Int64 }

func (c *fakeClock) now() int64           { return c.t.Load() }
func (c *fakeClock) step(d time.Duration) { c.t.Add(int64(d)) }
func newFakeClock() *fakeClock            { c := &fakeClock{}; c.t.Store(1); return c }
func (c *fakeClock) policy(base, max time.Duration) *EjectionPolicy {
	return &EjectionPolicy{Base: base, Max: max, clock: c.now}
}

func TestEjectionRunsOut(t *testing.T) {
	clock := newFakeClock()
	h := NewHost("198.18.0.1:8000", clock.policy(20*time.Millisecond, time.Second))
	h.Fail()
	clock.step(19 * time.Millisecond)
	if !h.Ejected() {
		t.Fatal("a 20ms ejection ended after 19ms")
	}
	clock.step(time.Millisecond)
	if h.Ejected() {
		t.Fatal("a 20ms ejection still holds after 20ms")
	}
	if h.ejectedUntil.Load() != 0 {
		t.Error("an expired ejection was not cleared")
	}
}

func TestOldFailuresAreForgotten(t *testing.T) {
	clock := newFakeClock()
	h := NewHost("198.18.0.1:8000", clock.policy(5*time.Millisecond, 10*time.Millisecond))
	h.Fail()
	clock.step(10 * time.Millisecond) // within Max of the last failure: the streak goes on
	if got := h.Fail(); got != 10*time.Millisecond {
		t.Errorf("a second failure 10ms after the first ejected for %s, want 10ms", got)
	}
	clock.step(11 * time.Millisecond) // longer than Max: the streak is over
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

func TestEngineLoad(t *testing.T) {
	h := NewHost("198.18.0.1:8000", nil)
	if h.EngineLoad() != nil {
		t.Fatal("a new host has a load")
	}
	h.SetEngineLoad(&EngineLoad{Waiting: 3, KVCacheUsage: 0.5})
	if l := h.EngineLoad(); l == nil || l.Waiting != 3 || l.KVCacheUsage != 0.5 {
		t.Errorf("Load() = %+v", l)
	}
	if w, kv := h.QueueAndKVCache(); w != 3 || kv != 0.5 {
		t.Errorf("QueueAndKVCache() = %v, %v; want 3, 0.5", w, kv)
	}
	// What a pod reports is clamped: a balancer counts on neither term
	// being negative.
	h.SetEngineLoad(&EngineLoad{Waiting: -1e9, KVCacheUsage: 7})
	if w, kv := h.QueueAndKVCache(); w != 0 || kv != 1 {
		t.Errorf("QueueAndKVCache() of a negative queue and a usage of 7 = %v, %v; want 0, 1", w, kv)
	}
	h.SetEngineLoad(&EngineLoad{KVCacheUsage: -0.5})
	if _, kv := h.QueueAndKVCache(); kv != 0 {
		t.Errorf("QueueAndKVCache() of a negative usage = %v; want 0", kv)
	}
	h.SetEngineLoad(nil)
	if h.EngineLoad() != nil {
		t.Error("SetEngineLoad(nil) did not forget the load")
	}
	if w, kv := h.QueueAndKVCache(); w != 0 || kv != 0 {
		t.Errorf("QueueAndKVCache() after SetEngineLoad(nil) = %v, %v; want 0, 0", w, kv)
	}
}

// TestRegistryForgets: the address is reported once, when its last
// reference goes, not while another holder keeps it.
func TestRegistryForgets(t *testing.T) {
	r := NewRegistry(EjectionPolicy{})
	var forgotten []string
	r.OnForget(func(a string) { forgotten = append(forgotten, a) })
	r.Acquire("198.18.0.1:80")
	r.Acquire("198.18.0.1:80")
	r.Acquire("198.18.0.2:80")
	r.Release("198.18.0.1:80")
	if len(forgotten) != 0 {
		t.Fatalf("forgot %v while a holder keeps it", forgotten)
	}
	r.Release("198.18.0.1:80")
	r.Release("198.18.0.1:80") // one too many: nothing to forget
	if len(forgotten) != 1 || forgotten[0] != "198.18.0.1:80" || r.Len() != 1 {
		t.Fatalf("forgot %v with %d left, want [198.18.0.1:80] with 1", forgotten, r.Len())
	}
}

// A LoRA state says which adapters are active and whether a slot is free,
// counting each adapter once.
func TestLoRAStateSlots(t *testing.T) {
	cases := map[string]struct {
		state    *LoRAState
		active   []string
		inactive []string
		free     bool
	}{
		"idle":                          {NewLoRAState(nil, nil, 1), nil, []string{"a"}, true},
		"one of two slots":              {NewLoRAState([]string{"a"}, nil, 2), []string{"a"}, []string{"b"}, true},
		"full with running and waiting": {NewLoRAState([]string{"a"}, []string{"b"}, 2), []string{"a", "b"}, []string{"c"}, false},
		"duplicates count once":         {NewLoRAState([]string{"a", "a"}, []string{"a"}, 2), []string{"a"}, []string{"b"}, true},
		"more in use than slots":        {NewLoRAState([]string{"a"}, []string{"b", "c"}, 1), []string{"a", "b", "c"}, nil, false},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			for _, a := range tc.active {
				if !tc.state.Active(a) {
					t.Errorf("Active(%q) = false", a)
				}
			}
			for _, a := range tc.inactive {
				if tc.state.Active(a) {
					t.Errorf("Active(%q) = true", a)
				}
			}
			if got := tc.state.FreeSlot(); got != tc.free {
				t.Errorf("FreeSlot() = %v, want %v", got, tc.free)
			}
		})
	}
}
