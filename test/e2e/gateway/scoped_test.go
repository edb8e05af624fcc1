package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"
)

// With --gateway-secret-namespaces (the gateway-scoped-secrets component's
// flag), a listener whose certificate is in an allowed namespace serves TLS
// with it, and one whose certificate is elsewhere says so in its conditions
// and is not served at all, never without TLS.
func TestScopedSecretNamespaces(t *testing.T) {
	ctx := testContext(t, 2*time.Minute)
	ns := namespace(t, ctx, "scoped")
	certs := namespace(t, ctx, "scoped-certs")
	tlsSecrets(t, ctx, "secure.example.com", ns, certs)
	startRouter(t, ctx, "router-scoped", "--gateway-secret-namespaces="+certs)
	apply(t, ctx, certs, fmt.Sprintf(`
apiVersion: gateway.networking.k8s.io/v1
kind: ReferenceGrant
metadata: {name: gateways}
spec:
  from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: %s}]
  to: [{group: "", kind: Secret}]
`, ns))
	apply(t, ctx, ns, fmt.Sprintf(`
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: scoped}
spec:
  gatewayClassName: capstan
  listeners:
  - name: allowed
    port: 443
    protocol: HTTPS
    hostname: secure.example.com
    tls: {certificateRefs: [{name: tls, namespace: %s}]}
  - name: outside
    port: 8443
    protocol: HTTPS
    hostname: secure.example.com
    tls: {certificateRefs: [{name: tls}]}
`, certs))
	gw := wantGateway(t, ctx, ns, "scoped", []want{accepted, programmed}, map[string][]want{
		"allowed": healthyListener,
		"outside": {accepted, notProgrammed, invalidCertRef},
	})
	for _, l := range gw.Status.Listeners {
		if l.Name != "outside" {
			continue
		}
		c := findCondition(l.Conditions, "ResolvedRefs")
		if wantMsg := "is outside the namespaces capstan-router may read certificates in: " + certs; !strings.Contains(c.Message, wantMsg) {
			t.Errorf("outside listener's ResolvedRefs message %q, want it to contain %q", c.Message, wantMsg)
		}
	}
	addr := gatewayAddress(t, ctx, ns, "scoped")

	// The allowed listener serves its certificate.
	var state tls.ConnectionState
	err := testCluster.WaitFor(ctx, 10*time.Second, "a TLS handshake on the allowed listener", func(ctx context.Context) (bool, error) {
		d := tls.Dialer{Config: &tls.Config{ServerName: "secure.example.com", InsecureSkipVerify: true}}
		conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(addr, "443"))
		if err != nil {
			return false, nil
		}
		defer conn.Close()
		state = conn.(*tls.Conn).ConnectionState()
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(state.PeerCertificates) == 0 || state.PeerCertificates[0].Subject.CommonName != "secure.example.com" {
		t.Errorf("allowed listener served %v, want the certificate of %s/tls", state.PeerCertificates, certs)
	}
	// The other listener's port is not open: no plaintext, no other
	// certificate.
	conn, err := (&net.Dialer{Timeout: 2 * time.Second}).DialContext(ctx, "tcp", net.JoinHostPort(addr, "8443"))
	if err == nil {
		conn.Close()
		t.Fatal("the listener whose certificate is outside the allowed namespaces accepts connections")
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("connecting to the outside listener: %v, want connection refused", err)
	}
}
