package upstream

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"

	"github.com/capstan-dev/capstan/router/wire"
)

// Protocol is how the pool speaks to an address.
type Protocol uint8

const (
	// HTTP1 is HTTP/1.1, one exchange at a time per connection (an
	// InferencePool's appProtocol "http", or none).
	HTTP1 Protocol = iota
	// H2C is HTTP/2 over cleartext TCP with prior knowledge (RFC 9113
	// section 3.3; an InferencePool's appProtocol "kubernetes.io/h2c"):
	// many exchanges at once, one stream each, on few connections.
	H2C
)

func (p Protocol) String() string {
	if p == H2C {
		return "h2c"
	}
	return "http/1.1"
}

// h2Pool holds the HTTP/2 connections of a Pool. The HTTP/2 framing, flow
// control, HPACK and stream state are net/http's: a ClientConn from
// http.Transport.NewClientConn, with the Transport speaking only unencrypted
// HTTP/2. That is the maintained API (golang.org/x/net/http2's Transport and
// ClientConnPool are deprecated in its favour, and from Go 1.27 x/net/http2
// wraps it); a ClientConn is one connection that never retries a request
// by itself, so the pool keeps the rule of what may be retried (see
// h2Stream.failure) and how many connections an address gets.
type h2Pool struct {
	t        *http.Transport
	maxConns int

	mu sync.Mutex
	// conns are the usable connections per address.
	conns map[string][]*h2Conn
	// dialing is closed when the connection being opened to an address
	// is open (or not): one at a time per address, so that a burst of
	// exchanges to a new address opens one connection, not one each.
	dialing map[string]chan struct{}
}

// h2Conn is one HTTP/2 connection. streams and idleSince are guarded by
// the h2Pool's mu.
type h2Conn struct {
	cc   *http.ClientConn
	addr string
	// streams counts the exchanges this pool runs on the connection.
	streams   int
	idleSince time.Time
	// forgotten: the connection is out of the pool (its address left, or
	// it is broken); the last exchange on it closes it.
	forgotten bool
	// proven: a response came on it, so the server's SETTINGS, which
	// come first, are known. Until then the client assumes room for
	// 100 streams (RFC 9113 section 6.5.2 leaves it unlimited), and a
	// server that allows fewer would refuse the excess: a new
	// connection gets one exchange until it is proven.
	proven bool
}

// h2WriteTimeout bounds how long a write to an HTTP/2 connection may make
// no progress (a server that stops reading) before the connection is
// closed; exchanges on it are bounded by their own timeouts besides.
const h2WriteTimeout = 30 * time.Second

// h2PingTimeout is how long an HTTP/2 connection may be silent before the
// pool pings it, and how long it then waits for the answer before closing
// it: a server that vanished without a FIN fails its streams within a
// minute rather than at their timeouts, and is not given new ones.
const h2PingTimeout = 30 * time.Second

func newH2Pool(opts Options, dialer *net.Dialer) *h2Pool {
	t := &http.Transport{
		DialContext:            dialer.DialContext,
		MaxResponseHeaderBytes: int64(opts.MaxResponseHeaderBytes),
		// Bodies go as the server sent them, as on HTTP/1.1: no
		// Accept-Encoding added, nothing decompressed.
		DisableCompression: true,
		HTTP2: &http.HTTP2Config{
			// What a server may send ahead of the reader: bounds the
			// memory a fast server or a slow client costs per stream
			// and per connection.
			MaxReceiveBufferPerStream:     1 << 20,
			MaxReceiveBufferPerConnection: 8 << 20,
			WriteByteTimeout:              h2WriteTimeout,
			SendPingTimeout:               h2PingTimeout,
			PingTimeout:                   h2PingTimeout,
		},
	}
	t.Protocols = new(http.Protocols)
	t.Protocols.SetUnencryptedHTTP2(true)
	return &h2Pool{t: t, maxConns: opts.MaxH2ConnsPerAddr, conns: map[string][]*h2Conn{}, dialing: map[string]chan struct{}{}}
}

// get returns a connection to addr with a stream reserved on it when it
// could: the first live one with room, or a new one while addr has fewer
// than maxConns, or else the least busy, on which the exchange waits for a
// stream to end.
func (h *h2Pool) get(ctx context.Context, addr string) (*h2Conn, error) {
	h.mu.Lock()
	for {
		dialing := h.dialing[addr]
		if dialing == nil {
			break
		}
		h.mu.Unlock()
		select {
		case <-dialing:
		case <-ctx.Done():
			return nil, &UnsentError{Err: context.Cause(ctx)}
		}
		h.mu.Lock()
	}
	list := h.conns[addr]
	var least *h2Conn
	for i := 0; i < len(list); {
		c := list[i]
		if c.cc.Err() != nil {
			list = h.dropLocked(addr, list, i)
			continue
		}
		if (c.proven || c.streams == 0) && c.cc.Reserve() == nil {
			c.streams++
			h.mu.Unlock()
			return c, nil
		}
		if least == nil || c.proven && !least.proven || c.proven == least.proven && c.streams < least.streams {
			least = c
		}
		i++
	}
	if least != nil && len(list) >= h.maxConns {
		least.streams++
		h.mu.Unlock()
		return least, nil
	}
	dialing := make(chan struct{})
	h.dialing[addr] = dialing
	h.mu.Unlock()

	cc, err := h.t.NewClientConn(ctx, "http", addr)

	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.dialing, addr)
	close(dialing)
	if err != nil {
		// Nothing of the request was sent: dialling, or the client
		// preface, failed.
		return nil, &UnsentError{Err: err}
	}
	c := &h2Conn{cc: cc, addr: addr, streams: 1}
	// A new connection has room until the server's SETTINGS say
	// otherwise; if it has none, the exchange waits for a stream.
	_ = cc.Reserve()
	h.conns[addr] = append(h.conns[addr], c)
	return c, nil
}

// dropLocked takes list[i] out of addr's connections, closing it unless an
// exchange still runs on it, and returns the shortened list. h.mu is held.
func (h *h2Pool) dropLocked(addr string, list []*h2Conn, i int) []*h2Conn {
	c := list[i]
	c.forgotten = true
	if c.streams == 0 {
		c.cc.Close()
	}
	list = append(list[:i], list[i+1:]...)
	list[:cap(list)][len(list)] = nil
	if len(list) == 0 {
		delete(h.conns, addr)
	} else {
		h.conns[addr] = list
	}
	return list
}

func (h *h2Pool) prove(c *h2Conn) {
	h.mu.Lock()
	c.proven = true
	h.mu.Unlock()
}

// done ends an exchange on c.
func (h *h2Pool) done(c *h2Conn) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if c.streams--; c.streams > 0 {
		return
	}
	c.idleSince = time.Now()
	if c.forgotten {
		c.cc.Close()
	}
}

// closeIdle closes the connections of addr ("" for all) on which no
// exchange has run for at least age, and with forget every connection of
// addr, those with exchanges running once they end.
func (h *h2Pool) closeIdle(addr string, age time.Duration, forget bool) {
	now := time.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	for a, list := range h.conns {
		if addr != "" && a != addr {
			continue
		}
		for i := 0; i < len(list); {
			if c := list[i]; forget || c.streams == 0 && now.Sub(c.idleSince) >= age || c.cc.Err() != nil {
				list = h.dropLocked(a, list, i)
				continue
			}
			i++
		}
	}
}

// h2Stream is one exchange on an HTTP/2 connection.
type h2Stream struct {
	pool *h2Pool
	conn *h2Conn
	ctx  context.Context
	// cancel resets the stream (RST_STREAM CANCEL) if it still runs.
	cancel context.CancelCauseFunc
	// timer cancels the stream with errStreamTimeout at the deadline;
	// deadline is when, moved by extend.
	timer    *time.Timer
	deadline wire.Deadline
	// wrote: the HEADERS of the request were written (or failed to be)
	// to the connection. Until then no server can have seen any of it.
	wrote atomic.Bool
	body  io.ReadCloser
}

// errStreamTimeout is the cause with which a stream's deadline cancels it:
// os.ErrDeadlineExceeded, a net.Error whose Timeout is true, as a
// connection deadline gives on HTTP/1.1.
var errStreamTimeout error = os.ErrDeadlineExceeded

func (s *h2Stream) extend(timeout time.Duration) error {
	return s.deadline.Arm(timeout, func(at time.Time) error {
		s.timer.Reset(time.Until(at))
		return nil
	})
}

// timedOut reports whether the stream's deadline ended it.
func (s *h2Stream) timedOut() bool { return context.Cause(s.ctx) == errStreamTimeout }

func (h *h2Pool) roundTrip(ctx context.Context, req *Request, addr string, timeout time.Duration) (*Response, error) {
	c, err := h.get(ctx, addr)
	if err != nil {
		return nil, err
	}
	s := &h2Stream{pool: h, conn: c}
	var sctx context.Context
	sctx, s.cancel = context.WithCancelCause(ctx)
	s.ctx = sctx
	s.timer = time.AfterFunc(timeout, func() { s.cancel(errStreamTimeout) })
	s.deadline.Arm(timeout, func(time.Time) error { return nil }) // the timer just set
	trace := &httptrace.ClientTrace{WroteHeaders: func() { s.wrote.Store(true) }}
	hr := &http.Request{
		Method: req.Method,
		// Opaque is sent as the :path as it is: the target is the
		// client's, already checked.
		URL:        &url.URL{Scheme: "http", Host: addr, Opaque: req.Target},
		Proto:      "HTTP/2.0",
		ProtoMajor: 2,
		Header:     req.Header,
		Host:       req.Host,
		Body:       http.NoBody,
	}
	if hr.Header == nil {
		hr.Header = http.Header{}
	}
	if req.Body != nil {
		hr.Body, hr.ContentLength = io.NopCloser(bytes.NewReader(req.Body)), int64(len(req.Body))
	}
	hr = hr.WithContext(httptrace.WithClientTrace(sctx, trace))
	resp, err := c.cc.RoundTrip(hr)
	if err == nil {
		h.prove(c)
		if err = checkStatus(resp.StatusCode); err != nil {
			resp.Body.Close()
		}
	}
	if err != nil {
		s.timer.Stop()
		s.cancel(nil)
		h.done(c)
		return nil, s.failure(ctx, err)
	}
	s.body = resp.Body
	r := &Response{Response: resp, h2: s}
	resp.Body = &h2Body{s: s}
	return r, nil
}

// goAwayUnprocessed is the message net/http's HTTP/2 client aborts a
// stream with when the server's GOAWAY says it did not process it (the
// stream's ID is above the GOAWAY's last stream ID): the error is not
// exported, and a test (TestH2CRetryRule) holds this text to it.
const goAwayUnprocessed = "http2: Transport received Server's graceful shutdown GOAWAY"

// headerListTooLarge is the cause net/http's HTTP/2 client gives a stream
// whose response head exceeds MaxResponseHeaderBytes (held by
// TestH2CHostileServer).
const headerListTooLarge = "http2: response header list larger than advertised limit"

// failure is what a failed HTTP/2 exchange returns. Only what provably
// reached no server is an UnsentError: a request whose HEADERS were never
// written, a stream the server refused (REFUSED_STREAM: RFC 9113 section
// 8.7 says it was not processed), and one above the last stream ID of the
// server's GOAWAY. Everything else may have started the work it asks for.
func (s *h2Stream) failure(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return err // the caller's own cancellation
	}
	if s.timedOut() {
		err = fmt.Errorf("http2 stream: %w", errStreamTimeout)
	}
	if strings.Contains(err.Error(), http1Header) {
		err = &ResponseError{Err: ErrHTTP1Answer}
	}
	if !s.wrote.Load() {
		return &UnsentError{Err: err}
	}
	var bad *ResponseError
	if errors.As(err, &bad) {
		return err // ErrHTTP1Answer, or checkStatus's
	}
	var se http2.StreamError
	if errors.As(err, &se) {
		switch {
		case se.Code == http2.ErrCodeRefusedStream:
			return &UnsentError{Err: err}
		case se.Cause != nil && se.Cause.Error() == headerListTooLarge:
			return &ResponseError{Err: fmt.Errorf("%w: more than %d bytes", ErrHeadTooLarge, s.pool.t.MaxResponseHeaderBytes)}
		case se.Cause != nil && se.Cause.Error() != fromPeer:
			// The client found the server's frames broken (a
			// malformed head, a bad status, content-length).
			return &ResponseError{Err: err}
		}
	}
	msg := err.Error()
	switch {
	case msg == goAwayUnprocessed:
		return &UnsentError{Err: err}
	case strings.HasPrefix(msg, connectionErrorPrefix):
		// The client found the server's frames broken and closed
		// the connection (a frame too large or on the wrong stream,
		// a head that floods CONTINUATION frames, bytes that are
		// not HTTP/2 at all).
		return &ResponseError{Err: err}
	}
	return err
}

// fromPeer is the Cause of a StreamError the server sent (RST_STREAM), as
// against one the client raised (held by TestH2CRetryRule: a reset from the
// server is not a ResponseError).
const fromPeer = "received from peer"

// connectionErrorPrefix begins the message of the error net/http's HTTP/2
// client fails every stream with when it finds the server broke the
// protocol (its ConnectionError type is not exported; TestH2CHostileServer
// holds this to it).
const connectionErrorPrefix = "connection error: "

// http1Header is in the message of the error net/http's HTTP/2 client gives
// when what came back starts like an HTTP/1.1 status line.
const http1Header = "looked like an HTTP/1.1 header"

// h2Body is an HTTP/2 Response's Body: the stream's, with its deadline's
// end given as a timeout. It ends with io.EOF only at END_STREAM with the
// length the server declared, if any.
type h2Body struct{ s *h2Stream }

func (b *h2Body) Read(p []byte) (int, error) {
	n, err := b.s.body.Read(p)
	if err != nil && err != io.EOF && b.s.timedOut() {
		err = fmt.Errorf("http2 stream: %w", errStreamTimeout)
	}
	return n, err
}

// Close does nothing: Release ends the exchange.
func (b *h2Body) Close() error { return nil }

// release ends the exchange: an unfinished stream is reset (RST_STREAM
// CANCEL), and the connection stays for other streams.
func (s *h2Stream) release() {
	s.timer.Stop()
	s.body.Close()
	s.cancel(nil)
	s.pool.done(s.conn)
}
