package balance

import (
	"fmt"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/capstan-dev/capstan/router/health"
)

func prompt(parts ...string) []byte { return []byte(strings.Join(parts, "")) }

func text(seed string, n int) string {
	return strings.Repeat(seed+" ", n/(len(seed)+1)+1)[:n]
}

func TestPromptBlocks(t *testing.T) {
	shared := text("shared", 2*PromptBlockBytes)
	a := PromptBlocks(nil, prompt(shared, text("alpha", PromptBlockBytes)))
	b := PromptBlocks(nil, prompt(shared, text("beta", PromptBlockBytes)))
	if len(a) != 3 || len(b) != 3 || !slices.Equal(a[:2], b[:2]) || a[2] == b[2] {
		t.Errorf("blocks %x and %x: want 3 each, the first 2 equal, the last different", a, b)
	}
	// A later block's hash depends on the blocks before it.
	c := PromptBlocks(nil, prompt(text("other", PromptBlockBytes), text("shared", PromptBlockBytes)))
	if c[1] == a[1] {
		t.Error("equal blocks after different ones hash the same")
	}
	if got := PromptBlocks(nil, prompt(shared, "tail")); len(got) != 2 {
		t.Errorf("a partial last block gave %d blocks, want the 2 full ones", len(got))
	}
	if got := PromptBlocks(nil, []byte("short")); len(got) != 1 {
		t.Errorf("a prompt shorter than a block gave %d blocks, want 1", len(got))
	}
	if got := PromptBlocks(nil, make([]byte, (MaxPromptBlocks+10)*PromptBlockBytes)); len(got) != MaxPromptBlocks {
		t.Errorf("a long prompt gave %d blocks, want the cap %d", len(got), MaxPromptBlocks)
	}
}

func prefixCache(t testing.TB) *PrefixCacheSelection {
	t.Helper()
	return mustNew(t, PrefixCache).(*PrefixCacheSelection)
}

// A prompt goes where prompts sharing its prefix went, even when a
// different endpoint's prompt came last.
func TestPrefixCacheFollowsThePrefix(t *testing.T) {
	s := prefixCache(t)
	p := testPool(8, PoolOptions{})
	group := func(g, q int) *Request {
		return &Request{Blocks: PromptBlocks(nil, prompt(text(fmt.Sprintf("group%d", g), 8*PromptBlockBytes), text(fmt.Sprintf("question%d", q), PromptBlockBytes)))}
	}
	home := map[int]int{}
	for g := range 4 {
		home[g] = index(p, s.Select(p, group(g, 0)))
	}
	for q := 1; q < 20; q++ {
		for g := range 4 {
			if got := index(p, s.Select(p, group(g, q))); got != home[g] {
				t.Fatalf("group %d question %d went to %d, want its prefix's endpoint %d", g, q, got, home[g])
			}
		}
	}
}

// A prompt goes where its prefix went before, not only where the ring
// would place it: what the index remembers wins over the ring.
func TestPrefixCacheRemembersOffTheRing(t *testing.T) {
	p := testPool(8, PoolOptions{})
	r := PromptBlocks(nil, prompt(text("document", 16*PromptBlockBytes)))
	ring := index(p, prefixCache(t).Select(p, &Request{Blocks: r}))
	s := prefixCache(t)
	elsewhere := (ring + 3) % 8
	s.index.record(p.endpoints[elsewhere].Host, r, time.Now())
	if got := index(p, s.Select(p, &Request{Blocks: r})); got != elsewhere {
		t.Errorf("the prompt went to %d, want %d where it was sent before (the ring's is %d)", got, elsewhere, ring)
	}
}

// A prefix whose endpoint is loaded spills: the cache credit goes only to
// endpoints below the load bound.
func TestPrefixCacheSpillsAHotPrefix(t *testing.T) {
	s := prefixCache(t)
	p := testPool(4, PoolOptions{})
	r := &Request{Blocks: PromptBlocks(nil, prompt(text("hot", 16*PromptBlockBytes)))}
	home := index(p, s.Select(p, r))
	setInFlight(p, home, 10)
	for i := range 4 {
		if i != home {
			setInFlight(p, i, 1)
		}
	}
	if got := index(p, s.Select(p, r)); got == home {
		t.Errorf("the hot prefix stayed on endpoint %d with 10 in flight against 1 elsewhere", home)
	}
}

// Router replicas do not share an index, yet place a new prefix on the same
// endpoint, and prompts that share only a leading instruction block are
// still spread by what follows it.
func TestPrefixCacheReplicasAgree(t *testing.T) {
	p := testPool(8, PoolOptions{})
	a, b := prefixCache(t), prefixCache(t)
	instructions := text("You are a careful assistant. Follow the policy.", 4*PromptBlockBytes)
	used := map[int]bool{}
	for g := range 16 {
		r := PromptBlocks(nil, prompt(instructions, text(fmt.Sprintf("context of group %d", g), 8*PromptBlockBytes)))
		ea := index(p, a.Select(p, &Request{Blocks: r}))
		eb := index(p, b.Select(p, &Request{Blocks: r}))
		if ea != eb {
			t.Errorf("group %d: replica a picked %d, b %d", g, ea, eb)
		}
		used[ea] = true
	}
	if len(used) < 4 {
		t.Errorf("16 groups behind one instruction block went to %d of 8 endpoints, want them spread", len(used))
	}
}

// Two replicas whose pods are loaded differently spill a hot prefix to the
// same next pod: the ring's, not each one's least busy.
func TestPrefixCacheReplicasSpillAlike(t *testing.T) {
	r := PromptBlocks(nil, prompt(text("hot", 16*PromptBlockBytes)))
	spill := func(quiet int) int {
		s, p := prefixCache(t), testPool(8, PoolOptions{})
		home := index(p, s.Select(p, &Request{Blocks: r}))
		for i := range 8 {
			setInFlight(p, i, 2)
		}
		setInFlight(p, home, 10)
		setInFlight(p, (home+quiet)%8, 0) // each replica's own least busy pod
		for range 22 {
			p.Admit()
		}
		return index(p, s.Select(p, &Request{Blocks: r}))
	}
	a, b := spill(1), spill(2)
	if a != b {
		t.Errorf("the hot prefix spilled to %d on one replica and %d on the other", a, b)
	}
}

// The index keeps at most its capacity of blocks per endpoint, forgetting
// a prompt's tail before its head, and drops endpoints sent nothing for a
// long time.
func TestPrefixIndexIsBounded(t *testing.T) {
	x := newPrefixIndex(10)
	h := health.NewHost("198.18.0.1:8000", &health.EjectionPolicy{})
	now := time.Now()
	first := PromptBlocks(nil, prompt(text("first", 8*PromptBlockBytes)))
	x.record(h, first, now)
	x.record(h, PromptBlocks(nil, prompt(text("second", 4*PromptBlockBytes))), now)
	if n := x.tracked(); n != 10 {
		t.Errorf("tracked %d blocks, want the capacity of 10", n)
	}
	var found [maxMatches]match
	if m := x.match(first, &found); len(m) != 1 || m[0].depth != 6 {
		t.Errorf("the first prompt matches %+v, want its first 6 blocks (its last 2 forgotten)", m)
	}
	other := health.NewHost("198.18.0.2:8000", &health.EjectionPolicy{})
	for i := range sweepEvery {
		x.record(other, PromptBlocks(nil, []byte(fmt.Sprint(i))), now.Add(2*idleHost))
	}
	if _, ok := x.hosts[h]; ok || len(x.match(first, &found)) != 0 {
		t.Error("an endpoint sent nothing for longer than idleHost was not dropped")
	}
	if len(x.blocks) != x.tracked() {
		t.Errorf("%d block entries for %d tracked blocks", len(x.blocks), x.tracked())
	}
}

// BenchmarkPrefixCacheSelect picks among 1,000 endpoints with 100,000
// blocks tracked, for a 64-block prompt of which half is a known prefix.
func BenchmarkPrefixCacheSelect(b *testing.B) {
	s := NewPrefixCache(DefaultCacheWeight, DefaultQueueWeight, DefaultKVCacheWeight, DefaultLoadFactor, 100)
	p := testPool(1000, PoolOptions{})
	p.Ring()
	for i := range 1000 {
		s.index.record(p.endpoints[i].Host, PromptBlocks(nil, prompt(text(fmt.Sprint("endpoint", i), 100*PromptBlockBytes))), time.Now())
	}
	if n := s.index.tracked(); n != 100_000 {
		b.Fatalf("tracked %d", n)
	}
	shared := text("endpoint7", 32*PromptBlockBytes)
	reqs := make([]*Request, 64)
	for i := range reqs {
		reqs[i] = &Request{Blocks: PromptBlocks(nil, prompt(shared, text(fmt.Sprint("q", i), 32*PromptBlockBytes)))}
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if s.Select(p, reqs[i%len(reqs)]) == nil {
			b.Fatal("no endpoint")
		}
		i++
	}
}

// A prompt no endpoint has seen goes to its ring endpoint only if no
// endpoint has fewer requests in flight.
func TestPrefixCacheBalancesNewPrompts(t *testing.T) {
	s := prefixCache(t)
	p := testPool(8, PoolOptions{})
	for i := range 8 {
		setInFlight(p, i, 2)
	}
	setInFlight(p, 5, 1)
	for range 15 {
		p.Admit()
	}
	for i := range 200 {
		r := &Request{Blocks: PromptBlocks(nil, prompt(text(fmt.Sprint("unique", i), 4*PromptBlockBytes)))}
		if got := index(p, s.Select(p, r)); got != 5 {
			t.Fatalf("new prompt %d went to endpoint %d with 2 in flight, not to 5 with 1", i, got)
		}
	}
}

// tracked is the number of (block, endpoint) pairs remembered.
func (x *prefixIndex) tracked() int {
	x.mu.Lock()
	defer x.mu.Unlock()
	n := 0
	for _, hb := range x.hosts {
		n += hb.lru.Len()
	}
	return n
}

// A group whose pod is busier than the rest stays there while it is under
// the load bound, even though every pod was sent the instruction block all
// groups start with: sharing the preamble does not make a pod a place for
// the group.
func TestPrefixCacheIgnoresACommonPreamble(t *testing.T) {
	s := prefixCache(t)
	p := testPool(8, PoolOptions{})
	instructions := text("You are a careful assistant. Follow the policy.", 6*PromptBlockBytes)
	group := func(g, q int) *Request {
		return &Request{Blocks: PromptBlocks(nil, prompt(instructions, text(fmt.Sprintf("context of group %d", g), 8*PromptBlockBytes), text(fmt.Sprint("question", q), PromptBlockBytes)))}
	}
	r := group(0, 0)
	home := index(p, p.walkRing(r, r.Blocks[placementBlocks-1], math.MaxInt64))
	s.index.record(p.endpoints[home].Host, r.Blocks, time.Now())
	for i := range 8 {
		if i != home {
			s.index.record(p.endpoints[i].Host, group(i+1, 0).Blocks, time.Now())
		}
		setInFlight(p, i, 12)
	}
	setInFlight(p, home, 15)
	for range 8*12 + 3 {
		p.Admit()
	}
	for q := 1; q < 10; q++ {
		if got := index(p, s.Select(p, group(0, q))); got != home {
			t.Fatalf("question %d of the group went to %d, which was sent only the instructions; want the group's pod %d (15 in flight against 12, under the bound)", q, got, home)
		}
	}
}
