package gateway

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestSharedAddressFromService runs the router as the manifests do on a real
// cluster: every Gateway reports the address of a LoadBalancer Service
// (--gateway-publish-service) and shares it, listeners told apart by port
// and hostname. The test plays the cloud's load-balancer controller.
func TestSharedAddressFromService(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	ns := namespace(t, ctx, "shared")
	simulate(t, ctx, ns, nil)
	deployEcho(t, ctx, ns, 1, "app-a", "app-b")
	// A class of its own, so that this router leaves the other tests'
	// Gateways alone.
	const sharedController = "capstan.dev/shared-test"
	apply(t, ctx, "", `
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: capstan-shared}
spec: {controllerName: `+sharedController+`}
`)
	t.Cleanup(func() {
		_ = gwClient.GatewayV1().GatewayClasses().Delete(context.Background(), "capstan-shared", metav1.DeleteOptions{})
	})
	apply(t, ctx, ns, `
apiVersion: v1
kind: Service
metadata: {name: front}
spec:
  type: LoadBalancer
  selector: {app: router}
  ports: [{name: http, port: 80}]
`)
	const lbAddress = "198.18.253.1"
	startRouter(t, ctx, "router-shared", "--gateway-address-pool=", "--gateway-publish-service="+ns+"/front",
		"--gateway-bind-address="+lbAddress, "--gateway-controller-name="+sharedController)

	gateway := func(name, hostname string) string {
		return fmt.Sprintf(`
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: %s}
spec:
  gatewayClassName: capstan-shared
  listeners: [{name: http, port: 80, protocol: HTTP, hostname: %s}]
`, name, hostname)
	}
	route := func(gw, backend string) string {
		return fmt.Sprintf(`
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: %s}
spec:
  parentRefs: [{name: %s}]
  rules: [{backendRefs: [{name: %s, port: 8080}]}]
`, gw, gw, backend)
	}
	apply(t, ctx, ns, gateway("team-a", "a.example.com")+route("team-a", "app-a")+gateway("team-b", "b.example.com")+route("team-b", "app-b"))
	// No load balancer yet: no address to program.
	wantGateway(t, ctx, ns, "team-a", []want{accepted, {"Programmed", metav1.ConditionFalse, "AddressNotAssigned"}}, nil)

	svc, err := testCluster.Client.CoreV1().Services(ns).Get(ctx, "front", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	svc.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: lbAddress}}
	if _, err := testCluster.Client.CoreV1().Services(ns).UpdateStatus(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"team-a", "team-b"} {
		gw := wantGateway(t, ctx, ns, name, []want{accepted, programmed}, map[string][]want{"http": healthyListener})
		if a := gw.Status.Addresses; len(a) != 1 || a[0].Value != lbAddress {
			t.Errorf("Gateway %s has addresses %+v, want the load balancer's %s", name, a, lbAddress)
		}
	}
	// A newer Gateway asking for a hostname and port already served.
	apply(t, ctx, ns, gateway("team-a-again", "a.example.com"))
	wantGateway(t, ctx, ns, "team-a-again", []want{accepted, {"Programmed", metav1.ConditionFalse, "Invalid"}},
		map[string][]want{"http": {{"Conflicted", metav1.ConditionTrue, "HostnameConflict"}, notProgrammed}})

	addr := lbAddress + ":80"
	for host, app := range map[string]string{"a.example.com": "app-a", "b.example.com": "app-b"} {
		res := send(ctx, "GET", addr, host, "/", "")
		e, err := res.echo()
		if res.status != http.StatusOK || err != nil || !strings.HasPrefix(e.Pod, app+"-") {
			t.Errorf("%s: %d from %q: %v %s", host, res.status, e.Pod, err, res.body)
		}
	}
	if res := send(ctx, "GET", addr, "c.example.com", "/", ""); res.status != http.StatusNotFound {
		t.Errorf("a host no Gateway serves: %d", res.status)
	}
}
