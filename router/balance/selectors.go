package balance

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
)

// Selector is a balancing policy: it picks the endpoint of p that serves r,
// or nil when none is available. Implementations must only return endpoints
// for which p.available holds, and must not allocate or lock, except the
// cache-aware policy, whose shared index is the point of it.
type Selector interface {
	Select(p *Pool, r *Request) *Endpoint
}

// Policy names a balancing policy (the --balancer flag).
type Policy string

const (
	// LeastRequests sends each request to the endpoint with the fewest
	// requests in flight from this router, breaking ties at random.
	LeastRequests Policy = "least-requests"
	// PowerOfTwo compares two random endpoints and takes the less busy.
	PowerOfTwo Policy = "power-of-two"
	// RoundRobin takes endpoints in turn.
	RoundRobin Policy = "round-robin"
	// Random takes any endpoint at random.
	Random Policy = "random"
	// LoadAware weighs the engines' own queue depth and KV-cache usage.
	LoadAware Policy = "load-aware"
	// PrefixAffinity hashes the start of the prompt onto a consistent-hash
	// ring, so requests sharing a prefix share a pod's prefix cache, with a
	// load bound.
	PrefixAffinity Policy = "prefix-affinity"
	// SessionAffinity hashes the x-session-id header onto a consistent-hash
	// ring, so a conversation stays on one pod.
	SessionAffinity Policy = "session-affinity"
	// PrefixCache remembers which prompt blocks went to which endpoint and
	// weighs the longest match against load (PrefixCacheSelection).
	PrefixCache Policy = "prefix-cache"
)

// Policies lists every policy.
var Policies = []Policy{LeastRequests, PowerOfTwo, RoundRobin, Random, LoadAware, PrefixAffinity, SessionAffinity, PrefixCache}

// DefaultPolicy is the policy used when none is configured: the one that
// did best in make bench-routing (docs/benchmarks/routing.md).
const DefaultPolicy = PrefixCache

// DefaultLoadFactor is how far above the average in-flight count a prefix
// affinity endpoint may go before requests spill to the next one on the
// ring (1.25: at most 25% above average).
const DefaultLoadFactor = 1.25

// Options configures the policies that take parameters.
type Options struct {
	// LoadFactor bounds prefix affinity and LoRA adapter affinity: see
	// DefaultLoadFactor. Must be above 1.
	LoadFactor float64
	// Weights of the load-aware score; see LoadAwareSelection.
	QueueWeight, KVCacheWeight float64
	// CacheWeight and BlocksPerEndpoint configure the cache-aware policy;
	// see PrefixCacheSelection.
	CacheWeight       float64
	BlocksPerEndpoint int
}

// New returns the Selector for a policy.
func New(policy Policy, opts Options) (Selector, error) {
	switch policy {
	case LeastRequests:
		return LeastRequestsSelection{}, nil
	case PowerOfTwo:
		return PowerOfTwoSelection{}, nil
	case RoundRobin:
		return RoundRobinSelection{}, nil
	case Random:
		return RandomSelection{}, nil
	case LoadAware:
		if !(opts.LoadFactor > 1) {
			return nil, fmt.Errorf("load factor %v must be above 1", opts.LoadFactor)
		}
		return LoadAwareSelection{QueueWeight: opts.QueueWeight, KVCacheWeight: opts.KVCacheWeight, LoadFactor: opts.LoadFactor}, nil
	case PrefixAffinity:
		if !(opts.LoadFactor > 1) {
			return nil, fmt.Errorf("load factor %v must be above 1", opts.LoadFactor)
		}
		return PrefixAffinitySelection{LoadFactor: opts.LoadFactor}, nil
	case SessionAffinity:
		return SessionAffinitySelection{}, nil
	case PrefixCache:
		if !(opts.LoadFactor > 1) {
			return nil, fmt.Errorf("load factor %v must be above 1", opts.LoadFactor)
		}
		if opts.BlocksPerEndpoint <= 0 {
			return nil, fmt.Errorf("blocks per endpoint %d must be positive", opts.BlocksPerEndpoint)
		}
		return NewPrefixCache(opts.CacheWeight, opts.QueueWeight, opts.KVCacheWeight, opts.LoadFactor, opts.BlocksPerEndpoint), nil
	}
	return nil, fmt.Errorf("unknown balancer %q (supported: %v)", policy, Policies)
}

// LeastRequestsSelection picks the available endpoint with the fewest
// requests in flight, choosing uniformly among ties.
type LeastRequestsSelection struct{}

func (LeastRequestsSelection) Select(p *Pool, r *Request) *Endpoint { return leastRequests(p, r) }

// leastRequests scans the pool once. It compares the in-flight count first
// and checks availability only for endpoints that could win, so a scan of a
// large pool is mostly one load and one comparison per endpoint. Ties are
// broken at random (tieBreak).
func leastRequests(p *Pool, r *Request) *Endpoint {
	var (
		best  *Endpoint
		least int64 = math.MaxInt64
		tie         = newTieBreak()
	)
	limited, checkTried, checkEjected := p.limit > 0, r.ntried > 0, !r.IgnoreEjection
	for i, h := range p.hosts {
		n := h.InFlight()
		if n > least {
			continue
		}
		if (limited && n >= p.limit) || (checkTried && r.tried(h)) || (checkEjected && h.Ejected()) {
			continue
		}
		e := &p.endpoints[i]
		if n < least {
			best, least = e, n
			tie.first()
			continue
		}
		if tie.another() {
			best = e
		}
	}
	return best
}

// tieBreak chooses uniformly among tied candidates by reservoir sampling:
// the k-th tie replaces the choice with probability 1/k. Its inline
// xorshift generator is seeded once per pick, so a scan of a large idle
// pool costs one call to the runtime's generator.
type tieBreak struct{ x, ties uint64 }

func newTieBreak() tieBreak { return tieBreak{x: rand.Uint64() | 1} }

// first records a new best candidate, the only one so far.
func (t *tieBreak) first() { t.ties = 1 }

// another records a candidate tied with the best and reports whether it
// takes the best's place.
func (t *tieBreak) another() bool {
	t.ties++
	t.x ^= t.x << 13
	t.x ^= t.x >> 7
	t.x ^= t.x << 17
	return (t.x>>32)*t.ties>>32 == 0 // uniform in [0, ties) is 0
}

// usable reports whether r may go to e, which has n requests in flight.
// (leastRequests and lowestLoad inline the same test by hand.)
func (p *Pool) usable(e *Endpoint, n int64, r *Request) bool {
	return (p.limit <= 0 || n < p.limit) &&
		(r.ntried == 0 || !r.tried(e.Host)) &&
		(r.IgnoreEjection || !e.Host.Ejected())
}

// candidate returns e's in-flight count and whether r may go to e; it reads
// the count once for both the limit and the caller's comparison.
func (p *Pool) candidate(e *Endpoint, r *Request) (int64, bool) {
	n := e.Host.InFlight()
	return n, p.usable(e, n, r)
}

// PowerOfTwoSelection compares two distinct random endpoints and picks the
// one with fewer requests in flight: nearly as even as least-requests at a
// constant cost however large the pool. When either is unavailable it falls
// back to a full least-requests scan.
type PowerOfTwoSelection struct{}

func (PowerOfTwoSelection) Select(p *Pool, r *Request) *Endpoint {
	n := len(p.endpoints)
	if n < 2 {
		return leastRequests(p, r)
	}
	i := rand.IntN(n)
	j := rand.IntN(n - 1)
	if j >= i {
		j++
	}
	a, b := &p.endpoints[i], &p.endpoints[j]
	na, okA := p.candidate(a, r)
	nb, okB := p.candidate(b, r)
	switch {
	case okA && okB:
		if nb < na {
			return b
		}
		return a
	case okA:
		return a
	case okB:
		return b
	}
	return leastRequests(p, r)
}

// RoundRobinSelection takes the pool's endpoints in turn, skipping those that
// are unavailable. The position is one atomic counter per pool.
type RoundRobinSelection struct{}

func (RoundRobinSelection) Select(p *Pool, r *Request) *Endpoint {
	n := uint64(len(p.endpoints))
	if n == 0 {
		return nil
	}
	return firstAvailable(p, r, int((p.next.Add(1)-1)%n))
}

// RandomSelection takes a uniformly random available endpoint.
type RandomSelection struct{}

func (RandomSelection) Select(p *Pool, r *Request) *Endpoint {
	n := len(p.endpoints)
	if n == 0 {
		return nil
	}
	return firstAvailable(p, r, rand.IntN(n))
}

// firstAvailable returns the first available endpoint from index start on,
// wrapping around.
func firstAvailable(p *Pool, r *Request, start int) *Endpoint {
	n := len(p.endpoints)
	for k := range n {
		i := start + k
		if i >= n {
			i -= n
		}
		e := &p.endpoints[i]
		if _, ok := p.candidate(e, r); ok {
			return e
		}
	}
	return nil
}

// LoadAwareSelection picks the endpoint with the lowest score
//
//	in-flight from this router + QueueWeight × engine queue + KVCacheWeight × KV-cache usage
//
// where the engine terms come from the pod's latest fresh metrics
// (health.Host.Load) and are 0 when there are none, e.g. for a pod scraped
// for the first time. The router's own in-flight count reacts at once; the
// engine's queue and KV cache see load from other router replicas and
// clients, a scrape interval late. Ties are broken at random. A request for
// a LoRA adapter prefers endpoints where the adapter is active, bounded by
// LoadFactor (see preferAdapter).
type LoadAwareSelection struct {
	// QueueWeight scales the engine's waiting requests. Default 1.
	QueueWeight float64
	// KVCacheWeight scales KV-cache usage (0 to 1). Default 8: a full
	// cache, which makes the engine queue or preempt new work, weighs as
	// much as eight queued requests.
	KVCacheWeight float64
	// LoadFactor bounds LoRA adapter affinity, above 1
	// (DefaultLoadFactor).
	LoadFactor float64
}

// Default load-aware weights.
const (
	DefaultQueueWeight   = 1
	DefaultKVCacheWeight = 8
)

func (s LoadAwareSelection) Select(p *Pool, r *Request) *Endpoint {
	best, fewest := lowestLoad(p, r, s.QueueWeight, s.KVCacheWeight)
	if r.Adapter != "" {
		return preferAdapter(p, r, best, fewest, s.LoadFactor, s.QueueWeight, s.KVCacheWeight)
	}
	return best
}

// lowestLoad returns the endpoint r may use with the lowest load-aware
// score (LoadAwareSelection's), ties broken at random, and the fewest
// requests in flight on an endpoint r may use. Like leastRequests it
// compares the in-flight count first: the engine terms are never negative
// (health.Host clamps them), so an endpoint with more requests in flight
// than the best score, rounded down, can neither win nor have the fewest.
func lowestLoad(p *Pool, r *Request, queueWeight, kvWeight float64) (*Endpoint, int64) {
	var (
		best   *Endpoint
		least  = math.Inf(1)
		cut    = int64(math.MaxInt64)
		fewest = int64(math.MaxInt64)
		tie    = newTieBreak()
	)
	limited, checkTried, checkEjected := p.limit > 0, r.ntried > 0, !r.IgnoreEjection
	for i, h := range p.hosts {
		n := h.InFlight()
		if n > cut {
			continue
		}
		if (limited && n >= p.limit) || (checkTried && r.tried(h)) || (checkEjected && h.Ejected()) {
			continue
		}
		fewest = min(fewest, n)
		waiting, kv := h.QueueAndKVCache()
		switch score := float64(n) + queueWeight*waiting + kvWeight*kv; {
		case best == nil || score < least:
			best, least = &p.endpoints[i], score
			if score < math.MaxInt64 {
				cut = int64(score)
			}
			tie.first()
		case score == least && tie.another():
			best = &p.endpoints[i]
		}
	}
	return best, fewest
}

// PrefixAffinitySelection sends requests whose prompts start alike to the
// same endpoint, so the engine's prefix (KV) cache is reused: the prefix
// hash is placed on a consistent-hash ring, which moves only about 1/n of
// the prefixes when an endpoint comes or goes. Load is bounded as in
// "Consistent Hashing with Bounded Loads" (Mirrokni, Thorup, Zadimoghaddam,
// 2018): an endpoint with LoadFactor × the average in-flight count or more
// is passed over for the next one on the ring, so one hot prefix cannot
// overload a pod. Requests without a prompt go to the least busy endpoint.
type PrefixAffinitySelection struct {
	// LoadFactor is the bound, above 1 (DefaultLoadFactor).
	LoadFactor float64
}

func (s PrefixAffinitySelection) Select(p *Pool, r *Request) *Endpoint {
	if !r.HasPrefix || len(p.endpoints) == 0 {
		return leastRequests(p, r)
	}
	// Counting this request, the average is (in flight + 1) / n; an endpoint
	// may take it while it has fewer than ceil(factor × average) in flight.
	bound := int64(math.Ceil(s.LoadFactor * float64(p.InFlight()+1) / float64(len(p.endpoints))))
	if e := p.walkRing(r, r.PrefixHash, bound); e != nil {
		return e
	}
	return leastRequests(p, r)
}

// SessionAffinitySelection keeps a session (the x-session-id header) on one
// endpoint through a consistent-hash ring; when that endpoint is
// unavailable the session moves to the next one on the ring, the same one
// on every router replica. Requests without a session id go to the least
// busy endpoint.
type SessionAffinitySelection struct{}

func (SessionAffinitySelection) Select(p *Pool, r *Request) *Endpoint {
	if !r.HasSession || len(p.endpoints) == 0 {
		return leastRequests(p, r)
	}
	if e := p.walkRing(r, r.SessionHash, math.MaxInt64); e != nil {
		return e
	}
	return leastRequests(p, r)
}

// NeedsRing reports whether a policy's Selector uses the pool's hash ring,
// so a pool builder can build it before the first request instead of
// during it.
func NeedsRing(policy Policy) bool {
	switch policy {
	case PrefixAffinity, SessionAffinity, PrefixCache:
		return true
	}
	return false
}

// Interface guards.
var (
	_ Selector = LeastRequestsSelection{}
	_ Selector = PowerOfTwoSelection{}
	_ Selector = RoundRobinSelection{}
	_ Selector = RandomSelection{}
	_ Selector = LoadAwareSelection{}
	_ Selector = PrefixAffinitySelection{}
	_ Selector = SessionAffinitySelection{}
	_ Selector = &PrefixCacheSelection{}
)

// ValidPolicy reports whether p names a policy.
func ValidPolicy(p Policy) bool { return slices.Contains(Policies, p) }
