package proxy

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/router/balance"
	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/route"
)

// BenchmarkForward measures one small non-streamed request through the
// handler over loopback HTTP with keep-alive on both sides: the router's own
// cost per request, plus the Go HTTP stacks on both sides of it, with the
// old default balancer and the cache-aware default (which hashes the
// prompt and records it in its index).
func BenchmarkForward(b *testing.B) {
	balancers := map[string]func(*Options){
		"least-requests": func(o *Options) {
			o.Balancing = Balancing{Policy: balance.LeastRequests, Selector: balance.LeastRequestsSelection{}}
		},
		"prefix-cache": func(o *Options) { o.Balancing = prefixCache() },
	}
	for _, name := range []string{"least-requests", "prefix-cache"} {
		b.Run(name, func(b *testing.B) {
			backends := []backend{startBackend(b, "a", ok), startBackend(b, "b", ok)}
			// Holding on, as the router runs by default.
			f := newFixture(b, "llama", backends, func(o *Options) { o.AccessLog = false; balancers[name](o) }, holding(100, time.Minute))
			tr := &http.Transport{MaxIdleConnsPerHost: 256}
			c := &http.Client{Transport: tr}
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					resp, err := c.Post(f.url+"/v1/completions", "application/json", strings.NewReader(completion))
					if err != nil {
						b.Fatal(err)
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != http.StatusOK {
						b.Fatalf("status %d", resp.StatusCode)
					}
				}
			})
		})
	}
}

// BenchmarkGatewayForward is BenchmarkForward through a Gateway listener: a
// rule that selects the model by the x-capstan-model header, so the body is
// decoded for the header before matching.
func BenchmarkGatewayForward(b *testing.B) {
	backends := []backend{startBackend(b, "a", ok), startBackend(b, "b", ok)}
	g := &gatewayFixture{}
	g.fixture = newFixture(b, "unused", nil, func(o *Options) {
		o.AccessLog = false
		o.Balancing = Balancing{Policy: balance.LeastRequests, Selector: balance.LeastRequestsSelection{}}
		// As the router runs with the Gateway API on: a pool may choose
		// the cache-aware policy, so bodies are decoded for its prompt.
		pc := prefixCache()
		o.Balancers = map[balance.Policy]*Balancing{balance.PrefixCache: &pc}
		o.Gateways = func() *route.HTTPTable { return g.table }
	})
	k := types.NamespacedName{Namespace: "ns", Name: "llama"}
	var eps []discovery.Endpoint
	for _, be := range backends {
		eps = append(eps, discovery.Endpoint{Address: be.addr, Pod: types.NamespacedName{Namespace: "ns", Name: be.pod}, Ready: true})
	}
	g.builder.ServiceChanged(k, &discovery.Service{Key: k, Port: "http", Endpoints: eps, Ports: []discovery.Port{{Name: "http", Number: 80, Endpoints: eps}}})
	be := g.builder.SyncBackends([]route.BackendKey{{Service: k, Port: 80}})[route.BackendKey{Service: k, Port: 80}]
	l := &route.Listener{Gateway: types.NamespacedName{Namespace: "ns", Name: "gw"}, Name: "http", Port: 80, Scheme: "http"}
	r := newRule(0, route.RuleBackend{Weight: 1, Backend: be})
	l.AddHost("", []*route.Match{match(r, mustMatch(route.NewPathMatch(route.PathPrefix, "/v1")), mustMatch(route.NewHeaderMatch(ModelHeader, "llama", false)))})
	g.table = route.NewHTTPTable([]*route.Port{route.NewPort(gatewayAddr, false, []*route.Listener{l})})
	url := serveRouter(b, g.handler.GatewayHandler(gatewayAddr))
	tr := &http.Transport{MaxIdleConnsPerHost: 256}
	c := &http.Client{Transport: tr}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			resp, err := c.Post(url+"/v1/completions", "application/json", strings.NewReader(completion))
			if err != nil {
				b.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				b.Fatalf("status %d", resp.StatusCode)
			}
		}
	})
}
