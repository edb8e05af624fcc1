package proxy

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"
)

// upstreams keeps idle keep-alive connections to model servers, per
// endpoint address, and makes one HTTP/1.1 exchange at a time on a
// connection, in the caller's goroutine.
//
// Why not net/http.Transport: profiling the router under load (see
// docs/benchmarks/router.md) showed a third of its CPU in the Transport's
// machinery around the syscalls, chiefly the two goroutines it runs per
// connection (writeLoop, readLoop) and the channel hand-offs between them and
// the caller for every request. Here the handler writes the request and reads
// the response itself, timeouts are connection deadlines instead of timers,
// and a cancelled client request aborts the connection's I/O through
// context.AfterFunc. The HTTP/1.1 framing is still the standard library's:
// http.Request.Write and http.ReadResponse.
type upstreams struct {
	dialer      net.Dialer
	maxIdle     int
	idleTimeout time.Duration

	mu   sync.Mutex
	idle map[string][]*upConn
}

// upConn is one connection to a model server.
type upConn struct {
	net.Conn
	addr      string
	br        *bufio.Reader
	bw        *bufio.Writer
	reused    bool
	idleSince time.Time
}

func newUpstreams(connectTimeout time.Duration, maxIdle int, idleTimeout time.Duration) *upstreams {
	return &upstreams{
		dialer:      net.Dialer{Timeout: connectTimeout, KeepAlive: 30 * time.Second},
		maxIdle:     maxIdle,
		idleTimeout: idleTimeout,
		idle:        map[string][]*upConn{},
	}
}

// get returns an idle connection to addr, or dials a new one.
func (u *upstreams) get(ctx context.Context, addr string) (*upConn, error) {
	now := time.Now()
	u.mu.Lock()
	for list := u.idle[addr]; len(list) > 0; list = u.idle[addr] {
		c := list[len(list)-1]
		list[len(list)-1] = nil
		u.idle[addr] = list[:len(list)-1]
		if now.Sub(c.idleSince) < u.idleTimeout {
			u.mu.Unlock()
			c.reused = true
			return c, nil
		}
		c.Close()
	}
	u.mu.Unlock()
	conn, err := u.dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return &upConn{Conn: conn, addr: addr, br: bufio.NewReaderSize(conn, 16<<10), bw: bufio.NewWriterSize(conn, 16<<10)}, nil
}

// put returns a connection whose exchange finished cleanly to the idle pool.
// Its deadlines stay as they were: every exchange sets its own.
func (u *upstreams) put(c *upConn) {
	c.idleSince = time.Now()
	u.mu.Lock()
	if list := u.idle[c.addr]; len(list) < u.maxIdle {
		u.idle[c.addr] = append(list, c)
		u.mu.Unlock()
		return
	}
	u.mu.Unlock()
	c.Close()
}

// closeIdle closes idle connections that have been idle for at least age
// (all of them for 0).
func (u *upstreams) closeIdle(age time.Duration) {
	now := time.Now()
	u.mu.Lock()
	defer u.mu.Unlock()
	for addr, list := range u.idle {
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
			delete(u.idle, addr)
		} else {
			u.idle[addr] = kept
		}
	}
}

// sweep closes connections idle for longer than the idle timeout until ctx
// ends, so that endpoints that went away do not keep file descriptors.
func (u *upstreams) sweep(ctx context.Context) {
	t := time.NewTicker(u.idleTimeout / 2)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			u.closeIdle(0)
			return
		case <-t.C:
			u.closeIdle(u.idleTimeout)
		}
	}
}

// aLongTimeAgo is a deadline in the past, to abort a connection's I/O.
var aLongTimeAgo = time.Unix(1, 0)

// upstreamResponse is a response being read from a connection.
type upstreamResponse struct {
	resp *http.Response
	conn *upConn
	// stop unregisters the abort on ctx; false means it already fired.
	stop func() bool
}

// roundTrip sends req to addr and reads the response headers, within
// firstByte of sending. A stale keep-alive connection (closed by the server
// while idle, so the exchange fails before any response byte) is replaced by
// a fresh one once, without counting as a failure of the endpoint; req must
// have GetBody for that.
func (u *upstreams) roundTrip(ctx context.Context, req *http.Request, addr string, firstByte time.Duration) (*upstreamResponse, error) {
	for fresh := false; ; fresh = true {
		c, err := u.get(ctx, addr)
		if err != nil {
			return nil, err
		}
		stop := context.AfterFunc(ctx, func() { c.SetDeadline(aLongTimeAgo) })
		resp, err := c.send(req, firstByte)
		if err == nil {
			return &upstreamResponse{resp: resp, conn: c, stop: stop}, nil
		}
		stop()
		c.Close()
		if c.reused && !fresh && ctx.Err() == nil && staleConn(err) && req.GetBody != nil {
			if req.Body, err = req.GetBody(); err != nil {
				return nil, err
			}
			continue
		}
		return nil, err
	}
}

func (c *upConn) send(req *http.Request, firstByte time.Duration) (*http.Response, error) {
	if err := c.SetDeadline(time.Now().Add(firstByte)); err != nil {
		return nil, err
	}
	if err := req.Write(c.bw); err != nil {
		return nil, err
	}
	if err := c.bw.Flush(); err != nil {
		return nil, err
	}
	for {
		resp, err := http.ReadResponse(c.br, req)
		if err != nil {
			return nil, err
		}
		// Skip interim responses (103 Early Hints); the request sent no
		// Expect, so no 100 Continue is due.
		if resp.StatusCode >= 100 && resp.StatusCode < 200 && resp.StatusCode != http.StatusSwitchingProtocols {
			continue
		}
		return resp, nil
	}
}

// staleConn reports whether an exchange on a reused connection failed the
// way a connection the server closed while idle fails: EOF or a reset
// before any response.
func staleConn(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// release ends an exchange: the connection goes back to the pool when its
// response was read to the end and may be reused, and is closed otherwise.
func (u *upstreams) release(x *upstreamResponse, complete bool) {
	stopped := x.stop()
	if complete && stopped && !x.resp.Close {
		u.put(x.conn)
		return
	}
	x.conn.Close()
}
