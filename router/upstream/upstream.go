// Package upstream keeps idle keep-alive HTTP/1.1 connections to servers, per
// address, and makes one exchange at a time on a connection, in the caller's
// goroutine; to addresses that speak HTTP/2 over cleartext (h2c, see
// Protocol) it runs one stream per exchange on few connections instead. The
// router forwards requests to model servers with it: the caller sees one
// Request, Response and error contract whichever the address speaks.
//
// Why not net/http.Transport: it runs two goroutines per connection
// (writeLoop, readLoop) and hands every request and response between them and
// the caller over channels, which profiling the router under load put at a
// large share of its CPU (docs/benchmarks/router.md). Here the caller writes the request and reads the response itself, timeouts
// are connection deadlines instead of timers, a cancelled context aborts the
// connection's I/O through context.AfterFunc, and an idle connection holds no
// buffer: the buffers are pooled and lent to an exchange. Responses are
// parsed by the standard library (http.ReadResponse); a request's head is
// written here from a Request, which costs a few fields instead of building
// an http.Request and its URL for http.Request.Write to take apart again.
//
// Servers are tenants' code, so nothing they send is trusted: response heads
// are bounded (Options.MaxResponseHeaderBytes, a few interim responses at
// most), a body ends where its framing says or with an error, never with a
// clean end it did not have, and a connection on which the server sent
// anything no request asked for is closed, never reused: a response never
// reaches another request. What the pool refuses is a *ResponseError.
package upstream

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/capstan-dev/capstan/router/wire"
)

// Options configure a Pool. The zero value of each field means its default.
type Options struct {
	// ConnectTimeout bounds dialling (the context's deadline may end it
	// sooner). Default 5s.
	ConnectTimeout time.Duration
	// MaxIdlePerAddr is how many idle connections are kept per address.
	// Default 2.
	MaxIdlePerAddr int
	// IdleTimeout is how long an idle connection is kept. Default 90s.
	IdleTimeout time.Duration
	// BufferSize is the size of the read and write buffers an exchange
	// borrows. Default 16 KiB.
	BufferSize int
	// MaxResponseHeaderBytes bounds the response heads of one exchange,
	// its interim (1xx) responses' included, together, in bytes: a server
	// that sends more gets a *ResponseError (ErrHeadTooLarge) and its
	// connection (HTTP/2: its stream) is closed. Default 64 KiB.
	MaxResponseHeaderBytes int
	// MaxH2ConnsPerAddr bounds the HTTP/2 connections to one address; a
	// new one is opened only while every open one is at the server's
	// limit of concurrent streams. Default 4.
	MaxH2ConnsPerAddr int
}

// maxInterim is how many interim (1xx) responses an exchange skips before
// its final response; one more is a *ResponseError (ErrTooManyInterim), as
// in net/http.
const maxInterim = 5

// Pool is a set of idle connections per address. It is safe for concurrent
// use.
type Pool struct {
	opts    Options
	dialer  net.Dialer
	buffers sync.Pool // *buffers

	mu   sync.Mutex
	idle map[string][]*conn

	h2 *h2Pool
}

// peeked is what a peeker finds on a connection.
type peeked int

const (
	idleQuiet peeked = iota // nothing to read: the server is waiting
	idleBytes               // bytes to read
	idleGone                // the server closed or reset it, or it is unusable
)

// conn is one connection to a server.
type conn struct {
	net.Conn
	addr      string
	reused    bool
	idleSince time.Time
	buf       *buffers // lent while an exchange runs, nil while idle
	// deadline is the read and write deadline.
	deadline wire.Deadline
	// written counts the bytes of the current exchange the kernel took:
	// while it is 0, no server can have read any of the request.
	written int
	// headRoom is how many more bytes reading the response heads may take
	// from the socket; -1 once the final head is read (the body is
	// bounded by its framing and the deadlines). headFull: the heads
	// wanted more.
	headRoom int
	headFull bool
	// readErr is the last error reading the socket gave in this exchange:
	// without one, a response that does not parse is the server's doing.
	readErr error
	// drained: the last read from the socket got less than it asked
	// for, so it left nothing there.
	drained bool
	// spent: the server closed the connection at the end of the response.
	spent bool
	peeker
}

// Write counts what reaches the socket; the exchange's buffered writer
// writes through it.
func (c *conn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.written += n
	return n, err
}

// errHeadRoom is what reading the socket gives once the response heads have
// taken all the room they have.
var errHeadRoom = errors.New("upstream: response head room exhausted")

// Read is what the exchange's buffered reader reads from: while the heads
// are read, it gives them no more than headRoom bytes. http.ReadResponse
// has no bound of its own: a head without an end would otherwise grow
// until memory ran out.
func (c *conn) Read(p []byte) (int, error) {
	if c.headRoom >= 0 {
		if c.headRoom == 0 {
			c.headFull = true
			return 0, errHeadRoom
		}
		if len(p) > c.headRoom {
			p = p[:c.headRoom]
		}
	}
	n, err := c.Conn.Read(p)
	c.drained = n < len(p)
	if c.headRoom >= 0 {
		c.headRoom -= n
	}
	if err != nil {
		c.readErr = err
	}
	return n, err
}

// ended is what reading a body that reached its end gives: io.EOF, or a
// *ResponseError when the server sent bytes beyond it (more than its
// Content-Length, or a body after a bodiless response), buffered or
// waiting on the socket. framed is false for a body that the server ended
// by closing the connection: nothing can follow it.
//
// The socket is peeked only when the last read filled what it asked for
// (a large body read past the buffer): a read that got less left nothing
// there, and what comes after it is found when the connection is next
// taken (get peeks), like anything sent while it is idle. A small
// response so costs no system call more.
func (c *conn) ended(framed bool) error {
	if !framed {
		return io.EOF
	}
	if c.buf.r.Buffered() > 0 {
		return &ResponseError{Err: ErrBytesAfterResponse}
	}
	if c.drained {
		return io.EOF
	}
	switch c.peek() {
	case idleBytes:
		return &ResponseError{Err: ErrBytesAfterResponse}
	case idleGone:
		c.spent = true
	}
	return io.EOF
}

// arm bounds the connection's reads and writes to about now+timeout
// (wire.Deadline.Arm: kept when about right).
func (c *conn) arm(timeout time.Duration) error { return c.deadline.Arm(timeout, c.SetDeadline) }

type buffers struct {
	r *bufio.Reader
	w *bufio.Writer
}

// New returns an empty pool.
func New(opts Options) *Pool {
	if opts.ConnectTimeout == 0 {
		opts.ConnectTimeout = 5 * time.Second
	}
	if opts.MaxIdlePerAddr == 0 {
		opts.MaxIdlePerAddr = 2
	}
	if opts.IdleTimeout == 0 {
		opts.IdleTimeout = 90 * time.Second
	}
	if opts.BufferSize == 0 {
		opts.BufferSize = 16 << 10
	}
	if opts.MaxResponseHeaderBytes <= 0 {
		opts.MaxResponseHeaderBytes = 64 << 10
	}
	if opts.MaxH2ConnsPerAddr <= 0 {
		opts.MaxH2ConnsPerAddr = 4
	}
	p := &Pool{
		opts:   opts,
		dialer: net.Dialer{Timeout: opts.ConnectTimeout, KeepAlive: 30 * time.Second},
		idle:   map[string][]*conn{},
	}
	p.h2 = newH2Pool(opts, &p.dialer)
	p.buffers.New = func() any {
		return &buffers{r: bufio.NewReaderSize(nil, opts.BufferSize), w: bufio.NewWriterSize(nil, opts.BufferSize)}
	}
	return p
}

// get returns an idle connection to addr, or dials a new one, with buffers.
func (p *Pool) get(ctx context.Context, addr string) (*conn, error) {
	now := time.Now()
	var c *conn
	p.mu.Lock()
	for list := p.idle[addr]; len(list) > 0 && c == nil; list = p.idle[addr] {
		last := list[len(list)-1]
		list[len(list)-1] = nil
		p.idle[addr] = list[:len(list)-1]
		// An idle connection the server closed, or sent bytes on that no
		// request asked for, is never used: a response must not reach
		// another request, and a request must not go to a connection that
		// is already gone.
		if now.Sub(last.idleSince) < p.opts.IdleTimeout && last.peek() == idleQuiet {
			c = last
			c.reused = true
		} else {
			last.Close()
		}
	}
	p.mu.Unlock()
	if c == nil {
		nc, err := p.dialer.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, &UnsentError{Err: err}
		}
		c = &conn{Conn: nc, addr: addr}
		c.attach(nc)
	}
	c.buf = p.buffers.Get().(*buffers)
	c.buf.r.Reset(c)
	c.buf.w.Reset(c)
	c.written, c.headRoom, c.headFull, c.readErr, c.drained, c.spent = 0, -1, false, nil, false, false
	return c, nil
}

// returnBuffers takes c's buffers back. A reader holding bytes the response
// did not account for means the connection cannot be reused.
func (p *Pool) returnBuffers(c *conn) (clean bool) {
	b := c.buf
	if b == nil {
		return false
	}
	c.buf = nil
	clean = b.r.Buffered() == 0 && b.w.Buffered() == 0
	b.r.Reset(nil)
	b.w.Reset(nil)
	p.buffers.Put(b)
	return clean
}

// put returns a connection whose exchange finished cleanly to the idle pool.
// Its deadlines stay as they were: every exchange arms its own.
func (p *Pool) put(c *conn) {
	c.idleSince = time.Now()
	p.mu.Lock()
	if list := p.idle[c.addr]; len(list) < p.opts.MaxIdlePerAddr {
		p.idle[c.addr] = append(list, c)
		p.mu.Unlock()
		return
	}
	p.mu.Unlock()
	c.Close()
}

// CloseIdle closes connections that have been idle for at least age (all of
// them for 0).
func (p *Pool) CloseIdle(age time.Duration) { p.closeIdle("", age, false) }

// Forget closes the connections to addr, once the exchanges running on them
// end: the address left every pool, and its connections would otherwise
// wait for the idle timeout.
func (p *Pool) Forget(addr string) { p.closeIdle(addr, 0, true) }

// closeIdle closes the idle connections of addr ("" for all) that have been
// idle for at least age; with forget, also the HTTP/2 connections that
// exchanges still use, when those end.
func (p *Pool) closeIdle(addr string, age time.Duration, forget bool) {
	p.h2.closeIdle(addr, age, forget)
	now := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	for a, list := range p.idle {
		if addr != "" && a != addr {
			continue
		}
		kept := list[:0]
		for _, c := range list {
			if now.Sub(c.idleSince) >= age {
				c.Close()
			} else {
				kept = append(kept, c)
			}
		}
		clear(list[len(kept):])
		if len(kept) == 0 {
			delete(p.idle, a)
		} else {
			p.idle[a] = kept
		}
	}
}

// Run closes connections idle for longer than the idle timeout until ctx
// ends, so that servers that went away do not keep file descriptors; then
// it closes every idle one.
func (p *Pool) Run(ctx context.Context) {
	t := time.NewTicker(p.opts.IdleTimeout / 2)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			p.CloseIdle(0)
			return
		case <-t.C:
			p.CloseIdle(p.opts.IdleTimeout)
		}
	}
}

// aLongTimeAgo is a deadline in the past, to abort a connection's I/O.
var aLongTimeAgo = time.Unix(1, 0)

// Response is a response being read from a connection. Its Body reads from
// the connection; Release ends the exchange.
//
// The Body ends with io.EOF only where the response's framing ends it
// (Content-Length, chunking, none for HEAD, 1xx, 204 and 304, or the
// server closing the connection for a response without either) and no byte
// follows. Anything else ends it with an error: a server that closes early
// (io.ErrUnexpectedEOF), bad chunking or bytes beyond the end (a
// *ResponseError), a timeout. Closing it does nothing: Release ends the
// exchange without reading on.
type Response struct {
	*http.Response
	// conn is the HTTP/1.1 connection, nil for an HTTP/2 stream (h2).
	conn *conn
	// stop unregisters the abort on the context; false means it fired.
	stop func() bool
	body body
	h2   *h2Stream
}

// body is a Response's Body: the http.Response's, checked at its end.
type body struct {
	src io.ReadCloser
	c   *conn
	// framed: the framing ends the body, not the server closing the
	// connection.
	framed bool
	// end is what reading gives once the body reached its end: io.EOF,
	// or why not.
	end error
}

func (b *body) Read(p []byte) (int, error) {
	if b.end != nil {
		return 0, b.end
	}
	n, err := b.src.Read(p)
	switch {
	case err == nil:
	case err == io.EOF:
		err = b.c.ended(b.framed)
		b.end = err
	case b.c.readErr == nil:
		// Not the socket's error: the body's framing is broken
		// (a chunk size that does not parse, a missing CRLF).
		err = &ResponseError{Err: err}
	}
	return n, err
}

// Close does nothing: Release ends the exchange, and never reads a body
// through to drain it.
func (b *body) Close() error { return nil }

// Extend bounds the next reads of the body to about timeout from now (see
// arm).
func (r *Response) Extend(timeout time.Duration) error {
	if r.h2 != nil {
		return r.h2.extend(timeout)
	}
	return r.conn.arm(timeout)
}

// Abort closes the connection (HTTP/2: resets the stream), so that the
// server sees the exchange end early. Release must still be called.
func (r *Response) Abort() {
	if r.h2 != nil {
		r.h2.cancel(nil)
		return
	}
	r.conn.Close()
}

// Request is a request to send.
type Request struct {
	// Protocol is what the address speaks.
	Protocol Protocol
	Method   string
	// Target is the request target as sent: the path and the query.
	Target string
	// Host is the Host field.
	Host string
	// Header is sent as it is, without Host, Content-Length and
	// Transfer-Encoding, which the exchange writes itself; the caller has
	// left out hop-by-hop fields.
	Header http.Header
	// Body is sent with its Content-Length; nil means no body.
	Body []byte
}

// write writes the request's head and body.
func (r *Request) write(w *bufio.Writer) error {
	w.WriteString(r.Method)
	w.WriteByte(' ')
	w.WriteString(r.Target)
	w.WriteString(" HTTP/1.1\r\n")
	wire.WriteField(w, "Host", r.Host)
	wire.WriteFields(w, r.Header, framing)
	if r.Body != nil {
		w.WriteString("Content-Length: ")
		w.WriteString(strconv.Itoa(len(r.Body)))
		w.WriteString("\r\n")
	}
	w.WriteString("\r\n")
	_, err := w.Write(r.Body)
	return err
}

func framing(name string) bool {
	switch name {
	case "Host", "Content-Length", "Transfer-Encoding":
		return true
	}
	return false
}

// headRequest tells http.ReadResponse that a response has no body; for
// every other method it is given nil.
var headRequest = &http.Request{Method: http.MethodHead}

// UnsentError is an exchange that failed before any byte of its request
// reached a server: dialling failed, or the connection failed before the
// kernel took a byte of the request. Only such a request may be sent to
// another server; any other failure may have started the work it asks for.
type UnsentError struct{ Err error }

func (e *UnsentError) Error() string { return e.Err.Error() }
func (e *UnsentError) Unwrap() error { return e.Err }

// Unsent reports whether err is an UnsentError.
func Unsent(err error) bool {
	var u *UnsentError
	return errors.As(err, &u)
}

// ResponseError is a response the pool refuses: one that does not parse as
// HTTP/1.1 or breaks a bound the pool keeps (ErrHeadTooLarge,
// ErrTooManyInterim, ErrSwitchingProtocols, a status outside 100-599), or
// bytes after a response's end (ErrBytesAfterResponse), or a body whose
// framing breaks. Its connection is closed. The request was sent: a
// ResponseError is never an UnsentError.
type ResponseError struct{ Err error }

func (e *ResponseError) Error() string { return "upstream: bad response: " + e.Err.Error() }
func (e *ResponseError) Unwrap() error { return e.Err }

// What a ResponseError may wrap.
var (
	ErrHeadTooLarge       = errors.New("response head too large")
	ErrTooManyInterim     = fmt.Errorf("more than %d interim (1xx) responses", maxInterim)
	ErrSwitchingProtocols = errors.New("101 Switching Protocols, which no request asks for")
	ErrBytesAfterResponse = errors.New("bytes after the end of the response")
	// ErrHTTP1Answer: an H2C address answered in HTTP/1.1: it does not
	// speak HTTP/2 with prior knowledge.
	ErrHTTP1Answer = errors.New("the server answered in HTTP/1.1, not HTTP/2: it does not speak h2c")
)

// RoundTrip sends req to addr and reads the response headers; the deadline
// for all of that, and for reading the body until Extend moves it, is
// now+timeout (at least seven eighths of it, see arm). Idle connections the
// server has closed, or sent anything on, are passed over before use; a
// reused one that fails before a byte of the request was written (the
// server closed it in the instant since) is replaced by a fresh one once. A
// failure before any byte of the request reached a server is an
// UnsentError; a response the pool refuses (see Options and Response) is a
// *ResponseError. Interim responses (103 Early Hints) are skipped. Release
// must be called once the response has been dealt with.
//
// To an H2C address the exchange is a stream on a shared connection, and
// the timeout a timer that resets the stream; what is an UnsentError there
// is h2Stream.failure's to say.
func (p *Pool) RoundTrip(ctx context.Context, req *Request, addr string, timeout time.Duration) (*Response, error) {
	if req.Protocol == H2C {
		return p.h2.roundTrip(ctx, req, addr, timeout)
	}
	for fresh := false; ; fresh = true {
		c, err := p.get(ctx, addr)
		if err != nil {
			return nil, err
		}
		stop := context.AfterFunc(ctx, func() { c.SetDeadline(aLongTimeAgo) })
		resp, err := c.send(req, timeout, p.opts.MaxResponseHeaderBytes)
		if err == nil {
			r := &Response{Response: resp, conn: c, stop: stop}
			r.body = body{src: resp.Body, c: c, framed: resp.ContentLength >= 0 || resp.Body == http.NoBody || isChunked(resp)}
			resp.Body = &r.body
			return r, nil
		}
		stop()
		p.returnBuffers(c)
		c.Close()
		if c.written > 0 || ctx.Err() != nil {
			return nil, err
		}
		if !c.reused || fresh {
			return nil, &UnsentError{Err: err}
		}
	}
}

func (c *conn) send(req *Request, timeout time.Duration, maxHead int) (*http.Response, error) {
	if err := c.arm(timeout); err != nil {
		return nil, err
	}
	if err := req.write(c.buf.w); err != nil {
		return nil, err
	}
	if err := c.buf.w.Flush(); err != nil {
		return nil, err
	}
	var asked *http.Request
	if req.Method == http.MethodHead {
		asked = headRequest
	}
	c.headRoom = maxHead
	for interim := 0; ; interim++ {
		resp, err := http.ReadResponse(c.buf.r, asked)
		switch {
		case err == nil:
		case c.headFull:
			// (What the parser says of the cut-off line is beside
			// the point.)
			return nil, &ResponseError{Err: fmt.Errorf("%w: more than %d bytes", ErrHeadTooLarge, maxHead)}
		case c.readErr == io.EOF:
			return nil, io.ErrUnexpectedEOF // the server closed the connection
		case c.readErr != nil:
			// The socket's error (a timeout, a reset), not what the
			// parser makes of the line it cut off.
			return nil, c.readErr
		default:
			return nil, &ResponseError{Err: err} // it does not parse
		}
		if err := checkStatus(resp.StatusCode); err != nil {
			return nil, err
		}
		if resp.StatusCode < 200 {
			// Skip interim responses (103 Early Hints); the request
			// sent no Expect, so no 100 Continue is due. A few at
			// most: their heads count against the same bound.
			if interim == maxInterim {
				return nil, &ResponseError{Err: ErrTooManyInterim}
			}
			continue
		}
		c.headRoom = -1
		return resp, nil
	}
}

// checkStatus refuses the statuses no response the pool passes on may have,
// whichever protocol brought it.
func checkStatus(code int) error {
	switch {
	case code == http.StatusSwitchingProtocols:
		// No request asks to upgrade (the caller leaves out Upgrade):
		// what follows is not HTTP, and must not reach the client or
		// another request.
		return &ResponseError{Err: ErrSwitchingProtocols}
	case code < 100 || code > 599:
		return &ResponseError{Err: fmt.Errorf("status %d out of range", code)}
	}
	return nil
}

// isChunked reports whether resp's body is chunked.
func isChunked(resp *http.Response) bool {
	return len(resp.TransferEncoding) > 0 && resp.TransferEncoding[0] == "chunked"
}

// Release ends an exchange. complete says the body was read to its end
// (io.EOF); the connection is then kept for reuse, unless the response
// asked to close it, the server closed it, or the context aborted it.
// Otherwise it is closed. An HTTP/2 stream that did not end is reset
// instead, and its connection kept for the other streams. The body must
// not be read after Release.
func (p *Pool) Release(r *Response, complete bool) {
	if r.h2 != nil {
		r.h2.release()
		return
	}
	stopped := r.stop()
	clean := p.returnBuffers(r.conn)
	if complete && r.body.end == io.EOF && stopped && clean && !r.Close && !r.conn.spent {
		p.put(r.conn)
		return
	}
	r.conn.Close()
}
