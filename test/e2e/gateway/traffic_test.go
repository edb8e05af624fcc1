package gateway

import (
	"bufio"
	"context"
	"fmt"
	"math"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/fleet"
)

// echoApp is a Deployment of echo backends (the fleet plays them, on port
// 3000) and its Service on port 8080.
func echoApp(ns, name string, replicas int) string {
	return fmt.Sprintf(`
apiVersion: apps/v1
kind: Deployment
metadata: {name: %[2]s, namespace: %[1]s}
spec:
  replicas: %[3]d
  selector: {matchLabels: {app: %[2]s}}
  template:
    metadata:
      labels: {app: %[2]s}
      annotations: {sim.capstan.dev/echo: "true"}
    spec:
      containers:
      - {name: echo, image: capstan.dev/echo:latest}
---
apiVersion: v1
kind: Service
metadata: {name: %[2]s, namespace: %[1]s}
spec:
  selector: {app: %[2]s}
  ports:
  - {name: http, port: 8080, targetPort: 3000}
`, ns, name, replicas)
}

// deployEcho applies echo apps and waits for their pods.
func deployEcho(t *testing.T, ctx context.Context, ns string, replicas int, names ...string) {
	t.Helper()
	for _, name := range names {
		apply(t, ctx, ns, echoApp(ns, name, replicas))
	}
	for _, name := range names {
		waitEndpoints(t, ctx, ns, name, replicas)
	}
}

// waitEndpoints waits until a Service's EndpointSlices have n ready
// endpoints (which lags the pods' readiness a little).
func waitEndpoints(t *testing.T, ctx context.Context, ns, svc string, n int) {
	t.Helper()
	err := testCluster.WaitFor(ctx, 30*time.Second, fmt.Sprintf("%d ready endpoints of Service %s/%s", n, ns, svc), func(ctx context.Context) (bool, error) {
		ready, _, err := testCluster.Endpoints(ctx, ns, svc)
		return err == nil && len(ready) == n, err
	})
	if err != nil {
		t.Fatal(err)
	}
}

func httpGateway(ns, name string) string {
	return fmt.Sprintf(`
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: %s, namespace: %s}
spec:
  gatewayClassName: capstan
  listeners:
  - {name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}
`, name, ns)
}

// The body's model is a request header before matching, so HTTPRoutes pick
// model Services with plain header matches; label-based routing works on
// the same router at the same time.
func TestModelsByHeaderBesideLabels(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	ns := namespace(t, ctx, "models")
	simulate(t, ctx, ns, nil)
	for _, m := range []cluster.ModelServer{
		{Namespace: ns, Name: "llama", Model: "llama-3-8b", Replicas: 2},
		{Namespace: ns, Name: "qwen", Model: "qwen-2", Replicas: 1},
	} {
		if err := testCluster.Deploy(ctx, m); err != nil {
			t.Fatal(err)
		}
		waitEndpoints(t, ctx, ns, m.Name, int(m.Replicas))
	}
	apply(t, ctx, ns, httpGateway(ns, "inference")+`
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: models}
spec:
  parentRefs: [{name: inference}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v1}, headers: [{name: x-capstan-model, value: llama-3-8b}]}]
    backendRefs: [{name: llama, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /v1}, headers: [{name: x-capstan-model, value: qwen-2}]}]
    backendRefs: [{name: qwen, port: 80}]
`)
	r := startRouter(t, ctx, "router-models")
	addr := gatewayAddress(t, ctx, ns, "inference")
	wantRouteCondition(t, ctx, types.NamespacedName{Namespace: ns, Name: "models"}, "inference", "ResolvedRefs", metav1.ConditionTrue, "ResolvedRefs")

	for model, app := range map[string]string{"llama-3-8b": "llama", "qwen-2": "qwen"} {
		body := `{"model":"` + model + `","messages":[{"role":"user","content":"hi"}],"max_tokens":4}`
		for i := range 6 {
			res := send(ctx, "POST", addr, "api.example.com", "/v1/chat/completions", body, "X-Capstan-Model", "not-what-the-body-says")
			pod := res.header.Get("X-Capstan-Pod")
			if res.err != nil || res.status != http.StatusOK || !strings.HasPrefix(pod, ns+"/"+app+"-") {
				t.Fatalf("%s request %d: %d from %q, %v %s", model, i, res.status, pod, res.err, res.body)
			}
		}
	}
	if res := send(ctx, "POST", addr, "", "/v1/chat/completions", `{"model":"mistral","messages":[]}`); res.status != http.StatusNotFound {
		t.Errorf("a model no rule selects: %d %s", res.status, res.body)
	}

	// A streamed completion comes through the Gateway chunk by chunk.
	req, _ := http.NewRequestWithContext(ctx, "POST", "http://"+addr+"/v1/chat/completions",
		strings.NewReader(`{"model":"qwen-2","stream":true,"messages":[{"role":"user","content":"hi"}],"max_tokens":8}`))
	req.Header.Set("Content-Type", "application/json")
	resp, err := httpClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	chunks, done := 0, false
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if line := sc.Text(); strings.HasPrefix(line, "data: ") {
			chunks++
			done = line == "data: [DONE]"
		}
	}
	resp.Body.Close()
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") || chunks < 3 || !done {
		t.Errorf("stream: %s, %d chunks, ended with [DONE]: %v", resp.Header.Get("Content-Type"), chunks, done)
	}

	// Label-based routing on the router's own API, beside the Gateway.
	for _, model := range []string{"llama-3-8b", "qwen-2"} {
		res := send(ctx, "POST", strings.TrimPrefix(r.url, "http://"), "", "/v1/completions", `{"model":"`+model+`","prompt":"hi","max_tokens":4}`)
		if res.status != http.StatusOK {
			t.Errorf("label-based %s: %d %s", model, res.status, res.body)
		}
	}
}

// TestWeightedSplit: 2,000 requests through a rule with weights 80 and 20
// land within ±5% of the weights.
func TestWeightedSplit(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	ns := namespace(t, ctx, "weights")
	var v1, v2, other atomic.Int64
	simulate(t, ctx, ns, func(a fleet.Arrival) {
		switch {
		case strings.HasPrefix(a.Pod.Name, "v1-"):
			v1.Add(1)
		case strings.HasPrefix(a.Pod.Name, "v2-"):
			v2.Add(1)
		default:
			other.Add(1)
		}
	})
	deployEcho(t, ctx, ns, 2, "v1", "v2")
	apply(t, ctx, ns, httpGateway(ns, "split")+`
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split}
spec:
  parentRefs: [{name: split}]
  rules:
  - backendRefs:
    - {name: v1, port: 8080, weight: 80}
    - {name: v2, port: 8080, weight: 20}
`)
	startRouter(t, ctx, "router-weights")
	addr := gatewayAddress(t, ctx, ns, "split")
	wantRouteCondition(t, ctx, types.NamespacedName{Namespace: ns, Name: "split"}, "split", "ResolvedRefs", metav1.ConditionTrue, "ResolvedRefs")

	const total, workers = 2000, 8
	var failed atomic.Int64
	var wg sync.WaitGroup
	var next atomic.Int64
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= total {
				if res := send(ctx, "GET", addr, "", "/", ""); res.err != nil || res.status != http.StatusOK {
					failed.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if n := failed.Load(); n > 0 {
		t.Fatalf("%d of %d requests failed", n, total)
	}
	got1, got2 := float64(v1.Load())/total, float64(v2.Load())/total
	t.Logf("split over %d requests: v1 %.1f%%, v2 %.1f%% (weights 80/20)", total, 100*got1, 100*got2)
	if other.Load() != 0 || math.Abs(got1-0.8) > 0.05 || math.Abs(got2-0.2) > 0.05 {
		t.Errorf("v1 %.3f, v2 %.3f, elsewhere %d: not within ±5%% of 80/20", got1, got2, other.Load())
	}
}

// TestCrossNamespaceGrant: a backend in another namespace gets no traffic
// and the route says RefNotPermitted until a ReferenceGrant allows it;
// granting and revoking take effect within a second.
func TestCrossNamespaceGrant(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	routes := namespace(t, ctx, "routes")
	backends := namespace(t, ctx, "backends")
	var arrivals sync.Map // time of each request at the backend
	var count atomic.Int64
	simulate(t, ctx, backends, func(a fleet.Arrival) {
		arrivals.Store(count.Add(1), a.At)
	})
	deployEcho(t, ctx, backends, 2, "shared")
	apply(t, ctx, routes, httpGateway(routes, "gw")+fmt.Sprintf(`
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: cross}
spec:
  parentRefs: [{name: gw}]
  rules:
  - backendRefs: [{name: shared, namespace: %s, port: 8080}]
`, backends))
	startRouter(t, ctx, "router-grants")
	addr := gatewayAddress(t, ctx, routes, "gw")
	key := types.NamespacedName{Namespace: routes, Name: "cross"}
	c := wantRouteCondition(t, ctx, key, "gw", "ResolvedRefs", metav1.ConditionFalse, "RefNotPermitted")
	t.Logf("without a grant: %s", c.Message)
	wantRouteCondition(t, ctx, key, "gw", "Accepted", metav1.ConditionTrue, "Accepted")
	for i := range 20 {
		if res := send(ctx, "GET", addr, "", "/", ""); res.status != http.StatusInternalServerError {
			t.Fatalf("request %d without a grant: %d %s", i, res.status, res.body)
		}
	}
	if n := count.Load(); n != 0 {
		t.Fatalf("the backend got %d requests without a grant", n)
	}

	grant := fmt.Sprintf(`
apiVersion: gateway.networking.k8s.io/v1
kind: ReferenceGrant
metadata: {name: allow-routes, namespace: %s}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: %s}]
  to: [{group: "", kind: Service, name: shared}]
`, backends, routes)
	apply(t, ctx, backends, grant)
	took := firstStatus(t, ctx, addr, http.StatusOK, 2*time.Second)
	t.Logf("traffic flowed %s after the grant was created", took.Round(time.Millisecond))
	if took > time.Second {
		t.Errorf("traffic flowed %s after the grant, want within 1s", took)
	}
	wantRouteCondition(t, ctx, key, "gw", "ResolvedRefs", metav1.ConditionTrue, "ResolvedRefs")
	if count.Load() == 0 {
		t.Fatal("no request reached the backend after the grant")
	}

	if err := gwClient.GatewayV1().ReferenceGrants(backends).Delete(ctx, "allow-routes", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	revoked := time.Now()
	took = firstStatus(t, ctx, addr, http.StatusInternalServerError, 2*time.Second)
	t.Logf("traffic stopped %s after the grant was deleted", took.Round(time.Millisecond))
	if took > time.Second {
		t.Errorf("traffic stopped %s after the revocation, want within 1s", took)
	}
	wantRouteCondition(t, ctx, key, "gw", "ResolvedRefs", metav1.ConditionFalse, "RefNotPermitted")
	// Keep asking for a while: nothing reaches the backend later than 1 s
	// after the revocation.
	for range 20 {
		send(ctx, "GET", addr, "", "/", "")
	}
	late := 0
	arrivals.Range(func(_, v any) bool {
		if v.(time.Time).After(revoked.Add(time.Second)) {
			late++
		}
		return true
	})
	if late > 0 {
		t.Errorf("%d requests reached the backend more than 1s after the grant was deleted", late)
	}
}

// firstStatus sends requests back to back until one gets want, and returns
// how long that took.
func firstStatus(t *testing.T, ctx context.Context, addr string, want int, limit time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for time.Since(start) < limit {
		if res := send(ctx, "GET", addr, "", "/", ""); res.status == want {
			return time.Since(start)
		}
		time.Sleep(5 * time.Millisecond) // pacing between probes, not synchronisation
	}
	t.Fatalf("no %d within %s", want, limit)
	return 0
}
