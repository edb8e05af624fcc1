package server

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/http"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/klog/v2/ktesting"
)

// certFor returns a self-signed certificate for a host and a pool that
// trusts it.
func certFor(t *testing.T, host string) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: host}, DNSNames: []string{host},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: k, Leaf: leaf}, pool
}

func TestListenersServeTheirAddresses(t *testing.T) {
	logger, _ := ktesting.NewTestContext(t)
	ctx := context.Background()
	aCert, aPool := certFor(t, "a.example.com")
	bCert, bPool := certFor(t, "b.example.com")
	certs := map[string]*tls.Certificate{"a.example.com": &aCert, "b.example.com": &bCert}
	httpAddr, httpsAddr := freeLoopback(t), freeLoopback(t)
	ls := NewListeners(ListenersConfig{
		// Each answer names the address and the server name it came in on.
		Handler: func(addr string) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				name := "http"
				if r.TLS != nil {
					name = r.TLS.ServerName[:1]
				}
				if addr != httpAddr && addr != httpsAddr {
					name = addr
				}
				w.Header().Set("X-Listener", name)
			})
		},
		Certificate: func(addr string, hello *tls.ClientHelloInfo) *tls.Certificate {
			if addr != httpsAddr {
				return nil
			}
			return certs[hello.ServerName]
		},
		Drain:  time.Second,
		Logger: logger,
	})
	t.Cleanup(func() { ls.Shutdown(context.Background()) })
	both := map[string]bool{httpAddr: false, httpsAddr: true}
	if errs := ls.Reconcile(ctx, both); len(errs) != 0 {
		t.Fatalf("binding: %v", errs)
	}

	resp, err := http.Get("http://" + httpAddr + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("X-Listener") != "http" {
		t.Errorf("HTTP: %d from %q", resp.StatusCode, resp.Header.Get("X-Listener"))
	}
	// Each HTTPS listener presents its own certificate (SNI) and serves
	// HTTP/2 as well as HTTP/1.1.
	for host, pool := range map[string]*x509.CertPool{"a.example.com": aPool, "b.example.com": bPool} {
		c := &http.Client{Transport: &http.Transport{
			TLSClientConfig:   &tls.Config{ServerName: host, RootCAs: pool},
			ForceAttemptHTTP2: true,
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, network, httpsAddr)
			},
		}}
		resp, err := c.Get("https://" + host + "/")
		if err != nil {
			t.Fatalf("%s: %v", host, err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.Header.Get("X-Listener") != host[:1] || resp.ProtoMajor != 2 {
			t.Errorf("%s: %d from listener %q over %s", host, resp.StatusCode, resp.Header.Get("X-Listener"), resp.Proto)
		}
	}

	// Draining: every response closes its connection, on the cleartext
	// and the TLS address alike.
	ls.SetKeepAlivesEnabled(false)
	if resp, err := http.Get("http://" + httpAddr + "/"); err != nil || !resp.Close {
		t.Errorf("HTTP while draining: %v, Connection: close %v", err, err == nil && resp.Close)
	} else {
		resp.Body.Close()
	}
	ls.SetKeepAlivesEnabled(true)

	// An address held by someone else is reported, and taken once free.
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	busy := held.Addr().String()
	next := map[string]bool{busy: false}
	if errs := ls.Reconcile(ctx, next); errs[busy] == nil || len(errs) != 1 {
		t.Errorf("binding a taken address: %v", errs)
	}
	// The dropped addresses are closed.
	for _, addr := range []string{httpAddr, httpsAddr} {
		err := wait.PollUntilContextTimeout(ctx, 10*time.Millisecond, 5*time.Second, true, func(context.Context) (bool, error) {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err != nil {
				return true, nil
			}
			c.Close()
			return false, nil
		})
		if err != nil {
			t.Fatalf("%s still accepts connections after it left the set: %v", addr, err)
		}
	}
	held.Close()
	if errs := ls.Reconcile(ctx, next); len(errs) != 0 {
		t.Errorf("binding a freed address: %v", errs)
	}
	ls.Shutdown(context.Background())
	if errs := ls.Reconcile(ctx, both); errs != nil {
		t.Errorf("reconciling after Shutdown opened something: %v", errs)
	}
	if c, err := net.DialTimeout("tcp", busy, time.Second); err == nil {
		c.Close()
		t.Error("an address still accepts connections after Shutdown")
	}
}

func freeLoopback(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}
