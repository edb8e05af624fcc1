package balance

import (
	"container/list"
	"math"
	"sync"
	"time"

	"github.com/cespare/xxhash/v2"

	"github.com/capstan-dev/capstan/router/health"
)

// Prompt blocks: the cache-aware policy sees a prompt as chained hashes of
// fixed-size blocks of its bytes as sent, the way an engine's prefix cache
// sees tokens in blocks, so two prompts share their first k block hashes
// exactly when they share their first k blocks.
const (
	// PromptBlockBytes is the size of a prompt block: about 64 tokens, four
	// of vLLM's 16-token KV blocks.
	PromptBlockBytes = 256
	// MaxPromptBlocks bounds the blocks hashed per request, and so the
	// prompt bytes the router keeps for it (128 KiB).
	MaxPromptBlocks = 512
	// placementBlocks is how many leading blocks place a prompt that no
	// endpoint has seen on the hash ring (2 KiB): enough to tell apart
	// prompts that share only a common instruction block, few enough that
	// the requests of one long shared context agree.
	placementBlocks = 8
)

// PromptBlocks appends to dst the chained hashes of prompt's full blocks,
// at most MaxPromptBlocks, and of its last partial block when the prompt
// is shorter than a block.
func PromptBlocks(dst []uint64, prompt []byte) []uint64 {
	var prev uint64
	var buf [8 + PromptBlockBytes]byte
	for off := 0; off < len(prompt) && len(dst) < MaxPromptBlocks; off += PromptBlockBytes {
		end := off + PromptBlockBytes
		if end > len(prompt) {
			if off > 0 {
				break // a partial tail is not shared by the prompts that continue it
			}
			end = len(prompt)
		}
		for i := range 8 {
			buf[i] = byte(prev >> (8 * i))
		}
		n := copy(buf[8:], prompt[off:end])
		prev = xxhash.Sum64(buf[:8+n])
		dst = append(dst, prev)
	}
	return dst
}

// Defaults of the cache-aware policy.
const (
	// DefaultCacheWeight is what a request's whole prompt found cached on
	// an endpoint is worth, in requests in flight there: a pod that holds
	// the prompt wins over one with up to four fewer requests.
	DefaultCacheWeight = 4
	// DefaultBlocksPerEndpoint is how many prompt blocks the router
	// remembers per endpoint (2 MiB of prompt text, about the half a
	// million tokens an 80 GB GPU's KV cache holds for an 8B model).
	DefaultBlocksPerEndpoint = 8192
)

// PrefixCacheSelection sends a request where its prompt is most likely
// cached, unless that endpoint is loaded. It remembers, per endpoint, the
// prompt blocks it recently sent there (bounded, least recently used
// first). A prompt is placed by its first placementBlocks blocks (its key)
// on the consistent-hash ring, so that every router replica sends the same
// prefix to the same pod, and the same next pods when that one is busy,
// without sharing state:
//
//   - When no endpoint was sent the prompt's key (a shorter match is a
//     preamble common to many prompts), the prompt is new: it goes to the
//     first endpoint on the ring from its key that has no more requests in
//     flight than the least busy one, so that prompts that share nothing
//     are spread as least-requests spreads them.
//
//   - Otherwise it goes to the one with the lowest
//
//     load − CacheWeight × (leading blocks the endpoint was sent) / (blocks)
//
//     among the endpoints that were sent its key and the first endpoint on
//     the ring from its key, leaving out those with LoadFactor × the
//     average in-flight count or more, so that a hot prefix spills to the
//     ring's next pods and no further. Load is the load-aware score (in
//     flight from this router + QueueWeight × engine queue + KVCacheWeight
//     × KV-cache usage).
//
// A request without a prompt, or one no such endpoint can take, is placed
// by load alone, as load-aware places it. A request for a LoRA adapter then
// goes where the adapter is active instead, if such an endpoint is within
// the load bound (see preferAdapter).
//
// Unlike the other policies it takes a lock (the index is shared by the
// router's requests) and allocates when it records a pick.
type PrefixCacheSelection struct {
	CacheWeight, QueueWeight, KVCacheWeight float64
	LoadFactor                              float64
	index                                   *prefixIndex
}

// NewPrefixCache returns the cache-aware policy remembering blocksPerEndpoint
// prompt blocks per endpoint.
func NewPrefixCache(cacheWeight, queueWeight, kvWeight, loadFactor float64, blocksPerEndpoint int) *PrefixCacheSelection {
	return &PrefixCacheSelection{CacheWeight: cacheWeight, QueueWeight: queueWeight, KVCacheWeight: kvWeight,
		LoadFactor: loadFactor, index: newPrefixIndex(blocksPerEndpoint)}
}

func (s *PrefixCacheSelection) Select(p *Pool, r *Request) *Endpoint {
	least, fewest := lowestLoad(p, r, s.QueueWeight, s.KVCacheWeight)
	if least == nil || len(r.Blocks) == 0 {
		if r.Adapter != "" {
			return preferAdapter(p, r, least, fewest, s.LoadFactor, s.QueueWeight, s.KVCacheWeight)
		}
		return least
	}
	var found [maxMatches]match
	matches := s.index.match(r.Blocks, &found)
	deepest := 0
	for _, m := range matches {
		deepest = max(deepest, m.depth)
	}
	keyBlocks := min(len(r.Blocks), placementBlocks)
	key := r.Blocks[keyBlocks-1]
	bound := int64(math.Ceil(s.LoadFactor * float64(p.InFlight()+1) / float64(len(p.endpoints))))
	var best *Endpoint
	if deepest < keyBlocks {
		best = p.walkRing(r, key, min(bound, fewest+1))
	} else {
		best = s.cached(p, r, matches, keyBlocks, bound, p.walkRing(r, key, bound))
	}
	if best == nil {
		best = least
	}
	if r.Adapter != "" {
		best = preferAdapter(p, r, best, fewest, s.LoadFactor, s.QueueWeight, s.KVCacheWeight)
	}
	s.index.record(best.Host, r.Blocks, time.Now())
	return best
}

// score is the load-aware score of h with n requests in flight.
func (s *PrefixCacheSelection) score(h *health.Host, n int64) float64 {
	waiting, kv := h.QueueAndKVCache()
	return float64(n) + s.QueueWeight*waiting + s.KVCacheWeight*kv
}

// cached picks, for a prompt whose key (its first keyBlocks blocks) some
// endpoints were sent, among those below bound and the ring's choice
// (which walkRing bounded), the one with the lowest load less cache credit;
// nil if there is none. An endpoint that matches less than the key shares
// only a preamble common to many prompts: it is no place for this one,
// or a prefix whose pod is busy would scatter over every pod that was sent
// the preamble.
func (s *PrefixCacheSelection) cached(p *Pool, r *Request, matches []match, keyBlocks int, bound int64, ring *Endpoint) *Endpoint {
	nblocks := float64(len(r.Blocks))
	credit := func(h *health.Host) float64 {
		for _, m := range matches {
			if m.host == h {
				return s.CacheWeight * float64(m.depth) / nblocks
			}
		}
		return 0
	}
	best, least := ring, math.Inf(1)
	if ring != nil {
		least = s.score(ring.Host, ring.Host.InFlight()) - credit(ring.Host)
	}
	for _, m := range matches {
		if m.depth < keyBlocks {
			continue
		}
		e := p.endpointOf(m.host)
		if e == nil || e == ring {
			continue
		}
		n, ok := p.candidate(e, r)
		if !ok || n >= bound {
			continue
		}
		if score := s.score(m.host, n) - credit(m.host); score < least {
			best, least = e, score
		}
	}
	return best
}

// maxMatches bounds the endpoints a prompt's first block is looked up on.
const maxMatches = 16

type match struct {
	host  *health.Host
	depth int // leading blocks the host was sent
}

// prefixIndex remembers which prompt blocks went to which endpoints.
type prefixIndex struct {
	capacity int

	mu      sync.Mutex
	blocks  map[uint64][]*health.Host // block hash → hosts it went to
	hosts   map[*health.Host]*hostBlocks
	records int
}

// hostBlocks are one endpoint's blocks, most recently sent first.
type hostBlocks struct {
	lru      *list.List // of uint64
	elements map[uint64]*list.Element
	last     time.Time
}

func newPrefixIndex(capacity int) *prefixIndex {
	return &prefixIndex{capacity: capacity, blocks: map[uint64][]*health.Host{}, hosts: map[*health.Host]*hostBlocks{}}
}

// match returns, for each endpoint the first block went to (at most
// maxMatches), how many leading blocks of blocks went there.
func (x *prefixIndex) match(blocks []uint64, out *[maxMatches]match) []match {
	x.mu.Lock()
	defer x.mu.Unlock()
	m := out[:0]
	for _, h := range x.blocks[blocks[0]] {
		if len(m) == maxMatches {
			break
		}
		m = append(m, match{host: h, depth: 1})
	}
	for i := 1; i < len(blocks) && len(m) > 0; i++ {
		hosts := x.blocks[blocks[i]]
		if len(hosts) == 0 {
			break
		}
		extended := false
		for j := range m {
			if m[j].depth == i && containsHost(hosts, m[j].host) {
				m[j].depth++
				extended = true
			}
		}
		if !extended {
			break
		}
	}
	return m
}

func containsHost(hosts []*health.Host, h *health.Host) bool {
	for _, x := range hosts {
		if x == h {
			return true
		}
	}
	return false
}

// sweepEvery is how many records pass between drops of endpoints that have
// been sent nothing for idleHost (they left their pools).
const (
	sweepEvery = 4096
	idleHost   = 10 * time.Minute
)

// record notes that blocks went to h. The first block is the most recently
// used, so that a prompt's tail is forgotten before its head, as engines
// evict.
func (x *prefixIndex) record(h *health.Host, blocks []uint64, now time.Time) {
	x.mu.Lock()
	defer x.mu.Unlock()
	hb := x.hosts[h]
	if hb == nil {
		hb = &hostBlocks{lru: list.New(), elements: map[uint64]*list.Element{}}
		x.hosts[h] = hb
	}
	hb.last = now
	for i := len(blocks) - 1; i >= 0; i-- {
		b := blocks[i]
		if el, ok := hb.elements[b]; ok {
			hb.lru.MoveToFront(el)
			continue
		}
		hb.elements[b] = hb.lru.PushFront(b)
		x.blocks[b] = append(x.blocks[b], h)
		if hb.lru.Len() > x.capacity {
			x.forget(h, hb, hb.lru.Back())
		}
	}
	if x.records++; x.records%sweepEvery == 0 {
		for other, ob := range x.hosts {
			if now.Sub(ob.last) > idleHost {
				for ob.lru.Len() > 0 {
					x.forget(other, ob, ob.lru.Back())
				}
				delete(x.hosts, other)
			}
		}
	}
}

// forget drops one of h's blocks.
func (x *prefixIndex) forget(h *health.Host, hb *hostBlocks, el *list.Element) {
	b := hb.lru.Remove(el).(uint64)
	delete(hb.elements, b)
	hosts := x.blocks[b]
	for i, o := range hosts {
		if o == h {
			hosts[i] = hosts[len(hosts)-1]
			hosts = hosts[:len(hosts)-1]
			break
		}
	}
	if len(hosts) == 0 {
		delete(x.blocks, b)
	} else {
		x.blocks[b] = hosts
	}
}
