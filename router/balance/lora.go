package balance

import (
	"math"

	"github.com/capstan-dev/capstan/router/health"
)

// LoRA adapter affinity. A request for an adapter may go to any endpoint
// of its base model that has the adapter loaded (its model's pool), but an
// engine runs at most max_loras adapters at once: a request for one that is
// not active there waits for a slot, and bringing it into one stalls the
// engine's whole batch. So the load-aware and cache-aware policies prefer,
// among the endpoints of a request's adapter, those where it is active (its
// requests run or wait there), then those with a free slot, then the rest,
// as the engines last reported (health.LoRAState). An endpoint that reports
// no LoRA state counts as one with a free slot: neither preferred nor
// passed over. The preference is bounded by load, so a hot adapter spreads
// over more pods rather than piling onto one.

// adapterSlack is how many more requests in flight than the least busy
// endpoint an endpoint of a better LoRA tier may have and still be
// preferred, however lightly loaded the pool is: a slot load stalls an
// engine's batch for about as long as a few decode steps, while a few more
// sequences in a batch cost little.
const adapterSlack = 4

// LoRA tiers, best first.
const (
	tierActive = iota // the adapter's requests run or wait there
	tierFree          // a slot is free, or no LoRA state is known
	tierSwap          // every slot is taken by other adapters
)

func loraTier(h *health.Host, adapter uint64) int {
	s := h.LoRA()
	switch {
	case s == nil:
		return tierFree
	case s.ActiveKey(adapter):
		return tierActive
	case s.FreeSlot():
		return tierFree
	}
	return tierSwap
}

// preferAdapter returns pick, a policy's choice for r, which names an
// adapter, unless an endpoint of a better LoRA tier is within the load
// bound: then the one of the best such tier with the lowest load-aware
// score, ties broken at random. The bound is the larger of loadFactor times
// the pool's average in-flight count and fewest (the least busy usable
// endpoint's count) plus adapterSlack.
func preferAdapter(p *Pool, r *Request, pick *Endpoint, fewest int64, loadFactor, queueWeight, kvWeight float64) *Endpoint {
	if pick == nil {
		return nil
	}
	adapter := health.LoRAKey(r.Adapter)
	bestTier := loraTier(pick.Host, adapter)
	if bestTier == tierActive {
		return pick
	}
	bound := max(int64(math.Ceil(loadFactor*float64(p.InFlight()+1)/float64(len(p.endpoints)))), fewest+adapterSlack)
	var (
		best  *Endpoint
		least = math.Inf(1)
		tie   = newTieBreak()
	)
	for i, h := range p.hosts {
		n := h.InFlight()
		if n >= bound {
			continue
		}
		tier := loraTier(h, adapter)
		if tier > bestTier || best == nil && tier == bestTier {
			continue
		}
		e := &p.endpoints[i]
		if !p.usable(e, n, r) {
			continue
		}
		waiting, kv := h.QueueAndKVCache()
		switch score := float64(n) + queueWeight*waiting + kvWeight*kv; {
		case tier < bestTier || score < least:
			best, bestTier, least = e, tier, score
			tie.first()
		case score == least && tie.another():
			best = e
		}
	}
	if best == nil {
		return pick
	}
	return best
}
