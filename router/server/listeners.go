package server

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
)

// Listeners keeps one server on each of a changing set of listen addresses
// (a Gateway API routing table's ports): it opens the addresses a new set
// adds, closes (and drains) those it drops, and reports the ones it could not
// open, which the gateway controller turns into listener status. A
// cleartext address is served by Server; a TLS one, and with it HTTP/2, by
// net/http.
type Listeners struct {
	config ListenersConfig

	mu      sync.Mutex
	servers map[string]*listener
	failed  map[string]error
	// serving counts every goroutine serving or draining an address;
	// Shutdown waits for them all.
	serving sync.WaitGroup
	// stopped is set by Shutdown: later reconciles open nothing.
	stopped bool
	// closeAll is set by SetKeepAlivesEnabled(false): every address opened
	// from then on closes each connection after its response.
	closeAll bool
}

// ListenersConfig configures Listeners.
type ListenersConfig struct {
	// Handler returns the handler of an address's requests.
	Handler func(addr string) http.Handler
	// Certificate returns the certificate a TLS address presents for a
	// handshake, or nil when it has none for it.
	Certificate func(addr string, hello *tls.ClientHelloInfo) *tls.Certificate
	// Drain bounds how long a closed address keeps serving the requests it
	// has.
	Drain time.Duration
	// NewServer returns a Server with the limits and timeouts every
	// address gets (Handler and Logger are set per address); nil means
	// the defaults. A TLS address's net/http server takes its
	// ReadHeaderTimeout, IdleTimeout and MaxHeaderBytes.
	NewServer func() *Server
	Logger    klog.Logger
}

type listener struct {
	tls bool
	srv interface {
		Shutdown(context.Context) error
		Close() error
		SetKeepAlivesEnabled(bool)
	}
}

// NewListeners returns Listeners that open nothing until Reconcile.
func NewListeners(c ListenersConfig) *Listeners {
	return &Listeners{config: c, servers: map[string]*listener{}, failed: map[string]error{}}
}

// Reconcile makes the open addresses those of want, each mapped to whether
// it terminates TLS, and returns the addresses that could not be opened,
// with why. An address that failed is tried again on the next call.
func (l *Listeners) Reconcile(ctx context.Context, want map[string]bool) map[string]error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stopped {
		return nil
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
			l.config.Logger.Info("Cannot listen for a Gateway", "address", addr, "err", err)
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

func (l *Listeners) open(ctx context.Context, addr string, useTLS bool) (*listener, error) {
	ln, err := listenConfig.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	logger := l.config.Logger
	handler := l.config.Handler(addr)
	if !useTLS {
		srv := l.newServer()
		srv.Handler, srv.Logger = handler, logger
		if l.closeAll {
			srv.SetKeepAlivesEnabled(false)
		}
		s := &listener{srv: srv}
		l.serve(addr, s, func() error { return srv.Serve(ln) })
		logger.Info("Listening for Gateways", "address", addr, "tls", false)
		return s, nil
	}
	// TLS, and with it HTTP/2, is net/http's.
	// No WriteTimeout: net/http's bounds a whole response, which would
	// cut streams.
	limits := l.newServer()
	srv := &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: limits.readHeaderTimeout(),
		IdleTimeout:       limits.idleTimeout(),
		MaxHeaderBytes:    int(limits.maxHeaderBytes()),
		TLSConfig: &tls.Config{
			MinVersion: tls.VersionTLS12,
			GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
				if c := l.config.Certificate(addr, hello); c != nil {
					return c, nil
				}
				return nil, fmt.Errorf("no certificate for %q on %s", hello.ServerName, addr)
			},
		},
	}
	if l.closeAll {
		srv.SetKeepAlivesEnabled(false)
	}
	s := &listener{tls: true, srv: srv}
	l.serve(addr, s, func() error { return srv.ServeTLS(ln, "", "") })
	logger.Info("Listening for Gateways", "address", addr, "tls", true)
	return s, nil
}

// serve serves an address in a goroutine that Shutdown waits for. A
// listener that fails is logged, and reported as failed by the next
// Reconcile, which opens it again.
func (l *Listeners) serve(addr string, s *listener, serve func() error) {
	l.serving.Go(func() {
		err := serve()
		if err == nil || errors.Is(err, http.ErrServerClosed) {
			return
		}
		l.config.Logger.Error(err, "Gateway listener stopped", "address", addr)
		l.mu.Lock()
		defer l.mu.Unlock()
		if l.servers[addr] == s {
			delete(l.servers, addr)
			l.failed[addr] = err
		}
	})
}

// close stops accepting on an address and lets its requests finish within
// the drain time, in the background.
func (l *Listeners) close(addr string, s *listener) {
	l.config.Logger.Info("No Gateway listens here any more; draining", "address", addr)
	l.serving.Go(func() {
		ctx, cancel := context.WithTimeout(context.Background(), l.config.Drain)
		defer cancel()
		if err := s.srv.Shutdown(ctx); err != nil {
			_ = s.srv.Close()
		}
	})
}

func (l *Listeners) newServer() *Server {
	if l.config.NewServer == nil {
		return &Server{}
	}
	return l.config.NewServer()
}

// SetKeepAlivesEnabled(false) makes every address's responses close their
// connections, as Server.SetKeepAlivesEnabled does, so that kept-alive
// clients move away while a terminating router still serves.
func (l *Listeners) SetKeepAlivesEnabled(v bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closeAll = !v
	for _, s := range l.servers {
		s.srv.SetKeepAlivesEnabled(v)
	}
}

// Shutdown stops every Gateway listener, waiting for in-flight requests
// until ctx ends and closing what is left then.
func (l *Listeners) Shutdown(ctx context.Context) {
	l.mu.Lock()
	servers := l.servers
	l.servers = map[string]*listener{}
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
	l.serving.Wait()
}

// listenConfig sets SO_REUSEPORT where the platform has it, so that
// several router processes in one network namespace (a test, a host-network
// rollout) can serve the same Gateway address side by side.
var listenConfig = net.ListenConfig{Control: reusePort}
