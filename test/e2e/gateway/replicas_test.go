package gateway

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// statusWrites counts, from watches, the updates that changed the status of
// a namespace's Gateways and HTTPRoutes.
type statusWrites struct {
	mu     sync.Mutex
	last   map[string]any
	writes map[string]int
}

func watchStatusWrites(t *testing.T, ctx context.Context, ns string) *statusWrites {
	t.Helper()
	s := &statusWrites{last: map[string]any{}, writes: map[string]int{}}
	gws, err := gwClient.GatewayV1().Gateways(ns).Watch(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	routes, err := gwClient.GatewayV1().HTTPRoutes(ns).Watch(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []watch.Interface{gws, routes} {
		go func() {
			defer w.Stop()
			for ev := range w.ResultChan() {
				var k string
				var st any
				switch o := ev.Object.(type) {
				case *gatewayv1.Gateway:
					k, st = "Gateway/"+o.Name, o.Status
				case *gatewayv1.HTTPRoute:
					k, st = "HTTPRoute/"+o.Name, o.Status
				default:
					continue
				}
				s.mu.Lock()
				if prev, ok := s.last[k]; ok && ev.Type == watch.Modified && !equality.Semantic.DeepEqual(prev, st) {
					s.writes[k]++
				}
				s.last[k] = st
				s.mu.Unlock()
			}
		}()
	}
	return s
}

func (s *statusWrites) snapshot() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]int{}
	for k, v := range s.writes {
		out[k] = v
	}
	return out
}

// metricValue sums a metric's samples from a router whose labels include
// these.
func (r *router) metricValue(t *testing.T, name string, labels map[string]string) float64 {
	t.Helper()
	resp, err := http.Get(r.admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, m := range families[name].GetMetric() {
		match := 0
		for _, l := range m.GetLabel() {
			if v, ok := labels[l.GetName()]; ok && v == l.GetValue() {
				match++
			}
		}
		if match == len(labels) {
			sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return sum
}

// TestStatusWrittenOnceByOneReplica runs two routers: both serve the
// Gateway, one (the Lease holder) writes status, and only when it changes;
// when it stops, the other takes over.
func TestStatusWrittenOnceByOneReplica(t *testing.T) {
	ctx := testContext(t, 4*time.Minute)
	ns := namespace(t, ctx, "replicas")
	simulate(t, ctx, ns, nil)
	deployEcho(t, ctx, ns, 1, "echo")
	a := startRouter(t, ctx, "router-replica-a")
	b := startRouter(t, ctx, "router-replica-b")
	writes := watchStatusWrites(t, ctx, ns)
	apply(t, ctx, ns, httpGateway(ns, "gw")+`
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo}
spec:
  parentRefs: [{name: gw}]
  hostnames: [echo.example.com]
  rules: [{backendRefs: [{name: echo, port: 8080}]}]
`)
	key := types.NamespacedName{Namespace: ns, Name: "echo"}
	addr := gatewayAddress(t, ctx, ns, "gw")
	wantRouteCondition(t, ctx, key, "gw", "ResolvedRefs", metav1.ConditionTrue, "ResolvedRefs")
	wantAttached(t, ctx, ns, "gw", "http", 1)
	settled := writes.snapshot()
	t.Logf("status writes to set the objects up: %v", settled)
	if settled["HTTPRoute/echo"] != 1 || settled["Gateway/gw"] > 2 {
		t.Errorf("setting up took %v status writes; want 1 for the route and at most 2 for the Gateway (programmed, then its route attached)", settled)
	}

	// Both replicas serve the Gateway: they listen on its address side by
	// side (SO_REUSEPORT), and the kernel spreads new connections.
	fresh := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	for i := range 40 {
		req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+addr+"/", nil)
		req.Host = "echo.example.com"
		resp, err := fresh.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("request %d through the Gateway: %d", i, resp.StatusCode)
		}
	}
	for _, r := range []*router{a, b} {
		if n := r.metricValue(t, "capstan_router_gateway_requests_total", map[string]string{"code": "200"}); n == 0 {
			t.Errorf("%s served none of 40 connections", r.name)
		}
	}

	// Churn that makes both replicas retranslate without changing any
	// status: metadata edits, an unrelated Service and ReferenceGrant.
	for i := range 3 {
		patch := fmt.Sprintf(`{"metadata":{"annotations":{"churn":"%d"}}}`, i)
		if _, err := gwClient.GatewayV1().HTTPRoutes(ns).Patch(ctx, "echo", types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := gwClient.GatewayV1().Gateways(ns).Patch(ctx, "gw", types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
		svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("unrelated-%d", i)},
			Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}}}
		if _, err := testCluster.Client.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	apply(t, ctx, ns, `
apiVersion: gateway.networking.k8s.io/v1
kind: ReferenceGrant
metadata: {name: unrelated}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: elsewhere}]
  to: [{group: "", kind: Service}]
`)
	// Churn has no completion to wait for; give both replicas time to
	// process it, well past their sync latency (milliseconds).
	time.Sleep(2 * time.Second)
	if diff := writes.snapshot(); !equalCounts(diff, settled) {
		t.Errorf("status was rewritten without a change: %v, before the churn %v", diff, settled)
	}

	// Exactly one replica writes.
	leader, follower := a, b
	if b.metricValue(t, "capstan_router_leader", nil) == 1 {
		leader, follower = b, a
	}
	if l, f := leader.metricValue(t, "capstan_router_leader", nil), follower.metricValue(t, "capstan_router_leader", nil); l != 1 || f != 0 {
		t.Fatalf("status_leader: %s=%v, %s=%v; want exactly one leader", leader.name, l, follower.name, f)
	}
	updated := map[string]string{"result": "updated"}
	if n := follower.metricValue(t, "capstan_router_gateway_status_updates_total", updated); n != 0 {
		t.Errorf("the follower %s wrote status %v times", follower.name, n)
	}
	if n := leader.metricValue(t, "capstan_router_gateway_status_updates_total", updated); n == 0 {
		t.Errorf("the leader %s wrote no status", leader.name)
	}

	// A real change is written once.
	bump := func(hosts string) {
		t.Helper()
		patch := `{"spec":{"hostnames":[` + hosts + `]}}`
		if _, err := gwClient.GatewayV1().HTTPRoutes(ns).Patch(ctx, "echo", types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
		wantRouteCondition(t, ctx, key, "gw", "Accepted", metav1.ConditionTrue, "Accepted")
	}
	bump(`"echo.example.com","echo2.example.com"`)
	time.Sleep(time.Second) // any duplicate write would land within this
	after := writes.snapshot()
	if after["HTTPRoute/echo"] != settled["HTTPRoute/echo"]+1 || after["Gateway/gw"] != settled["Gateway/gw"] {
		t.Errorf("a route change took %v status writes, from %v; want one for the route, none for the Gateway", after, settled)
	}

	// The leader goes; the other replica takes the Lease (released on
	// shutdown) and writes the next change.
	leader.proc.Stop(10 * time.Second)
	err := testCluster.WaitFor(ctx, 20*time.Second, follower.name+" to take over status writes", func(context.Context) (bool, error) {
		return follower.metricValue(t, "capstan_router_leader", nil) == 1, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	bump(`"echo.example.com"`)
	t.Logf("the new leader wrote the route's status %s after the change", time.Since(start).Round(time.Millisecond))
	// The router counts and logs a write after the API server has answered
	// it, which may be just after this test saw the new status.
	err = testCluster.WaitFor(ctx, 5*time.Second, "the new leader "+follower.name+" to count and log its status write", func(context.Context) (bool, error) {
		return follower.metricValue(t, "capstan_router_gateway_status_updates_total", updated) > 0 &&
			strings.Contains(follower.proc.LogTail(200), "Updated status"), nil
	})
	if err != nil {
		t.Error(err)
	}
	if res := send(ctx, "GET", addr, "echo.example.com", "/", ""); res.status != http.StatusOK {
		t.Errorf("the remaining replica does not serve the Gateway: %d", res.status)
	}
}

func equalCounts(a, b map[string]int) bool {
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	for k, v := range b {
		if a[k] != v {
			return false
		}
	}
	return true
}
