package scrape

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"syscall"
	"time"
)

// keepAlive is the scraper's default transport. A scraper fetches each
// target once per interval, one fetch at a time, so it keeps at most one
// idle connection per address, and an idle connection holds nothing but its
// socket: no goroutine and no buffer, which net/http.Transport keeps two of
// each per connection (docs/benchmarks/adapter.md has what that costs at
// thousands of pods). The request is written by net/http (Request.Write)
// and the response parsed by it (http.ReadResponse).
//
// Pods are tenants' code: the response heads of an exchange are bounded
// (maxHeadBytes, maxInterim interim responses), a 101 Switching Protocols
// is refused, and a connection on which the server sent anything beyond a
// response, or while it was idle, is closed, never reused. The page itself
// is bounded by the scraper (Options.MaxPageBytes).
type keepAlive struct {
	dialer  net.Dialer
	buffers sync.Pool // *exchangeBuffers

	mu   sync.Mutex
	idle map[string]idleConn
}

type idleConn struct {
	net.Conn
	since time.Time
}

// exchangeBuffers are lent to one exchange: a request is a hundred bytes and
// the page is read by the caller, so small ones do.
type exchangeBuffers struct {
	r   *bufio.Reader // reads from src
	w   *bufio.Writer
	src headBound
}

const exchangeBufferSize = 4 << 10

const (
	// maxHeadBytes bounds the response heads of an exchange, interim
	// ones included, together; http.ReadResponse has no bound of its own.
	maxHeadBytes = 64 << 10
	// maxInterim is how many interim (1xx) responses an exchange skips;
	// one more is an error, as in net/http.
	maxInterim = 5
	// idleProbe is how long take waits for a byte on an idle connection
	// before using it (see quiet).
	idleProbe = 100 * time.Microsecond
)

var (
	errHeadTooLarge       = fmt.Errorf("scrape: response head larger than %d bytes", maxHeadBytes)
	errTooManyInterim     = fmt.Errorf("scrape: more than %d interim (1xx) responses", maxInterim)
	errSwitchingProtocols = errors.New("scrape: 101 Switching Protocols, which no scrape asks for")
)

// headBound is what an exchange's buffered reader reads from: the
// connection, giving no more than room bytes while the response heads are
// read (room < 0: unbounded, for the body). full: the heads wanted more.
type headBound struct {
	c    net.Conn
	room int
	full bool
}

func (h *headBound) Read(p []byte) (int, error) {
	if h.room < 0 {
		return h.c.Read(p)
	}
	if h.room == 0 {
		h.full = true
		return 0, errHeadTooLarge
	}
	if len(p) > h.room {
		p = p[:h.room]
	}
	n, err := h.c.Read(p)
	h.room -= n
	return n, err
}

var _ http.RoundTripper = &keepAlive{}

func newKeepAlive() *keepAlive {
	t := &keepAlive{idle: map[string]idleConn{}}
	t.buffers.New = func() any {
		return &exchangeBuffers{r: bufio.NewReaderSize(nil, exchangeBufferSize), w: bufio.NewWriterSize(nil, exchangeBufferSize)}
	}
	return t
}

// RoundTrip sends req on the address's idle connection, or a new one, and
// reads the response head. The context's deadline bounds dialling and the
// whole exchange, reading the body included. An idle connection the server
// closed in the meantime (the exchange fails before any response byte) is
// replaced by a new one once. The connection is kept for the next request
// only when the body was read to its end, with nothing after it.
func (t *keepAlive) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Scheme != "http" {
		return nil, errors.New("scrape: the default transport speaks plain HTTP only")
	}
	addr := req.URL.Host
	if req.URL.Port() == "" {
		addr = net.JoinHostPort(req.URL.Hostname(), "80")
	}
	ctx := req.Context()
	for retried := false; ; retried = true {
		c, reused := t.take(addr)
		if reused && !quiet(c) {
			// The server closed it, or sent something no request
			// asked for: a response must not reach the next request.
			c.Close()
			c, reused = nil, false
		}
		if c == nil {
			var err error
			if c, err = t.dialer.DialContext(ctx, "tcp", addr); err != nil {
				return nil, err
			}
		}
		resp, err := t.exchange(ctx, c, addr, req)
		if err == nil {
			return resp, nil
		}
		if !reused || retried || ctx.Err() != nil || !closedWhileIdle(err) {
			return nil, err
		}
	}
}

// aLongTimeAgo is a deadline in the past, to abort a connection's I/O.
var aLongTimeAgo = time.Unix(1, 0)

func (t *keepAlive) exchange(ctx context.Context, c net.Conn, addr string, req *http.Request) (*http.Response, error) {
	deadline, _ := ctx.Deadline() // the zero time, none, without one
	if err := c.SetDeadline(deadline); err != nil {
		c.Close()
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(aLongTimeAgo) })
	b := t.buffers.Get().(*exchangeBuffers)
	b.w.Reset(c)
	b.src = headBound{c: c, room: maxHeadBytes}
	b.r.Reset(&b.src)
	err := req.Write(b.w)
	if err == nil {
		err = b.w.Flush()
	}
	var resp *http.Response
	if err == nil {
		resp, err = readResponse(b.r, req)
		if err != nil && b.src.full {
			// (Not what the parser makes of the line cut off.)
			err = errHeadTooLarge
		}
	}
	b.src.room = -1
	if err != nil {
		stop()
		t.lend(b)
		c.Close()
		return nil, err
	}
	resp.Body = &body{ReadCloser: resp.Body, t: t, conn: c, addr: addr, buf: b, stop: stop, keep: !resp.Close}
	return resp, nil
}

// readResponse reads the final response's head, skipping a few interim
// ones (103 Early Hints); their heads count against the same bound.
func readResponse(r *bufio.Reader, req *http.Request) (*http.Response, error) {
	for interim := 0; ; interim++ {
		resp, err := http.ReadResponse(r, req)
		switch {
		case err != nil:
			return nil, err
		case resp.StatusCode == http.StatusSwitchingProtocols:
			// What follows is not HTTP: the connection is closed.
			return nil, errSwitchingProtocols
		case resp.StatusCode >= 100 && resp.StatusCode < 200:
			if interim == maxInterim {
				return nil, errTooManyInterim
			}
			continue
		}
		return resp, nil
	}
}

// quiet reports whether an idle connection can carry a request: the server
// neither closed it nor sent anything on it (bytes no request asked for,
// which would otherwise be read as the next response). It waits idleProbe
// for a byte: a read with a deadline is the portable way to look. Should
// the wait end before the read looked, the connection is used as before,
// and the exchange fails or its page does not parse.
func quiet(c net.Conn) bool {
	if c.SetReadDeadline(time.Now().Add(idleProbe)) != nil {
		return false
	}
	var b [1]byte
	_, err := c.Read(b[:])
	return errors.Is(err, os.ErrDeadlineExceeded)
}

// closedWhileIdle reports whether an exchange failed the way one on a
// connection the server closed while it was idle fails: EOF or a reset
// before any response.
func closedWhileIdle(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

func (t *keepAlive) lend(b *exchangeBuffers) {
	b.r.Reset(nil)
	b.w.Reset(nil)
	t.buffers.Put(b)
}

// take returns the address's idle connection, if it has one.
func (t *keepAlive) take(addr string) (net.Conn, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	c, ok := t.idle[addr]
	if !ok {
		return nil, false
	}
	delete(t.idle, addr)
	return c.Conn, true
}

// put keeps c as the address's idle connection, closing any other.
func (t *keepAlive) put(addr string, c net.Conn) {
	t.mu.Lock()
	old, ok := t.idle[addr]
	t.idle[addr] = idleConn{Conn: c, since: time.Now()}
	t.mu.Unlock()
	if ok {
		old.Close()
	}
}

// closeIdle closes the connections idle for longer than age: those of
// targets that went away, or are failing.
func (t *keepAlive) closeIdle(age time.Duration) {
	cutoff := time.Now().Add(-age)
	var stale []net.Conn
	t.mu.Lock()
	for addr, c := range t.idle {
		if age == 0 || c.since.Before(cutoff) {
			stale = append(stale, c.Conn)
			delete(t.idle, addr)
		}
	}
	t.mu.Unlock()
	for _, c := range stale {
		c.Close()
	}
}

// body is a response body that gives its connection back when it was read
// to its end.
type body struct {
	io.ReadCloser
	t    *keepAlive
	conn net.Conn
	addr string
	buf  *exchangeBuffers
	stop func() bool
	keep bool // the response did not ask to close the connection
	eof  bool
	done bool
}

func (b *body) Read(p []byte) (int, error) {
	if b.done {
		return 0, errors.New("scrape: read after Close")
	}
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		b.eof = true
	}
	return n, err
}

// Close keeps the connection only when the body was read to its end and the
// server sent nothing after it (more than its Content-Length, a body after
// a bodiless status); it never reads on to drain a body (a page may be
// endless). Bytes that come later are found before the connection is used
// again (quiet).
func (b *body) Close() error {
	if b.done {
		return nil
	}
	b.done = true
	stopped := b.stop() // false: the context ended and aborted the I/O
	clean := b.eof && stopped && b.keep && b.buf.r.Buffered() == 0
	b.t.lend(b.buf)
	if clean && b.conn.SetDeadline(time.Time{}) == nil {
		b.t.put(b.addr, b.conn)
		return nil
	}
	return b.conn.Close()
}
