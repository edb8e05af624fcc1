package balance

import (
	"fmt"
	"testing"

	"github.com/capstan-dev/capstan/router/health"
)

// The policies that weigh engine state and what they were told.
var loraPolicies = []Policy{LoadAware, PrefixCache}

// lora gives endpoint i of p an engine LoRA state: the adapters its running
// requests use, of slots.
func lora(p *Pool, i int, slots int, running ...string) {
	p.endpoints[i].Host.SetLoRA(health.NewLoRAState(running, nil, slots))
}

// requests for an adapter with and without a prompt, as the cache-aware
// policy sees them.
func adapterRequests(adapter string) map[string]*Request {
	return map[string]*Request{
		"no prompt": {Adapter: adapter},
		"a prompt":  {Adapter: adapter, Blocks: PromptBlocks(nil, prompt(text("system", 4*PromptBlockBytes)))},
	}
}

func TestAdapterAffinity(t *testing.T) {
	cases := map[string]struct {
		setup func(p *Pool)
		// want is the endpoint every pick must be, or -1 for picks among
		// the endpoints in spread (each of them, for a request without a
		// prompt).
		want   int
		spread []int
	}{
		"where the adapter runs": {
			setup: func(p *Pool) { lora(p, 0, 2, "b"); lora(p, 1, 2, "c"); lora(p, 2, 2, "a"); lora(p, 3, 2) },
			want:  2,
		},
		"where it waits": {
			setup: func(p *Pool) {
				lora(p, 0, 1, "b")
				p.endpoints[1].Host.SetLoRA(health.NewLoRAState([]string{"c"}, []string{"a"}, 1))
				lora(p, 2, 1, "d")
				lora(p, 3, 1, "e")
			},
			want: 1,
		},
		"where it runs though busier, within the slack": {
			setup: func(p *Pool) {
				lora(p, 0, 1, "b")
				lora(p, 1, 1, "a")
				setInFlight(p, 1, adapterSlack-1)
				lora(p, 2, 1, "c")
				lora(p, 3, 1, "d")
			},
			want: 1,
		},
		"a free slot before a swap": {
			setup: func(p *Pool) {
				lora(p, 0, 2, "b", "c")
				lora(p, 1, 2, "d", "e")
				lora(p, 2, 2, "f")
				lora(p, 3, 2, "g", "h")
			},
			want: 2,
		},
		"no LoRA state before a swap": {
			setup: func(p *Pool) { lora(p, 0, 2, "b", "c"); lora(p, 1, 2, "d", "e"); lora(p, 3, 2, "g", "h") },
			want:  2,
		},
		"where it runs before no LoRA state": {
			setup: func(p *Pool) { lora(p, 3, 2, "a") },
			want:  3,
		},
		"not onto a pod past the bound": {
			setup: func(p *Pool) {
				lora(p, 0, 1, "a")
				setInFlight(p, 0, adapterSlack)
				for i := 1; i < 4; i++ {
					lora(p, i, 1, "z")
				}
			},
			want: -1, spread: []int{1, 2, 3},
		},
		"no LoRA state anywhere: by load alone": {
			setup: func(p *Pool) { setInFlight(p, 0, 1) },
			want:  -1, spread: []int{1, 2, 3},
		},
		"free slots everywhere: by load alone": {
			setup: func(p *Pool) {
				for i := range 4 {
					lora(p, i, 4, "b")
				}
				setInFlight(p, 3, 1)
			},
			want: -1, spread: []int{0, 1, 2},
		},
	}
	for _, policy := range loraPolicies {
		for name, tc := range cases {
			for kind, r := range adapterRequests("a") {
				t.Run(fmt.Sprintf("%s/%s/%s", policy, name, kind), func(t *testing.T) {
					s := mustNew(t, policy)
					p := testPool(4, PoolOptions{})
					tc.setup(p)
					c := counts(p, s, r, 300)
					for i, n := range c {
						switch {
						case tc.want >= 0 && i != tc.want && n > 0:
							t.Fatalf("picks %v; want all on endpoint %d", c, tc.want)
						case tc.want < 0 && contains(tc.spread, i) && n == 0 && len(r.Blocks) == 0:
							// (The cache-aware policy keeps one prompt on
							// one endpoint.)
							t.Fatalf("picks %v; want a spread over %v", c, tc.spread)
						case tc.want < 0 && !contains(tc.spread, i) && n > 0:
							t.Fatalf("picks %v; want none on endpoint %d", c, i)
						}
					}
				})
			}
		}
	}
}

func contains(xs []int, x int) bool {
	for _, y := range xs {
		if x == y {
			return true
		}
	}
	return false
}

// A hot adapter spreads: as requests pile up where it is active, the next
// ones go to the pods with a free slot, and to pods that must swap only
// when those are as busy.
func TestAdapterAffinityIsBoundedByLoad(t *testing.T) {
	for _, policy := range loraPolicies {
		t.Run(string(policy), func(t *testing.T) {
			s := mustNew(t, policy)
			p := testPool(4, PoolOptions{})
			lora(p, 0, 2, "a")
			lora(p, 1, 2)
			lora(p, 2, 2, "b", "c")
			lora(p, 3, 2, "d", "e")
			r := &Request{Adapter: "a"}
			var picks [4]int
			for range 40 {
				e := s.Select(p, r)
				if !p.Admit() || !p.Acquire(e) {
					t.Fatal("not admitted")
				}
				picks[index(p, e)]++
			}
			// Bound: max(1.25 × 40/4, fewest + 4) = 13 in flight.
			if picks[0] < picks[1] || picks[1] < picks[2] || picks[1] < picks[3] || picks[0] > 13 {
				t.Errorf("40 requests in flight went %v; want most where the adapter runs (at most 13), then to the free slot, then the rest", picks)
			}
			if picks[2]+picks[3] == 0 {
				t.Errorf("40 requests in flight went %v; want the pods that must swap used once the others are busy", picks)
			}
		})
	}
}

// A request for a base model ignores the engines' LoRA state.
func TestBaseModelRequestsIgnoreLoRAState(t *testing.T) {
	for _, policy := range loraPolicies {
		t.Run(string(policy), func(t *testing.T) {
			s := mustNew(t, policy)
			p := testPool(4, PoolOptions{})
			lora(p, 2, 2, "a")
			lora(p, 0, 2, "b", "c")
			c := counts(p, s, &Request{}, 400)
			for _, n := range c {
				if n == 0 {
					t.Fatalf("picks %v; want a spread over every endpoint", c)
				}
			}
		})
	}
}

// Affinity never picks an endpoint the request may not use.
func TestAdapterAffinitySkipsUnavailable(t *testing.T) {
	for _, policy := range loraPolicies {
		t.Run(string(policy), func(t *testing.T) {
			s := mustNew(t, policy)
			p := testPool(4, PoolOptions{MaxPerEndpoint: 2})
			for i := range 4 {
				lora(p, i, 1, "z")
			}
			lora(p, 0, 1, "a")
			lora(p, 1, 1, "a")
			lora(p, 2, 1, "a")
			p.endpoints[0].Host.Fail() // ejected
			setInFlight(p, 1, 2)       // full
			r := &Request{Adapter: "a"}
			r.Tried(&p.endpoints[2]) // tried
			for range 100 {
				if got := index(p, s.Select(p, r)); got != 3 {
					t.Fatalf("picked %d; want 3, the only endpoint available", got)
				}
			}
		})
	}
}

// BenchmarkSelectAdapter is BenchmarkSelect for requests for a LoRA
// adapter, every endpoint reporting its LoRA state: eight adapters, two
// slots each.
func BenchmarkSelectAdapter(b *testing.B) {
	for _, policy := range loraPolicies {
		for _, n := range []int{10, 100, 1000} {
			b.Run(fmt.Sprintf("%s/endpoints=%d", policy, n), func(b *testing.B) {
				s := mustNew(b, policy)
				p := testPool(n, PoolOptions{})
				p.Ring()
				for i := range n {
					setInFlight(p, i, int64(i%7))
					p.endpoints[i].Host.SetEngineLoad(&health.EngineLoad{Waiting: float64(i % 3), KVCacheUsage: float64(i%10) / 10})
					lora(p, i, 2, fmt.Sprint("adapter-", i%8), fmt.Sprint("adapter-", (i+3)%8))
				}
				reqs := make([]*Request, 8)
				for i := range reqs {
					reqs[i] = &Request{Adapter: fmt.Sprint("adapter-", i)}
				}
				b.ReportAllocs()
				i := 0
				for b.Loop() {
					if s.Select(p, reqs[i%len(reqs)]) == nil {
						b.Fatal("no endpoint")
					}
					i++
				}
			})
		}
	}
}
