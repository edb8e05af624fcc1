// Package health holds the router's live view of each upstream address: how
// many requests it has in flight and whether it is ejected after failing.
// A Host is keyed by address and outlives EndpointSlice updates, so a slice
// change (a new pod elsewhere, a label edit) neither resets in-flight counts
// nor forgives a pod that just refused connections.
package health

import (
	"hash/maphash"
	"math"
	"slices"
	"sync/atomic"
	"time"
)

// epoch anchors the monotonic clock Hosts use; it is set once at start-up and
// never changes.
var epoch = time.Now()

// now returns monotonic nanoseconds since epoch. It never goes backwards and
// never returns 0, which Host uses to mean "not ejected".
func now() int64 { return int64(time.Since(epoch)) + 1 }

// Host is the live state of one upstream address. All methods are safe for
// concurrent use and none takes a lock; the hot path (Available, InFlight,
// Begin, End) is a few atomic operations. A Host must not be copied.
type Host struct {
	// The fields a balancer's scan reads come first, in one cache line.
	inflight atomic.Int64
	// waiting and kvCache are the engine's latest queue depth and KV-cache
	// usage as float64 bits, 0 when unknown, copied out of load so that
	// the load-aware scan needs no pointer chase.
	waiting, kvCache atomic.Uint64
	// ejectedUntil is the monotonic time (see now) until which the host
	// gets no new requests, or 0 when it is not ejected. Keeping 0 for the
	// common case lets Available skip reading the clock.
	ejectedUntil atomic.Int64
	// failures counts consecutive failed attempts; it sets the length of
	// the next ejection and is reset by a success.
	failures atomic.Int32
	// lastFailure is when the most recent failure happened (see now).
	lastFailure atomic.Int64
	// badAnswers counts consecutive exchanges that reached the server and
	// failed: an answer the outlier detection counts (a 5xx), a first-byte
	// timeout, a reset.
	badAnswers atomic.Int32

	load atomic.Pointer[EngineLoad]
	lora atomic.Pointer[LoRAState]

	address string
	policy  *EjectionPolicy
}

// NewHost returns the state of one address under an ejection policy. Most
// callers get Hosts from a Registry instead, so that state is shared by
// address; NewHost is for tests and one-off hosts.
func NewHost(address string, policy *EjectionPolicy) *Host {
	if policy == nil {
		policy = &EjectionPolicy{}
	}
	return &Host{address: address, policy: policy}
}

// Address is the host's ip:port.
func (h *Host) Address() string { return h.address }

// InFlight is the number of requests the router has sent to the host that
// have not finished.
func (h *Host) InFlight() int64 { return h.inflight.Load() }

// Begin counts a request as in flight.
func (h *Host) Begin() { h.inflight.Add(1) }

// TryBegin counts a request as in flight unless the host already has limit
// requests in flight (limit <= 0 means no limit). Unlike a check followed
// by Begin, concurrent callers can never push the count over the limit.
func (h *Host) TryBegin(limit int64) bool {
	if limit <= 0 {
		h.inflight.Add(1)
		return true
	}
	for {
		n := h.inflight.Load()
		if n >= limit {
			return false
		}
		if h.inflight.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// End counts a request begun with Begin or TryBegin as finished.
func (h *Host) End() { h.inflight.Add(-1) }

// Ejected reports whether the host is ejected now. It is small enough to be
// inlined into a balancer's scan: only an ejected host reads the clock.
func (h *Host) Ejected() bool {
	until := h.ejectedUntil.Load()
	return until != 0 && h.stillEjected(until)
}

func (h *Host) stillEjected(until int64) bool {
	if h.policy.now() < until {
		return true
	}
	// The ejection has run out: clear it so later checks need no clock.
	h.ejectedUntil.CompareAndSwap(until, 0)
	return false
}

// Fail records a failed attempt (connection refused, reset, timed out before
// any response). The host is ejected for the policy's base duration,
// doubled for each further consecutive failure up to its maximum, and
// Fail returns that duration (0 when the policy disables ejection).
// Failures older than the maximum ejection are forgotten, so a pod that
// failed once an hour ago starts again at the base duration.
func (h *Host) Fail() time.Duration {
	p := h.policy
	if p.Base <= 0 {
		return 0
	}
	t := p.now()
	if last := h.lastFailure.Swap(t); last != 0 && time.Duration(t-last) > p.Max {
		h.failures.Store(0)
	}
	n := h.failures.Add(1)
	d := p.Base
	for i := int32(1); i < n && d < p.Max; i++ {
		d *= 2
	}
	d = min(d, p.Max)
	h.ejectedUntil.Store(t + int64(d))
	return d
}

// Succeed records a successful exchange: the next failure starts the
// backoff from the base duration again, and a streak of bad answers ends.
func (h *Host) Succeed() {
	if h.failures.Load() != 0 {
		h.failures.Store(0)
	}
	if h.badAnswers.Load() != 0 {
		h.badAnswers.Store(0)
	}
}

// BadAnswer records an exchange that reached the server and failed, and
// returns how many have in a row since the last success or ejection.
func (h *Host) BadAnswer() int { return int(h.badAnswers.Add(1)) }

// ForgetBadAnswers ends a streak of bad answers without a success: an
// ejection for it starts the count again.
func (h *Host) ForgetBadAnswers() { h.badAnswers.Store(0) }

// ConsecutiveFailures is the number of failures since the last success.
func (h *Host) ConsecutiveFailures() int { return int(h.failures.Load()) }

// EjectionPolicy says how long a failing host gets no new requests.
type EjectionPolicy struct {
	// Base is the first ejection's length; 0 disables ejection.
	Base time.Duration
	// Max caps the doubling of consecutive ejections.
	Max time.Duration
	// clock replaces now in tests.
	clock func() int64
}

func (p *EjectionPolicy) now() int64 {
	if p.clock != nil {
		return p.clock()
	}
	return now()
}

// EngineLoad is what a model server reports about its own load in its
// metrics. The load-aware balancer prefers hosts with short queues and free
// KV cache.
type EngineLoad struct {
	// Waiting is the number of requests queued in the engine.
	Waiting float64
	// Running is the number of requests in the engine's current batch.
	Running float64
	// KVCacheUsage is the fraction of the KV cache in use, 0 to 1.
	KVCacheUsage float64
}

// SetEngineLoad records the host's latest fresh load, or forgets it (nil) when the
// engine's metrics are missing or stale. The value must not be changed
// afterwards.
func (h *Host) SetEngineLoad(l *EngineLoad) {
	h.load.Store(l)
	var waiting, kv float64
	if l != nil {
		// A pod's metrics are its own to write: a negative queue or a
		// usage outside 0 to 1 would draw every request to it.
		waiting, kv = max(l.Waiting, 0), min(max(l.KVCacheUsage, 0), 1)
	}
	h.waiting.Store(math.Float64bits(waiting))
	h.kvCache.Store(math.Float64bits(kv))
}

// QueueAndKVCache returns the engine's latest waiting requests (at least 0)
// and KV-cache usage (0 to 1), both 0 when unknown. It reads two atomics and does not allocate.
func (h *Host) QueueAndKVCache() (waiting, kvCache float64) {
	return math.Float64frombits(h.waiting.Load()), math.Float64frombits(h.kvCache.Load())
}

// EngineLoad returns the host's latest fresh load, or nil when none is known.
func (h *Host) EngineLoad() *EngineLoad { return h.load.Load() }

// LoRAState is what a model server reports about its LoRA adapters (vLLM's
// vllm:lora_requests_info): the adapters its running and waiting requests
// use, and how many it can use at once. The LoRA-affinity pick prefers an
// endpoint where a request's adapter is already active, then one with a
// free slot, so that adapters are not swapped in and out of GPU slots.
type LoRAState struct {
	// Running and Waiting are the adapters of the engine's running and
	// waiting requests.
	Running, Waiting []string
	// MaxLoRAs is how many adapters the engine's batch may use at once
	// (vLLM's --max-loras), at least 1.
	MaxLoRAs int
	// keys are the LoRAKeys of the distinct adapters of Running and
	// Waiting: a pick compares those rather than names.
	keys []uint64
}

// loraSeed is chosen once, when the process starts, so that no pod can
// name adapters whose keys collide with another adapter's on purpose.
var loraSeed = maphash.MakeSeed()

// LoRAKey is an adapter's key, as LoRAState.ActiveKey takes it.
func LoRAKey(adapter string) uint64 { return maphash.String(loraSeed, adapter) }

// NewLoRAState returns the state of an engine whose running and waiting
// requests use those adapters, with maxLoRAs slots. The slices are kept.
func NewLoRAState(running, waiting []string, maxLoRAs int) *LoRAState {
	s := &LoRAState{Running: running, Waiting: waiting, MaxLoRAs: maxLoRAs}
	for _, names := range [][]string{running, waiting} {
		for _, a := range names {
			if k := LoRAKey(a); !slices.Contains(s.keys, k) {
				s.keys = append(s.keys, k)
			}
		}
	}
	return s
}

// Active reports whether the engine's running or waiting requests use the
// adapter.
func (s *LoRAState) Active(adapter string) bool { return s.ActiveKey(LoRAKey(adapter)) }

// ActiveKey is Active for an adapter's LoRAKey.
func (s *LoRAState) ActiveKey(key uint64) bool { return slices.Contains(s.keys, key) }

// FreeSlot reports whether the engine uses fewer adapters than it has
// slots, so that one more needs no other to be swapped out.
func (s *LoRAState) FreeSlot() bool { return len(s.keys) < s.MaxLoRAs }

// SetLoRA records the host's latest fresh LoRA state, or forgets it (nil)
// when the engine reports none or its report is stale. The value must not be
// changed afterwards.
func (h *Host) SetLoRA(s *LoRAState) { h.lora.Store(s) }

// LoRA returns the host's latest fresh LoRA state, or nil when none is
// known.
func (h *Host) LoRA() *LoRAState { return h.lora.Load() }
