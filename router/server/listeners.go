package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/capstan-dev/capstan/router/route"
	"github.com/capstan-dev/capstan/router/server"
)

// Listeners keeps one HTTP server on each listen address of the Gateway
// API routing table: it opens the addresses a new table adds, closes (and
// drains) those it drops, and reports the ones it could not open, which the
// gateway controller turns into listener status.
type Listeners struct {
	handler *Handler
	table   func() *route.HTTPTable
	logger  klog.Logger
	// drain bounds how long a closed address keeps serving the requests
	// it has.
	drain time.Duration

	mu      sync.Mutex
	servers map[string]*gatewayServer
	failed  map[string]error
	closing sync.WaitGroup
	// stopped is set by Shutdown: later reconciles open nothing.
	stopped bool
}

type gatewayServer struct {
	tls bool
	srv interface {
		Shutdown(context.Context) error
		Close() error
	}
}

// NewListeners returns a Listeners serving h for the table that table
// returns.
func NewListeners(h *Handler, table func() *route.HTTPTable, logger klog.Logger, drain time.Duration) *Listeners {
	return &Listeners{handler: h, table: table, logger: logger, drain: drain,
		servers: map[string]*gatewayServer{}, failed: map[string]error{}}
}

// Reconcile makes the open addresses those of t and returns the addresses
// that could not be opened, with why. An address that failed is tried again
// on the next call.
func (l *Listeners) Reconcile(ctx context.Context, t *route.HTTPTable) map[string]error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stopped {
		return nil
	}
	want := map[string]bool{}
	for _, p := range t.Ports() {
		want[p.Address] = p.TLS
	}
	for addr, s := range l.servers {
		if tlsWanted, ok := want[addr]; !ok || tlsWanted != s.tls {
			l.close(addr, s)
			delete(l.servers, addr)
		}
	}
	clear(l.failed)
	for addr, useTLS := range want {
		if _, ok := l.servers[addr]; ok {
			continue
		}
		s, err := l.open(ctx, addr, useTLS)
		if err != nil {
			l.failed[addr] = err
			l.logger.Info("Cannot listen for a Gateway", "address", addr, "err", err)
			continue
		}
		l.servers[addr] = s
	}
	out := make(map[string]error, len(l.failed))
	for k, v := range l.failed {
		out[k] = v
	}
	return out
}

func (l *Listeners) open(ctx context.Context, addr string, useTLS bool) (*gatewayServer, error) {
	ln, err := listenConfig.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	handler := l.handler.GatewayHandler(addr)
	if !useTLS {
		srv := &server.Server{Handler: handler, ReadHeaderTimeout: readHeaderTimeout, IdleTimeout: idleTimeout, Logger: l.logger}
		go l.serve(addr, func() error { return srv.Serve(ln) })
		l.logger.Info("Listening for Gateways", "address", addr, "tls", false)
		return &gatewayServer{srv: srv}, nil
	}
	// TLS, and with it HTTP/2, is net/http's.
	srv := &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: readHeaderTimeout,
		IdleTimeout:       idleTimeout,
		TLSConfig: &tls.Config{
			MinVersion: tls.VersionTLS12,
			GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
				if p := l.table().Port(addr); p != nil {
					if c := p.Certificate(hello); c != nil {
						return c, nil
					}
				}
				return nil, fmt.Errorf("no certificate for %q on %s", hello.ServerName, addr)
			},
		},
	}
	go l.serve(addr, func() error { return srv.ServeTLS(ln, "", "") })
	l.logger.Info("Listening for Gateways", "address", addr, "tls", true)
	return &gatewayServer{tls: true, srv: srv}, nil
}

// The timeouts of a Gateway listener's connections.
const (
	readHeaderTimeout = 30 * time.Second
	idleTimeout       = 120 * time.Second
)

func (l *Listeners) serve(addr string, serve func() error) {
	if err := serve(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		l.logger.Error(err, "Gateway listener stopped", "address", addr)
	}
}

// close stops accepting on an address and lets its requests finish within
// the drain time, in the background.
func (l *Listeners) close(addr string, s *gatewayServer) {
	l.logger.Info("No Gateway listens here any more; draining", "address", addr)
	l.closing.Add(1)
	go func() {
		defer l.closing.Done()
		ctx, cancel := context.WithTimeout(context.Background(), l.drain)
		defer cancel()
		if err := s.srv.Shutdown(ctx); err != nil {
			_ = s.srv.Close()
		}
	}()
}

// Shutdown stops every Gateway listener, waiting for in-flight requests
// until ctx ends and closing what is left then.
func (l *Listeners) Shutdown(ctx context.Context) {
	l.mu.Lock()
	servers := l.servers
	l.servers = map[string]*gatewayServer{}
	l.stopped = true
	l.mu.Unlock()
	var wg sync.WaitGroup
	for _, s := range servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.srv.Shutdown(ctx); err != nil {
				_ = s.srv.Close()
			}
		}()
	}
	wg.Wait()
	l.closing.Wait()
}

// listenConfig sets SO_REUSEPORT where the platform has it, so that
// several router processes in one network namespace (a test, a host-network
// rollout) can serve the same Gateway address side by side.
var listenConfig = net.ListenConfig{Control: reusePort}
