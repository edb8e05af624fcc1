// Package server serves cleartext HTTP/1.1 to an http.Handler with one
// goroutine per connection and nothing else per request.
//
// Why not net/http.Server: for every request it starts a background read of
// the client's connection once the body has been read (to notice a client
// that goes away), and when the handler returns it aborts that read and waits
// for the reading goroutine to finish — a goroutine start, two deadline
// changes and a hand-off between goroutines per request. Sorting the response
// headers and a context per request add to it. For the router, whose own work
// per request is small, that machinery was a large share of its CPU
// (docs/benchmarks/router.md has the profile). Here the connection's goroutine reads a
// request, runs the handler and writes the response; the client's connection
// is watched only for requests still running after WatchDelay, which model
// requests that matter to cancel always are.
//
// One difference from net/http a handler must know: a request's context is
// its connection's. It is cancelled when the client goes away (cause
// ErrClientGone) or the connection closes, not when ServeHTTP returns, so a
// handler must not leave work behind that waits for it to end. Creating,
// and subscribing to, a fresh context for every request showed in the
// router's profile. The response writer and the body reader are reused by
// the connection's next request, so, as net/http's
// documentation already demands, neither may be used after ServeHTTP
// returns.
//
// The request parsing is the standard library's (http.ReadRequest), as are
// the request bodies (Content-Length and chunked) and http.Handler; what
// the server adds to it for clients that are strangers (head limits, the
// framing and Host rules of RFC 9112 that ReadRequest leaves to its
// caller, timeouts for clients that send or read too slowly) follows
// net/http.Server, which a differential fuzz test (fuzz_test.go) holds it
// to, with each deliberate difference named there. TLS listeners, and with
// them HTTP/2, stay with net/http.Server.
package server

import (
	"bufio"
	"context"
	"errors"
	"io"
	"math"
	"net"
	"net/http"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/http/httpguts"
	"k8s.io/klog/v2"

	"github.com/capstan-dev/capstan/router/wire"
)

// Server serves HTTP/1.1 on listeners. Set its fields before the first call
// to Serve and do not change them after.
type Server struct {
	// Handler answers every request.
	Handler http.Handler
	// ReadHeaderTimeout bounds reading a request's head: the first
	// request's from the moment the connection is accepted (as net/http
	// does, so that a client that connects and sends nothing, or trickles
	// its head, holds the connection no longer), a later one's from its
	// first byte. It bounds the body again, from the end of the head.
	// Default 30s.
	ReadHeaderTimeout time.Duration
	// IdleTimeout bounds the wait for the next request on a kept-alive
	// connection. Default 120s.
	IdleTimeout time.Duration
	// WriteTimeout bounds each write to the client's connection: one that
	// makes no progress for that long (a client that stopped reading, its
	// TCP window closed) fails, as does every write after it, the
	// request's context is cancelled with ErrClientStalled and the
	// connection closed. It is re-armed on every write, so a response
	// that keeps flowing, a long stream included, is never cut. Default
	// 30s.
	WriteTimeout time.Duration
	// MaxHeaderBytes bounds a request's head, request line included (up
	// to 4 KiB more are let through, as net/http does). Above it the
	// client gets 431 Request Header Fields Too Large and the connection
	// closes. Default 64 KiB (Envoy's default).
	MaxHeaderBytes int
	// MaxHeaderFields bounds the number of field lines in a request's
	// head (a continuation line counts as one); above it, as above
	// MaxHeaderBytes. Default 100 (Envoy's default).
	MaxHeaderFields int
	// WatchDelay is how long a request runs before the server starts
	// watching its client's connection, to cancel the request's context
	// when the client goes away. Default 10ms.
	WatchDelay time.Duration
	// Logger logs handler panics. Default klog's.
	Logger klog.Logger

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	closing   atomic.Bool
	// noKeepAlives is SetKeepAlivesEnabled(false).
	noKeepAlives atomic.Bool
}

// The defaults of Server's limits.
const (
	DefaultReadHeaderTimeout = 30 * time.Second
	DefaultIdleTimeout       = 120 * time.Second
	DefaultWriteTimeout      = 30 * time.Second
	DefaultMaxHeaderBytes    = 64 << 10
	DefaultMaxHeaderFields   = 100
)

// ErrServerClosed is what Serve returns after Shutdown or Close, the same
// value as net/http's so that callers treat both servers alike.
var ErrServerClosed = http.ErrServerClosed

// discardLimit is how much of a request body the handler left unread the
// server reads past to keep the connection; beyond it, it closes instead.
const discardLimit = 256 << 10

func (s *Server) readHeaderTimeout() time.Duration {
	return orDefault(s.ReadHeaderTimeout, DefaultReadHeaderTimeout)
}
func (s *Server) idleTimeout() time.Duration  { return orDefault(s.IdleTimeout, DefaultIdleTimeout) }
func (s *Server) writeTimeout() time.Duration { return orDefault(s.WriteTimeout, DefaultWriteTimeout) }
func (s *Server) watchDelay() time.Duration   { return orDefault(s.WatchDelay, 10*time.Millisecond) }

func (s *Server) maxHeaderBytes() int64 {
	if s.MaxHeaderBytes > 0 {
		return int64(s.MaxHeaderBytes)
	}
	return DefaultMaxHeaderBytes
}

func (s *Server) maxHeaderFields() int {
	if s.MaxHeaderFields > 0 {
		return s.MaxHeaderFields
	}
	return DefaultMaxHeaderFields
}

func orDefault(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// Serve accepts connections on ln until ln fails or the server is shut
// down; it then returns ErrServerClosed. It closes ln.
func (s *Server) Serve(ln net.Listener) error {
	if !s.track(ln) {
		ln.Close()
		return ErrServerClosed
	}
	defer s.untrack(ln)
	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if s.closing.Load() {
				return ErrServerClosed
			}
			// Running out of file descriptors passes; back off as
			// net/http does rather than spin or stop serving.
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.logger().Error(err, "Accepting a connection failed; retrying", "in", backoff)
				time.Sleep(backoff)
				continue
			}
			return err
		}
		backoff = 0
		c := s.newConn(nc)
		if c == nil {
			nc.Close()
			continue
		}
		go c.serve()
	}
}

func (s *Server) logger() klog.Logger {
	if s.Logger.GetSink() == nil {
		return klog.Background()
	}
	return s.Logger
}

func (s *Server) track(ln net.Listener) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing.Load() {
		return false
	}
	if s.listeners == nil {
		s.listeners = map[net.Listener]struct{}{}
	}
	s.listeners[ln] = struct{}{}
	return true
}

func (s *Server) untrack(ln net.Listener) {
	s.mu.Lock()
	delete(s.listeners, ln)
	s.mu.Unlock()
	ln.Close()
}

// SetKeepAlivesEnabled controls whether connections are kept alive
// between requests, as they are by default; it is net/http's method. To
// drain a server before Shutdown: after SetKeepAlivesEnabled(false) every
// response says Connection: close and its connection closes after it, and
// the connections waiting between requests close at once, so that
// kept-alive clients move to other replicas while this one still answers.
func (s *Server) SetKeepAlivesEnabled(v bool) {
	s.noKeepAlives.Store(!v)
	if !v {
		s.closeIdle(false)
	}
}

func (s *Server) keepAlives() bool { return !s.noKeepAlives.Load() && !s.closing.Load() }

// Shutdown stops accepting, closes idle connections, and waits for the
// requests in flight to finish (each connection closes after its response)
// until ctx ends, when it returns ctx's error; Close then ends the rest.
func (s *Server) Shutdown(ctx context.Context) error {
	s.closeListeners()
	tick := 5 * time.Millisecond
	for {
		if s.closeIdle(true) == 0 {
			return nil
		}
		t := time.NewTimer(tick)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		tick = min(2*tick, 500*time.Millisecond)
	}
}

// Close stops accepting and closes every connection, in flight or not.
func (s *Server) Close() error {
	s.closeListeners()
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		c.cancel(errConnClosed)
		c.rwc.Close()
	}
	return nil
}

func (s *Server) closeListeners() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closing.Store(true)
	for ln := range s.listeners {
		ln.Close()
	}
}

// closeIdle closes the connections between requests, and with
// includeNew those still waiting for their first, and returns how many
// connections are left.
func (s *Server) closeIdle(includeNew bool) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		if c.state.CompareAndSwap(stateIdle, stateClosed) || includeNew && c.state.CompareAndSwap(stateNew, stateClosed) {
			c.rwc.Close()
			delete(s.conns, c)
		}
	}
	return len(s.conns)
}

// newConn sets up what a connection needs before its first request: what
// a client that connects and sends nothing, or trickles, costs. The
// response's buffers wait for a request to answer.
func (s *Server) newConn(nc net.Conn) *conn {
	c := &conn{srv: s, rwc: nc, remoteAddr: nc.RemoteAddr().String(), writeTimeout: s.writeTimeout()}
	c.ctx, c.cancel = context.WithCancelCause(context.Background())
	c.cr = connReader{nc: nc, left: math.MaxInt64, maxFields: s.maxHeaderFields()}
	c.br = bufio.NewReaderSize(&c.cr, 4<<10)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing.Load() {
		return nil
	}
	if s.conns == nil {
		s.conns = map[*conn]struct{}{}
	}
	s.conns[c] = struct{}{}
	return c
}

func (s *Server) forget(c *conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// A connection's states, for Shutdown and SetKeepAlivesEnabled: only a
// connection waiting for a request is closed under a request's feet, and
// the connection takes a request only if it was not.
const (
	stateNew    int32 = iota // waiting for its first request
	stateIdle                // waiting for another
	stateActive              // reading or serving a request
	stateClosed
)

// conn is one client connection and what its goroutine reuses from one
// request to the next.
type conn struct {
	srv        *Server
	rwc        net.Conn
	remoteAddr string
	cr         connReader // bounds and scans a request's head
	br         *bufio.Reader
	bw         *bufio.Writer // nil until the first request is read
	state      atomic.Int32  // stateNew, stateIdle, stateActive or stateClosed
	// afterPOST: the last request was a POST, after which a few stray
	// line ends are skipped, as net/http does (RFC 9112 section 2.2).
	afterPOST bool
	// readDeadline and writeDeadline are the connection's deadlines.
	readDeadline, writeDeadline wire.Deadline
	writeTimeout                time.Duration
	// resp and body are the current request's response and body, reused
	// from one request to the next.
	resp response
	body requestBody

	// The watch on the client's connection while a request runs.
	watch      *time.Timer
	watchMu    sync.Mutex
	watchState watchState
	watchDone  chan struct{}

	// ctx is every request's context on this connection; cancel ends it
	// when the client goes away or the connection closes.
	ctx    context.Context
	cancel context.CancelCauseFunc
}

type watchState int

const (
	watchOff     watchState = iota // no request is being watched
	watchArmed                     // the timer is set for the running request
	watchReading                   // a goroutine is reading the connection
)

// ErrClientGone is the cause of a request context the server cancelled
// because its client closed the connection.
var ErrClientGone = errors.New("the client closed the connection")

// ErrClientStalled is the cause of a request context the server cancelled,
// and the connection it closed, because the client read none of its
// response for WriteTimeout.
var ErrClientStalled = errors.New("the client stopped reading its response")

var errConnClosed = errors.New("the connection is closed")

func (c *conn) serve() {
	defer func() {
		if p := recover(); p != nil {
			// A bug of the server's own: it costs this connection, not
			// the process (net/http recovers here too).
			buf := make([]byte, 64<<10)
			buf = buf[:runtime.Stack(buf, false)]
			c.srv.logger().Error(nil, "Panic serving a connection", "remote", c.remoteAddr, "panic", p, "stack", string(buf))
		}
		c.cancel(errConnClosed)
		c.rwc.Close()
		c.srv.forget(c)
	}()
	idle, readHeader := c.srv.idleTimeout(), c.srv.readHeaderTimeout()
	maxHead, maxFields := c.srv.maxHeaderBytes(), c.srv.maxHeaderFields()
	for first := true; ; first = false {
		waiting := stateNew
		// The first request's head must come within ReadHeaderTimeout of
		// the connection's start; a later one's within ReadHeaderTimeout
		// of its first byte, which may take IdleTimeout to come.
		wait := readHeader
		if !first {
			waiting, wait = stateIdle, idle
			c.state.Store(stateIdle)
			if !c.srv.keepAlives() {
				return
			}
		} else if c.srv.closing.Load() {
			return
		}
		if c.armRead(wait) != nil {
			return
		}
		if first {
			// A head may bring MaxHeaderBytes and 4 KiB more (a bufio
			// read's worth), counted, as net/http counts them, from the
			// first read of a connection's first request and, for a later
			// one, past what was buffered when it began.
			c.cr.left = maxHead + 4096
		}
		if _, err := c.br.Peek(1); err != nil {
			return
		}
		if !c.state.CompareAndSwap(waiting, stateActive) {
			return // Shutdown or SetKeepAlivesEnabled closed it
		}
		armed := first
		if !first {
			// As net/http: a later request is read once 4 bytes of it
			// have come, and a client that closes before gets no answer.
			if c.br.Buffered() < 4 {
				if c.armRead(readHeader) != nil {
					return
				}
				armed = true
			}
			peek, err := c.br.Peek(4)
			if err != nil {
				return
			}
			if c.afterPOST {
				c.br.Discard(leadingLineEnds(peek))
			}
			c.cr.left = maxHead + 4096
		}
		buffered, _ := c.br.Peek(c.br.Buffered())
		c.cr.scan.start(buffered)
		// The head (and the body) must arrive within ReadHeaderTimeout;
		// when the head came with the first read, as a small request's
		// does, there is nothing to wait for and no deadline to set.
		if !armed && !c.cr.scan.ended && c.armRead(readHeader) != nil {
			return
		}
		var req *http.Request
		var err error
		if c.cr.scan.fields() <= maxFields {
			req, err = http.ReadRequest(c.br)
		}
		c.cr.scan.on = false
		headTooLarge := c.cr.left <= 0 || c.cr.scan.fields() > maxFields
		c.cr.left = math.MaxInt64
		if c.bw == nil {
			c.bw = bufio.NewWriterSize(connWriter{c}, 4<<10)
		}
		if err != nil || headTooLarge {
			c.badRequest(err, headTooLarge)
			return
		}
		c.afterPOST = req.Method == http.MethodPost
		if (req.ContentLength < 0 || req.ContentLength > int64(c.br.Buffered())) && c.armRead(readHeader) != nil {
			return
		}
		if !c.handle(req) {
			return
		}
	}
}

// leadingLineEnds counts the CRs and LFs that b starts with.
func leadingLineEnds(b []byte) int {
	n := 0
	for n < len(b) && (b[n] == '\r' || b[n] == '\n') {
		n++
	}
	return n
}

// armRead bounds the connection's reads to about now+timeout
// (wire.Deadline.Arm: kept when about right).
func (c *conn) armRead(timeout time.Duration) error {
	return c.readDeadline.Arm(timeout, c.rwc.SetReadDeadline)
}

// connWriter is what a connection's bufio.Writer writes to: the
// connection, each write bounded by WriteTimeout. A failed write ends the
// request and the connection: nothing more can reach the client.
type connWriter struct{ c *conn }

func (w connWriter) Write(p []byte) (int, error) {
	c := w.c
	if err := c.writeDeadline.Arm(c.writeTimeout, c.rwc.SetWriteDeadline); err != nil {
		return 0, err
	}
	n, err := c.rwc.Write(p)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			c.cancel(ErrClientStalled)
		} else {
			c.cancel(ErrClientGone)
		}
		c.rwc.Close()
	}
	return n, err
}

// badRequest answers a request that could not be read, when there is
// anyone to answer.
func (c *conn) badRequest(err error, headTooLarge bool) {
	switch {
	case headTooLarge:
		c.bw.WriteString("HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n431 Request Header Fields Too Large")
	case isCommonNetReadError(err):
		return // the client went away or timed out
	default:
		c.bw.WriteString("HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request")
	}
	if c.bw.Flush() == nil {
		c.closeWriteAndDrain()
	}
}

// isCommonNetReadError is net/http's test of a read error not worth an
// answer: the client closed before a request began, or the connection
// failed or timed out. A head cut short (io.ErrUnexpectedEOF), by a client
// that may still read, and a malformed one are answered 400. (A
// malformed request target's *url.Error is a net.Error too, but no
// timeout.)
func isCommonNetReadError(err error) bool {
	if err == io.EOF {
		return true
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	var oe *net.OpError
	return errors.As(err, &oe) && oe.Op == "read"
}

// closeWriteAndDrain ends a connection whose client may still be sending
// (a rejected or unread body, a bad request): closing with unread bytes
// would reset the connection, and the reset can destroy the response
// before the client reads it. So the server half-closes and reads what
// comes until the client closes too, for a bounded time.
func (c *conn) closeWriteAndDrain() {
	if cw, ok := c.rwc.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
		c.rwc.SetReadDeadline(time.Now().Add(lingerTimeout))
		io.CopyN(io.Discard, c.rwc, discardLimit)
	}
}

// lingerTimeout bounds closeWriteAndDrain; net/http waits as long.
const lingerTimeout = 500 * time.Millisecond

// handle serves one request and reports whether the connection can take
// another.
func (c *conn) handle(parsed *http.Request) (keep bool) {
	req := parsed.WithContext(c.ctx)
	req.RemoteAddr = c.remoteAddr
	head := &c.cr.scan
	// Expect as net/http reads it: 100-continue among the first field's
	// tokens asks for an interim response (which only an HTTP/1.1 request
	// with a body gets); any other expectation fails (RFC 9110 section
	// 10.1.1).
	expect := req.Header.Get("Expect")
	continues := hasToken(expect, "100-continue")
	body := &c.body
	*body = requestBody{ReadCloser: req.Body, c: c, parsed: parsed, served: req,
		expectContinue: continues && req.ProtoAtLeast(1, 1) && req.ContentLength != 0}
	// A request without a body has read it all: it can be watched.
	body.sawEOF.Store(req.Body == http.NoBody)
	req.Body = body
	w := &c.resp
	w.reset(c, req)
	if head.suspiciousFraming(req.ProtoAtLeast(1, 1)) {
		w.closeAfter = true
	}

	switch {
	case req.ProtoMajor != 1:
		w.closeAfter = true
		http.Error(w, "HTTP/1.0 and HTTP/1.1 only", http.StatusHTTPVersionNotSupported)
	case req.ProtoAtLeast(1, 1) && head.hosts == 0 && req.Method != http.MethodConnect:
		// RFC 9112 section 3.2; a request target in absolute form does
		// not make up for it.
		w.closeAfter = true
		http.Error(w, "missing required Host header", http.StatusBadRequest)
	case head.badName:
		w.closeAfter = true
		http.Error(w, "invalid header name", http.StatusBadRequest)
	case head.badHost || !httpguts.ValidHostHeader(req.Host):
		w.closeAfter = true
		http.Error(w, "malformed Host header", http.StatusBadRequest)
	case !continues && expect != "":
		w.closeAfter = true
		http.Error(w, "unsupported Expect", http.StatusExpectationFailed)
	case !c.serveHandler(w, req):
		return false
	}
	if c.ctx.Err() != nil {
		// The client stopped sending (it may only have half-closed and
		// still read): answer, then close.
		w.closeAfter = true
		w.finish()
		return false
	}
	if body.expectContinue && !body.sentContinue || !body.drain() {
		// The client may still be sending a body nobody reads.
		w.closeAfter = true
	}
	if err := w.finish(); err != nil {
		return false
	}
	if w.closeAfter {
		c.closeWriteAndDrain()
		return false
	}
	return true
}

// serveHandler runs the handler with the client's connection watched once
// the request has run for WatchDelay. It reports false when the handler
// aborted the response by panicking.
func (c *conn) serveHandler(w *response, req *http.Request) (ok bool) {
	c.startWatch()
	defer c.stopWatch()
	defer func() {
		if p := recover(); p != nil {
			if p != http.ErrAbortHandler {
				buf := make([]byte, 64<<10)
				buf = buf[:runtime.Stack(buf, false)]
				c.srv.logger().Error(nil, "Panic serving a request", "remote", c.remoteAddr, "panic", p, "stack", string(buf))
			}
			ok = false
		}
	}()
	c.srv.Handler.ServeHTTP(w, req)
	return true
}

func (c *conn) startWatch() {
	c.watchMu.Lock()
	c.watchState = watchArmed
	if c.watch == nil {
		c.watch = time.AfterFunc(c.srv.watchDelay(), c.watchClient)
	} else {
		c.watch.Reset(c.srv.watchDelay())
	}
	c.watchMu.Unlock()
}

// watchClient runs (in the timer's goroutine) once a request has run for
// WatchDelay: it waits for the client's connection to end or to bring more
// bytes. An end cancels the request; bytes (a pipelined request) stay
// buffered for the next one.
func (c *conn) watchClient() {
	c.watchMu.Lock()
	if c.watchState != watchArmed {
		c.watchMu.Unlock()
		return
	}
	if !c.body.sawEOF.Load() {
		// The handler may still read the body: the connection is its.
		// Look again later.
		c.watch.Reset(c.srv.watchDelay())
		c.watchMu.Unlock()
		return
	}
	c.watchState = watchReading
	c.watchDone = make(chan struct{})
	done := c.watchDone
	// The read deadline left from reading the request (idle or head and
	// body) must not end the watch of a long request; stopWatch, which
	// takes the lock after this, ends it with a deadline in the past.
	c.rwc.SetReadDeadline(time.Time{})
	c.watchMu.Unlock()

	defer close(done)
	_, err := c.br.Peek(1)
	var ne net.Error
	if err != nil && !(errors.As(err, &ne) && ne.Timeout()) {
		c.cancel(ErrClientGone)
	}
}

// stopWatch ends the watch of a finished request, waiting for a reader it
// started so that the connection is the connection goroutine's again.
func (c *conn) stopWatch() {
	c.watchMu.Lock()
	state, done := c.watchState, c.watchDone
	c.watchState = watchOff
	if state == watchArmed {
		c.watch.Stop()
	}
	c.watchMu.Unlock()
	if state != watchReading {
		return
	}
	c.rwc.SetReadDeadline(aLongTimeAgo)
	c.readDeadline.Forget()
	<-done
}

var aLongTimeAgo = time.Unix(1, 0)

// requestBody is a request's body as the handler sees it: it sends
// 100 Continue on the first read when the client asked for it, and records
// the end of the body, after which the connection may be watched.
type requestBody struct {
	io.ReadCloser
	c *conn
	// parsed is the request as http.ReadRequest returned it, served the
	// handler's copy of it (with the connection's context). The body
	// stores trailers it did not declare in parsed's Trailer.
	parsed, served *http.Request
	expectContinue bool
	sentContinue   bool
	sawEOF         atomic.Bool
}

func (b *requestBody) Read(p []byte) (int, error) {
	if b.expectContinue && !b.sentContinue {
		b.sentContinue = true
		if b.c.resp.headWritten {
			// Too late for an interim response: the client sends the
			// body once it tires of waiting for one.
			return b.read(p)
		}
		if _, err := b.c.bw.WriteString("HTTP/1.1 100 Continue\r\n\r\n"); err != nil {
			return 0, err
		}
		if err := b.c.bw.Flush(); err != nil {
			return 0, err
		}
	}
	return b.read(p)
}

func (b *requestBody) read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		if b.served.Trailer == nil {
			b.served.Trailer = b.parsed.Trailer
		}
		b.sawEOF.Store(true)
	}
	return n, err
}

// drain reads what the handler left of the body, up to a limit, and
// reports whether the connection is positioned at the next request.
func (b *requestBody) drain() bool {
	if b.sawEOF.Load() {
		return true
	}
	if b.expectContinue && !b.sentContinue {
		return false
	}
	n, err := io.CopyN(io.Discard, b.ReadCloser, discardLimit+1)
	return err == io.EOF && n <= discardLimit
}
