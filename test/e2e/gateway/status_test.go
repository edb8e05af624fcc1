package gateway

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// want is a condition a test expects, by type, status and reason.
type want struct {
	Type   string
	Status metav1.ConditionStatus
	Reason string
}

func (w want) String() string { return fmt.Sprintf("%s=%s/%s", w.Type, w.Status, w.Reason) }

// hasAll reports whether conds has every wanted condition, each for
// generation.
func hasAll(conds []metav1.Condition, generation int64, wants ...want) (bool, string) {
	var got []string
	for _, c := range conds {
		got = append(got, fmt.Sprintf("%s=%s/%s(gen %d)", c.Type, c.Status, c.Reason, c.ObservedGeneration))
	}
	for _, w := range wants {
		c := findCondition(conds, w.Type)
		if c == nil || c.Status != w.Status || c.Reason != w.Reason || c.ObservedGeneration != generation {
			return false, strings.Join(got, " ")
		}
	}
	return true, strings.Join(got, " ")
}

// wantGateway waits until a Gateway has the conditions, and its listeners
// theirs, all for its current generation; it returns the Gateway.
func wantGateway(t *testing.T, ctx context.Context, ns, name string, gwConds []want, listeners map[string][]want) *gatewayv1.Gateway {
	t.Helper()
	var last string
	var out *gatewayv1.Gateway
	err := testCluster.WaitFor(ctx, 15*time.Second, "Gateway "+ns+"/"+name+" status", func(ctx context.Context) (bool, error) {
		gw, err := gwClient.GatewayV1().Gateways(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		out = gw
		ok, got := hasAll(gw.Status.Conditions, gw.Generation, gwConds...)
		last = "gateway: " + got
		if !ok {
			return false, nil
		}
		for lname, ws := range listeners {
			var ls *gatewayv1.ListenerStatus
			for i := range gw.Status.Listeners {
				if string(gw.Status.Listeners[i].Name) == lname {
					ls = &gw.Status.Listeners[i]
				}
			}
			if ls == nil {
				last = "no status for listener " + lname
				return false, nil
			}
			ok, got := hasAll(ls.Conditions, gw.Generation, ws...)
			if !ok {
				last = "listener " + lname + ": " + got
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("%v; last seen %s", err, last)
	}
	return out
}

var (
	accepted         = want{"Accepted", metav1.ConditionTrue, "Accepted"}
	programmed       = want{"Programmed", metav1.ConditionTrue, "Programmed"}
	resolved         = want{"ResolvedRefs", metav1.ConditionTrue, "ResolvedRefs"}
	notProgrammed    = want{"Programmed", metav1.ConditionFalse, "Invalid"}
	noConflicts      = want{"Conflicted", metav1.ConditionFalse, "NoConflicts"}
	healthyListener  = []want{accepted, programmed, resolved, noConflicts}
	invalidCertRef   = want{"ResolvedRefs", metav1.ConditionFalse, "InvalidCertificateRef"}
	listenersInvalid = want{"Accepted", metav1.ConditionTrue, "ListenersNotValid"}
)

// TestStatusConditions sets up Gateways and HTTPRoutes that exercise every
// condition and reason the router writes, and reads each back from the API
// server, with observedGeneration.
func TestStatusConditions(t *testing.T) {
	ctx := testContext(t, 4*time.Minute)
	ns := namespace(t, ctx, "status")
	other := namespace(t, ctx, "status-other")
	simulate(t, ctx, ns, nil)
	deployEcho(t, ctx, ns, 1, "echo")
	tlsSecrets(t, ctx, "secure.example.com", ns, other)
	startRouter(t, ctx, "router-status")

	// GatewayClasses.
	apply(t, ctx, "", `
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: capstan-with-parameters}
spec:
  controllerName: capstan.dev/gateway-controller
  parametersRef: {group: example.com, kind: Config, name: tuning}
`)
	t.Cleanup(func() {
		_ = gwClient.GatewayV1().GatewayClasses().Delete(context.Background(), "capstan-with-parameters", metav1.DeleteOptions{})
	})
	waitClass(t, ctx, className, want{"Accepted", metav1.ConditionTrue, "Accepted"})
	waitClass(t, ctx, "capstan-with-parameters", want{"Accepted", metav1.ConditionFalse, "InvalidParameters"})

	apply(t, ctx, ns, fmt.Sprintf(`
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: main}
spec:
  gatewayClassName: capstan
  listeners:
  - {name: http, port: 80, protocol: HTTP, hostname: "*.example.com", allowedRoutes: {namespaces: {from: All}}}
  - name: secure
    port: 443
    protocol: HTTPS
    hostname: secure.example.com
    tls: {certificateRefs: [{name: tls}]}
  - name: team-a
    port: 8080
    protocol: HTTP
    allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {team: a}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: listeners}
spec:
  gatewayClassName: capstan
  listeners:
  - {name: http, port: 80, protocol: HTTP}
  - {name: tcp, port: 9000, protocol: TCP}
  - {name: kinds, port: 8081, protocol: HTTP, allowedRoutes: {kinds: [{kind: TCPRoute}]}}
  - {name: missing-cert, port: 443, protocol: HTTPS, tls: {certificateRefs: [{name: nonexistent}]}}
  - {name: cross-cert, port: 8443, protocol: HTTPS, tls: {certificateRefs: [{name: tls, namespace: %[1]s}]}}
  - {name: conflict-http, port: 9443, protocol: HTTP}
  - {name: conflict-https, port: 9443, protocol: HTTPS, hostname: x.example.com, tls: {certificateRefs: [{name: tls}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: udp-only}
spec:
  gatewayClassName: capstan
  listeners: [{name: dns, port: 53, protocol: UDP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: hostname-address}
spec:
  gatewayClassName: capstan
  addresses: [{type: Hostname, value: gw.example.com}]
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: outside-pool}
spec:
  gatewayClassName: capstan
  addresses: [{type: IPAddress, value: 203.0.113.5}]
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: unaccepted-class}
spec:
  gatewayClassName: capstan-with-parameters
  listeners: [{name: http, port: 80, protocol: HTTP}]
`, other))
	main := wantGateway(t, ctx, ns, "main", []want{accepted, programmed},
		map[string][]want{"http": healthyListener, "secure": healthyListener, "team-a": healthyListener})
	wantGateway(t, ctx, ns, "listeners", []want{listenersInvalid, programmed}, map[string][]want{
		"http":           healthyListener,
		"tcp":            {{"Accepted", metav1.ConditionFalse, "UnsupportedProtocol"}, notProgrammed},
		"kinds":          {{"ResolvedRefs", metav1.ConditionFalse, "InvalidRouteKinds"}},
		"missing-cert":   {accepted, notProgrammed, invalidCertRef},
		"cross-cert":     {notProgrammed, {"ResolvedRefs", metav1.ConditionFalse, "RefNotPermitted"}},
		"conflict-http":  {notProgrammed, {"Conflicted", metav1.ConditionTrue, "ProtocolConflict"}},
		"conflict-https": {notProgrammed, {"Conflicted", metav1.ConditionTrue, "ProtocolConflict"}},
	})
	wantGateway(t, ctx, ns, "udp-only", []want{{"Accepted", metav1.ConditionFalse, "ListenersNotValid"}, notProgrammed}, nil)
	wantGateway(t, ctx, ns, "hostname-address", []want{{"Accepted", metav1.ConditionFalse, "UnsupportedAddress"}, notProgrammed}, nil)
	wantGateway(t, ctx, ns, "outside-pool", []want{accepted, {"Programmed", metav1.ConditionFalse, "AddressNotUsable"}}, nil)
	wantGateway(t, ctx, ns, "unaccepted-class", []want{{"Accepted", metav1.ConditionFalse, "Invalid"}, notProgrammed}, nil)
	mainAddr := main.Status.Addresses[0].Value

	// A Gateway asking for an address an older one has; one whose address
	// is held by another process until it lets go.
	busy := freePoolAddress(t, ctx)
	held, err := net.Listen("tcp", net.JoinHostPort(busy, "80"))
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	apply(t, ctx, ns, fmt.Sprintf(`
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: address-taken}
spec:
  gatewayClassName: capstan
  addresses: [{type: IPAddress, value: %s}]
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: port-busy}
spec:
  gatewayClassName: capstan
  addresses: [{type: IPAddress, value: %s}]
  listeners: [{name: http, port: 80, protocol: HTTP}]
`, mainAddr, busy))
	wantGateway(t, ctx, ns, "address-taken", []want{accepted, {"Programmed", metav1.ConditionFalse, "AddressNotAssigned"}}, nil)
	wantGateway(t, ctx, ns, "port-busy", []want{{"Accepted", metav1.ConditionFalse, "ListenersNotValid"}, notProgrammed},
		map[string][]want{"http": {{"Accepted", metav1.ConditionFalse, "PortUnavailable"}, notProgrammed}})
	held.Close()
	wantGateway(t, ctx, ns, "port-busy", []want{accepted, programmed}, map[string][]want{"http": healthyListener})

	// HTTPRoutes, one per reason.
	if _, err := testCluster.Client.CoreV1().Namespaces().Patch(ctx, other, types.MergePatchType,
		[]byte(`{"metadata":{"labels":{"team":"b"}}}`), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	route := func(name, spec string) string {
		return fmt.Sprintf("---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: %s}\nspec:\n%s\n", name, spec)
	}
	apply(t, ctx, ns, route("ok", `
  parentRefs: [{name: main, sectionName: http}]
  hostnames: [api.example.com]
  rules: [{backendRefs: [{name: echo, port: 8080}]}]`)+
		route("no-such-listener", `
  parentRefs: [{name: main, sectionName: nope}]
  rules: [{backendRefs: [{name: echo, port: 8080}]}]`)+
		route("no-such-port", `
  parentRefs: [{name: main, port: 81}]
  rules: [{backendRefs: [{name: echo, port: 8080}]}]`)+
		route("wrong-hostname", `
  parentRefs: [{name: main, sectionName: http}]
  hostnames: [api.example.org]
  rules: [{backendRefs: [{name: echo, port: 8080}]}]`)+
		route("missing-service", `
  parentRefs: [{name: main, sectionName: http}]
  hostnames: [missing.example.com]
  rules: [{backendRefs: [{name: nonexistent, port: 8080}]}]`)+
		route("missing-port", `
  parentRefs: [{name: main, sectionName: http}]
  hostnames: [port.example.com]
  rules: [{backendRefs: [{name: echo, port: 9999}]}]`)+
		route("invalid-kind", `
  parentRefs: [{name: main, sectionName: http}]
  hostnames: [kind.example.com]
  rules: [{backendRefs: [{group: example.com, kind: Bucket, name: echo, port: 8080}]}]`)+
		route("cross-namespace", fmt.Sprintf(`
  parentRefs: [{name: main, sectionName: http}]
  hostnames: [cross.example.com]
  rules: [{backendRefs: [{name: echo, namespace: %s, port: 8080}]}]`, other))+
		route("mirror", `
  parentRefs: [{name: main, sectionName: http}]
  hostnames: [mirror.example.com]
  rules:
  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: echo, port: 8080}}}]
    backendRefs: [{name: echo, port: 8080}]`)+
		route("class-not-accepted", `
  parentRefs: [{name: unaccepted-class}]
  rules: [{backendRefs: [{name: echo, port: 8080}]}]`))
	apply(t, ctx, other, `
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 8080, targetPort: 3000}]
`+route("not-allowed", fmt.Sprintf(`
  parentRefs: [{name: main, namespace: %s, sectionName: team-a}]
  rules: [{backendRefs: [{name: echo, port: 8080}]}]`, ns)))

	for _, tc := range []struct {
		ns, name, gateway  string
		accepted, resolved want
	}{
		{ns, "ok", "main", accepted, resolved},
		{ns, "no-such-listener", "main", want{"Accepted", metav1.ConditionFalse, "NoMatchingParent"}, resolved},
		{ns, "no-such-port", "main", want{"Accepted", metav1.ConditionFalse, "NoMatchingParent"}, resolved},
		{ns, "wrong-hostname", "main", want{"Accepted", metav1.ConditionFalse, "NoMatchingListenerHostname"}, resolved},
		{ns, "missing-service", "main", accepted, want{"ResolvedRefs", metav1.ConditionFalse, "BackendNotFound"}},
		{ns, "missing-port", "main", accepted, want{"ResolvedRefs", metav1.ConditionFalse, "BackendNotFound"}},
		{ns, "invalid-kind", "main", accepted, want{"ResolvedRefs", metav1.ConditionFalse, "InvalidKind"}},
		{ns, "cross-namespace", "main", accepted, want{"ResolvedRefs", metav1.ConditionFalse, "RefNotPermitted"}},
		{ns, "mirror", "main", accepted, resolved},
		{ns, "class-not-accepted", "unaccepted-class", want{"Accepted", metav1.ConditionFalse, "Pending"}, resolved},
		{other, "not-allowed", "main", want{"Accepted", metav1.ConditionFalse, "NotAllowedByListeners"}, resolved},
	} {
		key := types.NamespacedName{Namespace: tc.ns, Name: tc.name}
		c := wantRouteCondition(t, ctx, key, tc.gateway, "Accepted", tc.accepted.Status, tc.accepted.Reason)
		d := wantRouteCondition(t, ctx, key, tc.gateway, "ResolvedRefs", tc.resolved.Status, tc.resolved.Reason)
		t.Logf("%s: %s %q; %s %q", tc.name, tc.accepted, c.Message, tc.resolved, d.Message)
	}
	// The main listener counts the routes it accepted.
	wantAttached(t, ctx, ns, "main", "http", 6)

	// Requests: served, 500 for invalid backends and unsupported filters.
	for host, status := range map[string]int{
		"api.example.com": 200, "missing.example.com": 500, "port.example.com": 500,
		"kind.example.com": 500, "cross.example.com": 500, "mirror.example.com": 500, "other.example.com": 404,
	} {
		if res := send(ctx, "GET", mainAddr, host, "/", ""); res.status != status {
			t.Errorf("%s: %d %s, want %d", host, res.status, res.body, status)
		}
	}

	// A spec change moves observedGeneration with it.
	if _, err := gwClient.GatewayV1().HTTPRoutes(ns).Patch(ctx, "ok", types.MergePatchType,
		[]byte(`{"spec":{"hostnames":["api.example.com","api2.example.com"]}}`), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	wantRouteCondition(t, ctx, types.NamespacedName{Namespace: ns, Name: "ok"}, "main", "Accepted", metav1.ConditionTrue, "Accepted")
	if res := send(ctx, "GET", mainAddr, "api2.example.com", "/", ""); res.status != http.StatusOK {
		t.Errorf("the new hostname: %d", res.status)
	}
}

func waitClass(t *testing.T, ctx context.Context, name string, w want) {
	t.Helper()
	var last string
	err := testCluster.WaitFor(ctx, 15*time.Second, "GatewayClass "+name+" "+w.String(), func(ctx context.Context) (bool, error) {
		c, err := gwClient.GatewayV1().GatewayClasses().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		ok, got := hasAll(c.Status.Conditions, c.Generation, w)
		last = got
		return ok && (w.Status == metav1.ConditionFalse || len(c.Status.SupportedFeatures) > 0), nil
	})
	if err != nil {
		t.Fatalf("%v; last seen %s", err, last)
	}
}

func wantAttached(t *testing.T, ctx context.Context, ns, gateway, listener string, n int32) {
	t.Helper()
	err := testCluster.WaitFor(ctx, 15*time.Second, fmt.Sprintf("listener %s of %s/%s to count %d routes", listener, ns, gateway, n), func(ctx context.Context) (bool, error) {
		gw, err := gwClient.GatewayV1().Gateways(ns).Get(ctx, gateway, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		for _, l := range gw.Status.Listeners {
			if string(l.Name) == listener {
				return l.AttachedRoutes == n, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// freePoolAddress returns an address of the pool that no Gateway has.
func freePoolAddress(t *testing.T, ctx context.Context) string {
	t.Helper()
	used := map[string]bool{}
	list, err := gwClient.GatewayV1().Gateways("").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, gw := range list.Items {
		for _, a := range gw.Status.Addresses {
			used[a.Value] = true
		}
	}
	for i := 250; i > 1; i-- {
		if a := fmt.Sprintf("198.18.254.%d", i); !used[a] {
			return a
		}
	}
	t.Fatal("no free pool address")
	return ""
}

// selfSignedCert returns a PEM certificate and key for a host.
func selfSignedCert(t *testing.T, host string) (cert, key []byte) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: host}, DNSNames: []string{host},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kd, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kd})
}

// tlsSecrets creates a TLS Secret "tls" for host, self-signed, in each
// namespace.
func tlsSecrets(t *testing.T, ctx context.Context, host string, namespaces ...string) {
	t.Helper()
	cert, key := selfSignedCert(t, host)
	for _, n := range namespaces {
		_, err := testCluster.Client.CoreV1().Secrets(n).Create(ctx, &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: "tls"}, Type: corev1.SecretTypeTLS,
			Data: map[string][]byte{corev1.TLSCertKey: cert, corev1.TLSPrivateKeyKey: key},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
	}
}
