package proxy

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/router/balance"
	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/inferencepool"
	"github.com/capstan-dev/capstan/router/route"
)

// seen is what an upstream of a gateway test received.
type seen struct {
	URI    string      `json:"uri"`
	Host   string      `json:"host"`
	Header http.Header `json:"header"`
	Body   string      `json:"body"`
}

func echoUpstream(t testing.TB, pod string) backend {
	return startBackend(t, pod, func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Upstream", pod)
		json.NewEncoder(w).Encode(seen{URI: r.RequestURI, Host: r.Host, Header: r.Header, Body: string(body)})
	})
}

// gatewayFixture serves one Gateway listener, address gw:80, whose rules a
// test builds, with the router's handler.
type gatewayFixture struct {
	*fixture
	table *route.HTTPTable
	url   string // the Gateway listener's
}

const gatewayAddr = "gw:80"

func newGatewayFixture(t *testing.T, services map[string][]backend, rules func(backends map[string]*route.Backend) map[string][]*route.Match, opts ...option) *gatewayFixture {
	t.Helper()
	g := &gatewayFixture{}
	g.fixture = newFixture(t, "unused", nil, append([]option{func(o *Options) {
		o.Gateways = func() *route.HTTPTable { return g.table }
	}}, opts...)...)
	var keys []route.BackendKey
	for name, bs := range services {
		k := types.NamespacedName{Namespace: "ns", Name: name}
		var eps []discovery.Endpoint
		for _, b := range bs {
			eps = append(eps, discovery.Endpoint{Address: b.addr, Pod: types.NamespacedName{Namespace: "ns", Name: b.pod}, Ready: b.ready})
		}
		g.builder.ServiceChanged(k, &discovery.Service{Key: k, Port: "http", Endpoints: eps, Ports: []discovery.Port{{Name: "http", Number: 80, Endpoints: eps}}})
		keys = append(keys, route.BackendKey{Service: k, Port: 80})
	}
	got := g.builder.SyncBackends(keys)
	byName := map[string]*route.Backend{}
	for k, b := range got {
		byName[k.Service.Name] = b
	}
	l := &route.Listener{Gateway: types.NamespacedName{Namespace: "ns", Name: "gw"}, Name: "http", Port: 80, Scheme: "http"}
	for host, ms := range rules(byName) {
		l.AddHost(host, ms)
	}
	g.table = route.NewHTTPTable([]*route.Port{route.NewPort(gatewayAddr, false, []*route.Listener{l})})
	g.url = serveRouter(t, g.handler.GatewayHandler(gatewayAddr))
	return g
}

func (g *gatewayFixture) do(method, host, path, contentType, body string, header ...string) (*http.Response, string) {
	g.t.Helper()
	req, err := http.NewRequest(method, g.url+path, strings.NewReader(body))
	if err != nil {
		g.t.Fatal(err)
	}
	req.Host = host
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	c := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := c.Do(req)
	if err != nil {
		g.t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return resp, string(data)
}

func match(rule *route.Rule, path route.PathMatch, headers ...route.HeaderMatch) *route.Match {
	return &route.Match{Path: path, Headers: headers, Rule: rule, Order: route.Order{Route: rule.Route, Rule: rule.Index}}
}

func newRule(index int, backends ...route.RuleBackend) *route.Rule {
	r := &route.Rule{Route: types.NamespacedName{Namespace: "ns", Name: "r"}, Index: index}
	r.SetBackends(backends)
	return r
}

func mustMatch[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func TestGatewaySelectsModelsByHeader(t *testing.T) {
	g := newGatewayFixture(t, map[string][]backend{"llama": {echoUpstream(t, "llama-0")}, "qwen": {echoUpstream(t, "qwen-0")}},
		func(b map[string]*route.Backend) map[string][]*route.Match {
			all := mustMatch(route.NewPathMatch(route.PathPrefix, "/"))
			return map[string][]*route.Match{"": {
				match(newRule(0, route.RuleBackend{Weight: 1, Backend: b["llama"]}), all, mustMatch(route.NewHeaderMatch(ModelHeader, "llama", false))),
				match(newRule(1, route.RuleBackend{Weight: 1, Backend: b["qwen"]}), all, mustMatch(route.NewHeaderMatch(ModelHeader, "qwen", false))),
			}}
		})
	for _, model := range []string{"llama", "qwen"} {
		body := `{"model":"` + model + `","messages":[]}`
		resp, data := g.do("POST", "api.example.com", "/v1/chat/completions", "application/json; charset=utf-8", body, ModelHeader, "spoofed")
		if resp.StatusCode != 200 || resp.Header.Get("X-Upstream") != model+"-0" {
			t.Fatalf("model %s: %d from %s: %s", model, resp.StatusCode, resp.Header.Get("X-Upstream"), data)
		}
		var s seen
		json.Unmarshal([]byte(data), &s)
		if s.Body != body || s.Header.Get(ModelHeader) != model || s.Host != "api.example.com" || s.URI != "/v1/chat/completions" {
			t.Errorf("model %s: upstream saw %+v", model, s)
		}
	}
	// A client's own header is removed: without a JSON body naming a model
	// the request matches neither rule.
	for _, tc := range []struct{ contentType, body string }{
		{"text/plain", `{"model":"llama"}`},
		{"application/json", `{"prompt":"no model"}`},
		{"application/json", `not json`},
		{"", ""},
	} {
		resp, data := g.do("POST", "api.example.com", "/v1/chat/completions", tc.contentType, tc.body, ModelHeader, "llama")
		if resp.StatusCode != http.StatusNotFound || !strings.Contains(data, codeRouteNotFound) {
			t.Errorf("%s %q with a client-sent model header: %d %s", tc.contentType, tc.body, resp.StatusCode, data)
		}
	}
	if n := g.metric("capstan_router_gateway_requests_total", map[string]string{"gateway": "ns/gw", "route": "ns/r", "code": "200"}); n != 2 {
		t.Errorf("gateway_requests_total{code=200} = %v, want 2", n)
	}
	if n := g.metric("capstan_router_gateway_requests_total", map[string]string{"gateway": "ns/gw", "route": "", "code": "404"}); n != 4 {
		t.Errorf("gateway_requests_total{code=404} = %v, want 4", n)
	}
}

func TestGatewayFilters(t *testing.T) {
	g := newGatewayFixture(t, map[string][]backend{"echo": {echoUpstream(t, "echo-0")}},
		func(b map[string]*route.Backend) map[string][]*route.Match {
			rewrite := newRule(0, route.RuleBackend{Weight: 1, Backend: b["echo"],
				RequestHeaders: route.NewHeaderModifier([]route.Header{{Name: "x-backend", Value: "set"}}, nil, nil)})
			rewrite.Rewrite = &route.Rewrite{Hostname: "internal.example.com", Path: &route.PathModifier{Prefix: "/v1"}}
			rewrite.RequestHeaders = route.NewHeaderModifier([]route.Header{{Name: "X-Set", Value: "s"}}, []route.Header{{Name: "X-Add", Value: "a2"}}, []string{"x-remove"})
			rewrite.ResponseHeaders = route.NewHeaderModifier(nil, []route.Header{{Name: "X-Via", Value: "capstan"}}, []string{"X-Upstream"})
			redirect := newRule(1)
			redirect.Redirect = &route.Redirect{Scheme: "https", StatusCode: 301}
			fail := newRule(2)
			fail.Fail = "the RequestMirror filter is not supported by capstan-router"
			return map[string][]*route.Match{"": {
				match(rewrite, mustMatch(route.NewPathMatch(route.PathPrefix, "/openai"))),
				match(redirect, mustMatch(route.NewPathMatch(route.PathPrefix, "/old"))),
				match(fail, mustMatch(route.NewPathMatch(route.PathPrefix, "/mirror"))),
			}}
		})
	resp, data := g.do("GET", "gw.example.com", "/openai/models?limit=2", "", "", "X-Add", "a1", "X-Remove", "x", "X-Set", "old")
	var s seen
	if err := json.Unmarshal([]byte(data), &s); err != nil || resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, data)
	}
	if s.URI != "/v1/models?limit=2" || s.Host != "internal.example.com" {
		t.Errorf("upstream saw %s on host %s", s.URI, s.Host)
	}
	if h := s.Header; h.Get("X-Set") != "s" || strings.Join(h["X-Add"], ",") != "a1,a2" || h.Get("X-Remove") != "" || h.Get("X-Backend") != "set" {
		t.Errorf("upstream headers %v", h)
	}
	if resp.Header.Get("X-Via") != "capstan" || resp.Header.Get("X-Upstream") != "" {
		t.Errorf("response headers %v", resp.Header)
	}

	resp, _ = g.do("GET", "gw.example.com:80", "/old/page?q=1", "", "")
	if resp.StatusCode != 301 || resp.Header.Get("Location") != "https://gw.example.com/old/page?q=1" {
		t.Errorf("redirect: %d to %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	resp, data = g.do("GET", "gw.example.com", "/mirror", "", "")
	if resp.StatusCode != 500 || !strings.Contains(data, "RequestMirror") {
		t.Errorf("a rule with an unsupported filter: %d %s", resp.StatusCode, data)
	}
}

func TestGatewayBackendFailures(t *testing.T) {
	g := newGatewayFixture(t, map[string][]backend{"up": {echoUpstream(t, "up-0")}, "loading": {{addr: deadAddr(t), pod: "l-0", ready: false}}},
		func(b map[string]*route.Backend) map[string][]*route.Match {
			p := func(v string) route.PathMatch { return mustMatch(route.NewPathMatch(route.PathExact, v)) }
			return map[string][]*route.Match{"": {
				match(newRule(0, route.RuleBackend{Weight: 1, Invalid: "backendRef ns/gone: Service not found"}), p("/invalid")),
				match(newRule(1), p("/none")),
				match(newRule(2, route.RuleBackend{Weight: 1, Backend: b["loading"]}), p("/loading")),
				match(newRule(3, route.RuleBackend{Weight: 1, Backend: b["up"]}, route.RuleBackend{Weight: 1, Invalid: "not permitted"}), p("/half")),
			}}
		})
	for path, want := range map[string]int{"/invalid": 500, "/none": 500, "/loading": 503, "/nothing": 404} {
		resp, data := g.do("GET", "h", path, "", "")
		if resp.StatusCode != want {
			t.Errorf("%s: %d %s, want %d", path, resp.StatusCode, data, want)
		}
		if want == 503 && (resp.Header.Get("Retry-After") == "" || !strings.Contains(data, "0 ready of 1 endpoints: 1 not ready")) {
			t.Errorf("%s: Retry-After %q, %s", path, resp.Header.Get("Retry-After"), data)
		}
	}
	codes := map[int]int{}
	for range 10 {
		resp, _ := g.do("GET", "h", "/half", "", "")
		codes[resp.StatusCode]++
	}
	if codes[200] != 5 || codes[500] != 5 {
		t.Errorf("an even split with one invalid backend: %v", codes)
	}
	resp, data := g.do("HEAD", "h", "/nothing", "", "")
	if resp.StatusCode != 404 || resp.Header.Get("Content-Type") != "" || data != "" {
		t.Errorf("HEAD 404: Content-Type %q, body %q", resp.Header.Get("Content-Type"), data)
	}
	resp, _ = g.do("POST", "h", "/half", "application/json", strings.Repeat("x", 2<<10))
	if resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Errorf("an oversized body: %d", resp.StatusCode)
	}
	if (&gatewayFixture{}).table.Port(gatewayAddr) != nil {
		t.Error("a nil table has ports")
	}
}

// An HTTPRoute that allows /public/ only never lets a dot segment or an
// encoded slash reach what it did not allow, and what goes upstream is the
// normalised path.
func TestGatewayMatchesTheNormalisedPath(t *testing.T) {
	g := newGatewayFixture(t, map[string][]backend{"web": {echoUpstream(t, "web-0")}},
		func(b map[string]*route.Backend) map[string][]*route.Match {
			public := mustMatch(route.NewPathMatch(route.PathPrefix, "/public"))
			return map[string][]*route.Match{"": {match(newRule(0, route.RuleBackend{Weight: 1, Backend: b["web"]}), public)}}
		})
	for target, want := range map[string]struct {
		status int
		uri    string
	}{
		"/public/a":            {http.StatusOK, "/public/a"},
		"/public/./a":          {http.StatusOK, "/public/a"},
		"/public/x/../a?q=1":   {http.StatusOK, "/public/a?q=1"},
		"/public/../admin":     {http.StatusNotFound, ""},
		"/public/..%2Fadmin":   {http.StatusBadRequest, ""},
		"/public/%2e%2e/admin": {http.StatusNotFound, ""},
	} {
		c, err := net.Dial("tcp", strings.TrimPrefix(g.url, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: web.example.com\r\nConnection: close\r\n\r\n", target)
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		c.Close()
		if resp.StatusCode != want.status {
			t.Errorf("GET %s: %d %s, want %d", target, resp.StatusCode, data, want.status)
			continue
		}
		if want.uri != "" {
			var s seen
			json.Unmarshal(data, &s)
			if s.URI != want.uri {
				t.Errorf("GET %s: the upstream got %s, want %s", target, s.URI, want.uri)
			}
		}
	}
}

// An InferencePool backend without an endpoint picker is balanced by the
// router over the pool's Ready endpoints.
func TestGatewayInferencePools(t *testing.T) {
	g := newGatewayFixture(t, nil, func(map[string]*route.Backend) map[string][]*route.Match { return nil })
	up := echoUpstream(t, "pool-0")
	pool := &inferencepool.Pool{Key: types.NamespacedName{Namespace: "ns", Name: "pool"}, Endpoints: []discovery.Endpoint{
		{Address: up.addr, Pod: types.NamespacedName{Namespace: "ns", Name: up.pod}, Ready: true},
		{Address: deadAddr(t), Pod: types.NamespacedName{Namespace: "ns", Name: "not-ready"}},
	}}
	g.builder.PoolChanged(pool.Key, pool)
	key := route.BackendKey{Pool: pool.Key}
	l := &route.Listener{Gateway: types.NamespacedName{Namespace: "ns", Name: "gw"}, Name: "http", Port: 80, Scheme: "http"}
	l.AddHost("", []*route.Match{match(newRule(0, route.RuleBackend{Weight: 1, Backend: g.builder.SyncBackends([]route.BackendKey{key})[key]}),
		mustMatch(route.NewPathMatch(route.PathPrefix, "/")))})
	g.table = route.NewHTTPTable([]*route.Port{route.NewPort(gatewayAddr, false, []*route.Listener{l})})
	for range 3 {
		if resp, data := g.do("POST", "h", "/v1/completions", "application/json", `{"model":"m"}`); resp.StatusCode != 200 || resp.Header.Get("X-Upstream") != "pool-0" {
			t.Errorf("%d from %q: %s", resp.StatusCode, resp.Header.Get("X-Upstream"), data)
		}
	}
}

// A pool whose capstan.dev/balancer names a policy is balanced by it, with
// what that policy reads of a request, while the router's default balances
// the rest: with session-affinity chosen, a session stays on one pod that
// round-robin, the default here, would rotate; the requests are counted
// under the policy that balanced them.
func TestGatewayInferencePoolChoosesItsPolicy(t *testing.T) {
	ups := []backend{startBackend(t, "a", ok), startBackend(t, "b", ok), startBackend(t, "c", ok)}
	var eps []discovery.Endpoint
	for _, up := range ups {
		eps = append(eps, discovery.Endpoint{Address: up.addr, Pod: types.NamespacedName{Namespace: "ns", Name: up.pod}, Ready: true})
	}
	session := &Balancing{Policy: balance.SessionAffinity, Selector: balance.SessionAffinitySelection{}, SessionHeader: "X-Session-Id"}
	g := newGatewayFixture(t, nil, func(map[string]*route.Backend) map[string][]*route.Match { return nil },
		func(o *Options) { o.Balancers = map[balance.Policy]*Balancing{balance.SessionAffinity: session} })
	l := &route.Listener{Gateway: types.NamespacedName{Namespace: "ns", Name: "gw"}, Name: "http", Port: 80, Scheme: "http"}
	for i, name := range []string{"plain", "sticky"} {
		pool := &inferencepool.Pool{Key: types.NamespacedName{Namespace: "ns", Name: name}, Endpoints: eps}
		if name == "sticky" {
			pool.Balancer = string(balance.SessionAffinity)
		}
		g.builder.PoolChanged(pool.Key, pool)
		key := route.BackendKey{Pool: pool.Key}
		l.AddHost(name, []*route.Match{match(newRule(i, route.RuleBackend{Weight: 1, Backend: g.builder.SyncBackends([]route.BackendKey{key})[key]}),
			mustMatch(route.NewPathMatch(route.PathPrefix, "/")))})
	}
	g.table = route.NewHTTPTable([]*route.Port{route.NewPort(gatewayAddr, false, []*route.Listener{l})})

	pods := func(host string) map[string]int {
		got := map[string]int{}
		for range 6 {
			resp, data := g.do("POST", host, "/v1/completions", "application/json", `{"model":"m"}`, "X-Session-Id", "alice")
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("%s: %d %s", host, resp.StatusCode, data)
			}
			got[resp.Header.Get("X-Capstan-Pod")]++
		}
		return got
	}
	if got := pods("sticky"); len(got) != 1 {
		t.Errorf("one session through the session-affinity pool reached %v", got)
	}
	if got := pods("plain"); len(got) != 3 {
		t.Errorf("one session through the round-robin pool reached %v", got)
	}
	if n := g.metric("capstan_router_requests_total", map[string]string{"model": "", "code": "200", "balancer": "session-affinity"}); n != 6 {
		t.Errorf("%v requests counted under session-affinity, want 6", n)
	}
}
