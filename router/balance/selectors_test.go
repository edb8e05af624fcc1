package balance

import (
	"fmt"
	"math"
	"strconv"
	"testing"
	"time"

	"github.com/capstan-dev/capstan/router/health"
)

// testPool returns a pool of n endpoints 198.18.0.<i>:8000 with fresh hosts.
func testPool(n int, opts PoolOptions) *Pool {
	eps := make([]Endpoint, n)
	policy := &health.EjectionPolicy{Base: time.Minute, Max: time.Minute}
	for i := range eps {
		addr := fmt.Sprintf("198.18.%d.%d:8000", i/250, i%250+1)
		eps[i] = Endpoint{Address: addr, Pod: "ns/pod-" + strconv.Itoa(i), Host: health.NewHost(addr, policy)}
	}
	return NewPool(eps, opts)
}

// setInFlight sets endpoint i's in-flight count.
func setInFlight(p *Pool, i int, n int64) {
	h := p.endpoints[i].Host
	for h.InFlight() < n {
		h.Begin()
	}
	for h.InFlight() > n {
		h.End()
	}
}

func index(p *Pool, e *Endpoint) int {
	if e == nil {
		return -1
	}
	for i := range p.endpoints {
		if &p.endpoints[i] == e {
			return i
		}
	}
	panic("endpoint not in pool")
}

func mustNew(t testing.TB, policy Policy) Selector {
	t.Helper()
	s, err := New(policy, Options{LoadFactor: DefaultLoadFactor, QueueWeight: DefaultQueueWeight, KVCacheWeight: DefaultKVCacheWeight,
		CacheWeight: DefaultCacheWeight, BlocksPerEndpoint: DefaultBlocksPerEndpoint})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// counts picks many times and returns how often each endpoint was picked.
func counts(p *Pool, s Selector, r *Request, picks int) []int {
	c := make([]int, p.Len())
	for range picks {
		if i := index(p, s.Select(p, r)); i >= 0 {
			c[i]++
		}
	}
	return c
}

// Every policy skips endpoints that are ejected, full or already tried, and
// returns nil when none is left.
func TestEveryPolicySkipsUnavailable(t *testing.T) {
	for _, policy := range Policies {
		t.Run(string(policy), func(t *testing.T) {
			s := mustNew(t, policy)
			p := testPool(4, PoolOptions{MaxPerEndpoint: 2})
			p.endpoints[0].Host.Fail() // ejected
			setInFlight(p, 1, 2)       // full
			r := &Request{HasPrefix: true, PrefixHash: 42, HasSession: true, SessionHash: 42}
			r.Tried(&p.endpoints[2]) // tried
			for range 200 {
				if got := index(p, s.Select(p, r)); got != 3 {
					t.Fatalf("picked endpoint %d, want 3, the only available one", got)
				}
			}
			r.Tried(&p.endpoints[3])
			if e := s.Select(p, r); e != nil {
				t.Fatalf("picked %s with every endpoint unavailable", e.Address)
			}
			if got, want := p.Why(r), (Unavailable{Tried: 2, Full: 1, Ejected: 1}); got != want {
				t.Errorf("Why = %+v, want %+v", got, want)
			}
			// As a last resort, ejection can be ignored; limits and tries cannot.
			r.IgnoreEjection = true
			if got := index(p, s.Select(p, r)); got != 0 {
				t.Errorf("ignoring ejection picked endpoint %d, want the ejected 0", got)
			}
			if e := s.Select(NewPool(nil, PoolOptions{}), &Request{}); e != nil {
				t.Error("picked from an empty pool")
			}
		})
	}
}

func TestLeastRequests(t *testing.T) {
	p := testPool(5, PoolOptions{})
	for i, n := range []int64{3, 1, 4, 1, 5} {
		setInFlight(p, i, n)
	}
	c := counts(p, LeastRequestsSelection{}, &Request{}, 20000)
	if c[0]+c[2]+c[4] != 0 {
		t.Fatalf("picked busier endpoints: %v", c)
	}
	// Ties are broken uniformly.
	for _, i := range []int{1, 3} {
		if math.Abs(float64(c[i])-10000) > 500 {
			t.Errorf("tied endpoints picked %v times, want about 10000 each", c)
		}
	}
}

func TestLeastRequestsTiesAreUniform(t *testing.T) {
	p := testPool(10, PoolOptions{})
	c := counts(p, LeastRequestsSelection{}, &Request{}, 50000)
	for i, n := range c {
		if math.Abs(float64(n)-5000) > 400 {
			t.Errorf("endpoint %d picked %d times of 50000, want about 5000 (all: %v)", i, n, c)
		}
	}
}

func TestPowerOfTwoNeverPicksTheBusiest(t *testing.T) {
	p := testPool(4, PoolOptions{})
	for i, n := range []int64{1, 2, 3, 9} {
		setInFlight(p, i, n)
	}
	c := counts(p, PowerOfTwoSelection{}, &Request{}, 12000)
	if c[3] != 0 {
		t.Errorf("picked the busiest endpoint %d times: %v", c[3], c)
	}
	// Endpoint 0 wins every pair it is in: 3 of the 6 pairs.
	if c[0] < c[1] || c[1] < c[2] || math.Abs(float64(c[0])-6000) > 500 {
		t.Errorf("picks %v do not favour the least busy (want about 6000, 4000, 2000, 0)", c)
	}
}

func TestRoundRobinTakesTurns(t *testing.T) {
	p := testPool(3, PoolOptions{})
	s := RoundRobinSelection{}
	var got []int
	for range 6 {
		got = append(got, index(p, s.Select(p, &Request{})))
	}
	if fmt.Sprint(got) != "[0 1 2 0 1 2]" {
		t.Errorf("order %v, want [0 1 2 0 1 2]", got)
	}
	p.endpoints[1].Host.Fail()
	got = got[:0]
	for range 4 {
		got = append(got, index(p, s.Select(p, &Request{})))
	}
	if fmt.Sprint(got) != "[0 2 2 0]" {
		t.Errorf("order with endpoint 1 ejected %v, want [0 2 2 0]", got)
	}
}

func TestRandomIsUniform(t *testing.T) {
	p := testPool(4, PoolOptions{})
	setInFlight(p, 0, 100) // random ignores load
	c := counts(p, RandomSelection{}, &Request{}, 40000)
	for i, n := range c {
		if math.Abs(float64(n)-10000) > 600 {
			t.Errorf("endpoint %d picked %d times of 40000: %v", i, n, c)
		}
	}
}

func TestLoadAwarePrefersShortQueuesAndFreeCache(t *testing.T) {
	s := mustNew(t, LoadAware)
	for name, tc := range map[string]struct {
		loads    []*health.EngineLoad
		inflight []int64
		want     int
	}{
		"shortest engine queue": {
			loads: []*health.EngineLoad{{Waiting: 5}, {Waiting: 0}, {Waiting: 2}},
			want:  1,
		},
		"free KV cache over a nearly full one": {
			loads: []*health.EngineLoad{{KVCacheUsage: 0.95}, {KVCacheUsage: 0.1}, {KVCacheUsage: 0.5}},
			want:  1,
		},
		"the router's own in-flight count adds to a stale engine queue": {
			loads:    []*health.EngineLoad{{Waiting: 1}, {Waiting: 0}, {Waiting: 1}},
			inflight: []int64{0, 3, 1},
			want:     0,
		},
		"a pod reporting a negative queue is not drawn to": {
			loads:    []*health.EngineLoad{{Waiting: -100}, {Waiting: 0}, {Waiting: 1}},
			inflight: []int64{3, 0, 1},
			want:     1,
		},
		"in flight as many as the best score rounded down can still win": {
			loads:    []*health.EngineLoad{{KVCacheUsage: 0.3}, nil, {KVCacheUsage: 0.4}},
			inflight: []int64{0, 2, 0},
			want:     1,
		},
		"a pod without metrics counts only its in-flight requests": {
			loads:    []*health.EngineLoad{{Waiting: 4}, nil, {Waiting: 3}},
			inflight: []int64{0, 2, 0},
			want:     1,
		},
	} {
		t.Run(name, func(t *testing.T) {
			p := testPool(len(tc.loads), PoolOptions{})
			for i, l := range tc.loads {
				p.endpoints[i].Host.SetEngineLoad(l)
			}
			for i, n := range tc.inflight {
				setInFlight(p, i, n)
			}
			for range 100 {
				if got := index(p, s.Select(p, &Request{})); got != tc.want {
					t.Fatalf("picked %d, want %d", got, tc.want)
				}
			}
		})
	}
}

func TestPrefixAffinityIsStickyAndSpreads(t *testing.T) {
	s := mustNew(t, PrefixAffinity)
	p := testPool(8, PoolOptions{})
	used := map[int]bool{}
	for k := range 200 {
		r := &Request{HasPrefix: true, PrefixHash: HashKeyString("system prompt " + strconv.Itoa(k))}
		first := index(p, s.Select(p, r))
		for range 5 {
			if got := index(p, s.Select(p, r)); got != first {
				t.Fatalf("prefix %d went to %d, then %d", k, first, got)
			}
		}
		used[first] = true
	}
	if len(used) != 8 {
		t.Errorf("200 prefixes used %d of 8 endpoints", len(used))
	}
}

// One hot prefix cannot pile more than the load bound onto its pod: with
// in-flight requests held, it spills over to the next endpoints on the ring.
func TestPrefixAffinityBoundsLoad(t *testing.T) {
	s := PrefixAffinitySelection{LoadFactor: 1.25}
	p := testPool(4, PoolOptions{})
	r := &Request{HasPrefix: true, PrefixHash: HashKeyString("hot")}
	home := index(p, s.Select(p, r))
	for range 40 {
		e := s.Select(p, r)
		if !p.Admit() || !p.Acquire(e) {
			t.Fatal("Admit or Acquire failed without a limit")
		}
	}
	// 40 in flight over 4 endpoints: the bound is ceil(1.25 × 41/4) = 13.
	for i, e := range p.endpoints {
		if n := e.Host.InFlight(); n > 13 {
			t.Errorf("endpoint %d has %d in flight, over the bound 13", i, n)
		}
	}
	if n := p.endpoints[home].Host.InFlight(); n < 10 {
		t.Errorf("the prefix's home endpoint got only %d of 40", n)
	}
	if p.InFlight() != 40 {
		t.Errorf("pool in flight = %d, want 40", p.InFlight())
	}
}

// Removing an endpoint moves only the keys it held.
func TestRingIsConsistent(t *testing.T) {
	s := SessionAffinitySelection{}
	before := testPool(10, PoolOptions{})
	afterEps := append([]Endpoint(nil), before.endpoints[:4]...)
	afterEps = append(afterEps, before.endpoints[5:]...) // endpoint 4 leaves
	after := NewPool(afterEps, PoolOptions{})
	moved := 0
	for k := range 2000 {
		r := &Request{HasSession: true, SessionHash: HashKeyString("session-" + strconv.Itoa(k))}
		a, b := s.Select(before, r), s.Select(after, r)
		if a.Address != b.Address {
			if a.Address != before.endpoints[4].Address {
				t.Fatalf("session %d moved from %s to %s though %s stayed", k, a.Address, b.Address, a.Address)
			}
			moved++
		}
	}
	if moved < 100 || moved > 350 {
		t.Errorf("%d of 2000 sessions were on the removed endpoint, want about 200", moved)
	}
}

func TestSessionAffinityFollowsTheRingWhenItsEndpointFails(t *testing.T) {
	s := SessionAffinitySelection{}
	p := testPool(5, PoolOptions{})
	r := &Request{HasSession: true, SessionHash: HashKeyString("conversation-7")}
	home := s.Select(p, r)
	setInFlight(p, index(p, home), 50) // busy is fine: sessions stick
	if got := s.Select(p, r); got != home {
		t.Fatalf("a busy home endpoint lost its session to %s", got.Address)
	}
	home.Host.Fail()
	next := s.Select(p, r)
	if next == home || next == nil {
		t.Fatal("session stayed on an ejected endpoint")
	}
	for range 20 {
		if got := s.Select(p, r); got != next {
			t.Fatalf("with its home ejected the session moved to %s, then %s", next.Address, got.Address)
		}
	}
	// Without a session id the request goes to the least busy endpoint.
	if got := s.Select(p, &Request{}); got == home {
		t.Error("a request without a session went to the busy, ejected endpoint")
	}
}

func TestNew(t *testing.T) {
	for _, policy := range Policies {
		if _, err := New(policy, Options{LoadFactor: 1.25, BlocksPerEndpoint: 1}); err != nil {
			t.Errorf("New(%s): %v", policy, err)
		}
		if !ValidPolicy(policy) {
			t.Errorf("ValidPolicy(%s) = false", policy)
		}
	}
	if _, err := New("fastest", Options{}); err == nil {
		t.Error("New accepted an unknown policy")
	}
	if _, err := New(PrefixAffinity, Options{LoadFactor: 1}); err == nil {
		t.Error("New accepted a load factor of 1, which leaves no room above the average")
	}
	if _, err := New(PrefixCache, Options{LoadFactor: 1.25}); err == nil {
		t.Error("New accepted a prefix cache of no blocks")
	}
	if !NeedsRing(PrefixAffinity) || !NeedsRing(PrefixCache) || !NeedsRing(SessionAffinity) || NeedsRing(LeastRequests) {
		t.Error("NeedsRing is wrong")
	}
}

func TestSelectDoesNotAllocate(t *testing.T) {
	for _, policy := range Policies {
		s := mustNew(t, policy)
		p := testPool(100, PoolOptions{MaxPerEndpoint: 10})
		p.Ring()
		p.endpoints[3].Host.Fail()
		r := &Request{HasPrefix: true, PrefixHash: 7, HasSession: true, SessionHash: 9}
		r.Tried(&p.endpoints[5])
		if n := testing.AllocsPerRun(1000, func() { s.Select(p, r) }); n != 0 {
			t.Errorf("%s: %v allocations per pick, want 0", policy, n)
		}
	}
}

func BenchmarkSelect(b *testing.B) {
	for _, policy := range Policies {
		for _, n := range []int{10, 100, 1000} {
			b.Run(fmt.Sprintf("%s/endpoints=%d", policy, n), func(b *testing.B) {
				s := mustNew(b, policy)
				p := testPool(n, PoolOptions{})
				p.Ring()
				for i := range n {
					setInFlight(p, i, int64(i%7))
					p.endpoints[i].Host.SetEngineLoad(&health.EngineLoad{Waiting: float64(i % 3), KVCacheUsage: float64(i%10) / 10})
				}
				r := &Request{HasPrefix: true, HasSession: true}
				var k uint64
				b.ReportAllocs()
				for b.Loop() {
					k++
					r.PrefixHash, r.SessionHash = k*0x9e3779b97f4a7c15, k*0x9e3779b97f4a7c15
					if s.Select(p, r) == nil {
						b.Fatal("no endpoint")
					}
				}
			})
		}
	}
}

func TestAdmitBoundsThePool(t *testing.T) {
	p := testPool(2, PoolOptions{MaxInFlight: 3, MaxPerEndpoint: 1})
	for i := range 3 {
		if !p.Admit() {
			t.Fatalf("request %d refused under the limit", i+1)
		}
	}
	if p.Admit() {
		t.Error("a fourth request was admitted with MaxInFlight 3")
	}
	p.Done()
	if !p.Admit() {
		t.Error("a request was refused after another finished")
	}
	e := &p.endpoints[0]
	if !p.Acquire(e) || p.Acquire(e) {
		t.Error("the per-endpoint limit of 1 was not enforced")
	}
	p.Release(e)
	if !p.Acquire(e) {
		t.Error("Acquire refused after Release")
	}
}
