package balance

import (
	"slices"
	"strconv"

	"github.com/cespare/xxhash/v2"
)

// vnodesPerEndpoint is how many points each endpoint has on the ring. More
// points spread keys more evenly at the cost of a larger ring; 64 is where
// the spread and the size of a 1,000-endpoint ring balance, and the load
// bound evens out the rest (docs/router.md).
const vnodesPerEndpoint = 64

// ring is a consistent-hash ring over a pool's endpoints. Points hash the
// endpoint's address, not its position, so every router replica builds the
// same ring for the same endpoints and an endpoint's points stay put when
// others come and go.
type ring []ringPoint

type ringPoint struct {
	hash     uint64
	endpoint int32 // index into Pool.endpoints
}

// HashKey hashes an affinity key (a prompt prefix, a session id) the way the
// ring expects. It is stable across processes and versions.
func HashKey(key []byte) uint64 { return xxhash.Sum64(key) }

// HashKeyString is HashKey for a string.
func HashKeyString(key string) uint64 { return xxhash.Sum64String(key) }

func buildRing(endpoints []Endpoint) ring {
	r := make(ring, 0, len(endpoints)*vnodesPerEndpoint)
	var buf []byte
	for i, e := range endpoints {
		for v := range vnodesPerEndpoint {
			buf = append(append(append(buf[:0], e.Address...), '#'), strconv.Itoa(v)...)
			r = append(r, ringPoint{hash: xxhash.Sum64(buf), endpoint: int32(i)})
		}
	}
	slices.SortFunc(r, func(a, b ringPoint) int {
		switch {
		case a.hash < b.hash:
			return -1
		case a.hash > b.hash:
			return 1
		}
		return int(a.endpoint - b.endpoint)
	})
	return r
}

// Ring builds the pool's hash ring now if it has not been built. Selectors
// build it on first use; a pool builder calls Ring so that the first
// request after an endpoint change does not pay for it.
func (p *Pool) Ring() {
	p.ringOnce.Do(func() { p.ring = buildRing(p.endpoints) })
}

// walkRing returns the first endpoint clockwise from hash that r may use and
// that has fewer than bound requests in flight, or nil when the walk finds
// none. The walk is capped at a few times the pool size: by then it has
// seen almost every endpoint, and the caller falls back to least-requests.
func (p *Pool) walkRing(r *Request, hash uint64, bound int64) *Endpoint {
	p.Ring()
	ring := p.ring
	if len(ring) == 0 {
		return nil
	}
	// Binary search for the first point at or after hash.
	lo, hi := 0, len(ring)
	for lo < hi {
		mid := int(uint(lo+hi) >> 1)
		if ring[mid].hash < hash {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	steps := min(len(ring), 4*len(p.endpoints)+16)
	last := int32(-1)
	for k := range steps {
		i := lo + k
		if i >= len(ring) {
			i -= len(ring)
		}
		idx := ring[i].endpoint
		if idx == last { // consecutive points of one endpoint
			continue
		}
		last = idx
		e := &p.endpoints[idx]
		if n, ok := p.candidate(e, r); ok && n < bound {
			return e
		}
	}
	return nil
}
