// Package balance picks the endpoint that serves a request. A Pool is an
// immutable, address-sorted set of the Ready endpoints a request may go to;
// a Selector is one balancing policy. Picking never allocates and never
// takes a lock: it reads atomic counters on each endpoint's health.Host.
package balance

import (
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/capstan-dev/capstan/router/health"
	"github.com/capstan-dev/capstan/router/upstream"
)

// Endpoint is one address a pool's requests can go to.
type Endpoint struct {
	// Address is ip:port.
	Address string
	// Pod is "<namespace>/<name>" of the pod behind the address, or "" when
	// the EndpointSlice does not name one.
	Pod string
	// Host is the address's live state, shared by every pool that holds it.
	Host *health.Host
	// Protocol is what the address speaks (an InferencePool's
	// appProtocol); the zero value is HTTP/1.1.
	Protocol upstream.Protocol
}

// Pool is a set of endpoints that may serve the same requests (the Ready
// endpoints of one model). It is immutable once built, except for counters,
// and safe for concurrent use; build a new Pool when the endpoints change.
type Pool struct {
	endpoints []Endpoint
	// hosts[i] is endpoints[i].Host, packed densely so that a scan of a
	// large pool touches a fifth of the memory.
	hosts []*health.Host
	limit int64
	// inflight counts admitted requests, against maxInFlight.
	inflight    *atomic.Int64
	maxInFlight int64

	next atomic.Uint64 // round robin position

	ringOnce sync.Once
	ring     ring
}

// PoolOptions configures a pool.
type PoolOptions struct {
	// MaxPerEndpoint is how many requests the router may have in flight to
	// one endpoint; 0 means no limit.
	MaxPerEndpoint int64
	// MaxInFlight is how many requests the pool admits at once; 0 means no
	// limit.
	MaxInFlight int64
	// InFlight counts the requests in flight through the pool. Pass the same
	// counter to every generation of a model's pool, so that the count
	// survives endpoint changes. Default: a new counter.
	InFlight *atomic.Int64
}

// NewPool returns a pool of endpoints, which must be sorted by address and
// unique; the pool keeps the slice.
func NewPool(endpoints []Endpoint, opts PoolOptions) *Pool {
	p := &Pool{endpoints: endpoints, hosts: make([]*health.Host, len(endpoints)), limit: opts.MaxPerEndpoint, inflight: opts.InFlight, maxInFlight: opts.MaxInFlight}
	for i := range endpoints {
		p.hosts[i] = endpoints[i].Host
	}
	if p.inflight == nil {
		p.inflight = new(atomic.Int64)
	}
	return p
}

// Endpoints returns the pool's endpoints, sorted by address. Callers must
// not modify the slice.
func (p *Pool) Endpoints() []Endpoint { return p.endpoints }

// Len is the number of endpoints.
func (p *Pool) Len() int { return len(p.endpoints) }

// InFlight is the number of requests in flight through the pool (across its
// generations when they share a counter).
func (p *Pool) InFlight() int64 { return p.inflight.Load() }

// MaxInFlight is the pool's in-flight limit, 0 for none.
func (p *Pool) MaxInFlight() int64 { return p.maxInFlight }

// MaxPerEndpoint is the per-endpoint in-flight limit, 0 for none.
func (p *Pool) MaxPerEndpoint() int64 { return p.limit }

// Admit counts a request against the pool, unless the pool already has
// MaxInFlight requests (then the caller answers 429). Every admitted request
// ends with Done, however many endpoints it tries.
func (p *Pool) Admit() bool {
	if p.maxInFlight <= 0 {
		p.inflight.Add(1)
		return true
	}
	for {
		n := p.inflight.Load()
		if n >= p.maxInFlight {
			return false
		}
		if p.inflight.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// Done ends a request counted by Admit.
func (p *Pool) Done() { p.inflight.Add(-1) }

// Acquire counts an attempt to e as in flight on e. It fails when e is at
// its in-flight limit (another request took the last slot after e was
// picked); the caller then picks again.
func (p *Pool) Acquire(e *Endpoint) bool { return e.Host.TryBegin(p.limit) }

// Release ends an attempt counted by Acquire.
func (p *Pool) Release(e *Endpoint) { e.Host.End() }

// full reports whether e is at the per-endpoint limit.
func (p *Pool) full(e *Endpoint) bool {
	return p.limit > 0 && e.Host.InFlight() >= p.limit
}

// Available reports whether r may be sent to e now: e is not at its
// limit, r has not already tried it, and e is not ejected (unless r says to
// ignore ejection because every endpoint is ejected). Selectors must return
// only available endpoints.
func (p *Pool) Available(e *Endpoint, r *Request) bool {
	return p.usable(e, e.Host.InFlight(), r)
}

// Why explains, once Select found nothing, why no endpoint could take r.
func (p *Pool) Why(r *Request) Unavailable {
	var u Unavailable
	for i := range p.endpoints {
		e := &p.endpoints[i]
		switch {
		case r.tried(e.Host):
			u.Tried++
		case p.full(e):
			u.Full++
		case e.Host.Ejected():
			u.Ejected++
		}
	}
	return u
}

// Unavailable counts why a pool's endpoints could not take a request.
type Unavailable struct {
	// Tried endpoints already failed this request.
	Tried int
	// Full endpoints are at the per-endpoint in-flight limit.
	Full int
	// Ejected endpoints failed recently and are backing off.
	Ejected int
}

// MaxAttempts bounds how many endpoints one request can try; Request
// remembers that many without allocating.
const MaxAttempts = 8

// Request is what a Selector knows about the request it places. The zero
// value is a request with no affinity.
type Request struct {
	// PrefixHash hashes the start of the prompt, for prefix affinity; valid
	// when HasPrefix.
	PrefixHash uint64
	HasPrefix  bool
	// Blocks are the prompt's block hashes (PromptBlocks), for the
	// cache-aware policy.
	Blocks []uint64
	// SessionHash hashes the session id, for session affinity; valid when
	// HasSession.
	SessionHash uint64
	HasSession  bool
	// Adapter names the LoRA adapter the request is for, "" for a base
	// model: the load-aware and cache-aware policies prefer the endpoints
	// where it is active (see preferAdapter).
	Adapter string
	// IgnoreEjection lets the request go to ejected endpoints: the last
	// resort when every endpoint is ejected, since an ejection only
	// suspects a pod that its EndpointSlice still calls Ready.
	IgnoreEjection bool

	triedHosts [MaxAttempts]*health.Host
	ntried     int
}

// Tried records that the request went to e and failed, so no Selector picks
// it again for this request.
func (r *Request) Tried(e *Endpoint) {
	if r.ntried < len(r.triedHosts) {
		r.triedHosts[r.ntried] = e.Host
		r.ntried++
	}
}

func (r *Request) tried(h *health.Host) bool {
	for i := range r.ntried {
		if r.triedHosts[i] == h {
			return true
		}
	}
	return false
}

// endpointOf returns the pool's endpoint of h, or nil if h is not in the
// pool.
func (p *Pool) endpointOf(h *health.Host) *Endpoint {
	i, ok := slices.BinarySearchFunc(p.endpoints, h.Address(), func(e Endpoint, addr string) int { return strings.Compare(e.Address, addr) })
	if !ok || p.endpoints[i].Host != h {
		return nil
	}
	return &p.endpoints[i]
}
