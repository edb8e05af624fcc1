package route

import (
	"fmt"
	"net/http/httptest"
	"testing"

	"k8s.io/apimachinery/pkg/types"
)

// BenchmarkRoute measures matching a request against a listener's routes:
// n rules selecting a model by the x-capstan-model header, as a Gateway in
// front of n models has them, and the request matching the last one (the
// whole list is scanned). Matching must not allocate.
func BenchmarkRoute(b *testing.B) {
	for _, n := range []int{10, 100, 1000} {
		b.Run(fmt.Sprintf("rules=%d", n), func(b *testing.B) {
			l := &Listener{Name: "http"}
			var ms []*Match
			for i := range n {
				r := &Rule{Route: types.NamespacedName{Namespace: "ns", Name: "models"}, Index: i}
				r.SetBackends([]RuleBackend{{Weight: 1, Invalid: "x"}})
				ms = append(ms, &Match{
					Path:    must(NewPathMatch(PathPrefix, "/v1")),
					Headers: []HeaderMatch{must(NewHeaderMatch("x-capstan-model", fmt.Sprintf("model-%d", i), false))},
					Rule:    r, Order: Order{Route: r.Route, Rule: i},
				})
			}
			l.AddHost("", ms)
			l.AddHost("api.example.com", ms)
			req := httptest.NewRequest("POST", "/v1/chat/completions", nil)
			req.Header.Set("X-Capstan-Model", fmt.Sprintf("model-%d", n-1))
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				if l.Route(req, RequestHost(req.Host)) == nil {
					b.Fatal("no match")
				}
			}
		})
	}
}

// BenchmarkPick measures a weighted pick among a rule's backends.
func BenchmarkPick(b *testing.B) {
	r := &Rule{}
	r.SetBackends([]RuleBackend{{Weight: 70}, {Weight: 20}, {Weight: 10}})
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if r.Pick() == nil {
				b.Fatal("no pick")
			}
		}
	})
}
