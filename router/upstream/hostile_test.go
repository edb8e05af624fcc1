package upstream

// Model servers are tenants' code: these tests play a server that breaks
// HTTP on purpose, byte by byte, and check that the pool refuses what it
// must, in bounded memory and time, and that no byte of one exchange ever
// reaches another.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/capstan-dev/capstan/test/rawhttp"
)

// serveFunc answers one request on c; false closes the connection.
type serveFunc func(c net.Conn, req *http.Request) (keep bool)

// rawServer is a server that answers each request by writing bytes of its
// own choosing to the connection.
type rawServer struct{ *rawhttp.Server }

// startRaw starts a raw server that answers with serve.
func startRaw(t testing.TB, serve serveFunc) *rawServer {
	t.Helper()
	return &rawServer{rawhttp.Start(t, func(c net.Conn, req *http.Request, _ int64) bool { return serve(c, req) })}
}

// waitFor waits until cond holds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// waitClosed waits until the server saw n connections end.
func (s *rawServer) waitClosed(t *testing.T, n int64) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%d closed connections", n), func() bool { return s.Closed.Load() >= n })
}

func request(addr, target string) *Request {
	return &Request{Method: http.MethodGet, Target: target, Host: addr}
}

// readAll reads a response's body to its end and releases the exchange.
func readAll(p *Pool, r *Response) (string, error) {
	body, err := io.ReadAll(r.Body)
	p.Release(r, err == nil)
	return string(body), err
}

// roundTrip makes one exchange and reads its body.
func roundTrip(t *testing.T, p *Pool, req *Request, addr string) (*http.Response, string, error) {
	t.Helper()
	r, err := p.RoundTrip(context.Background(), req, addr, 5*time.Second)
	if err != nil {
		return nil, "", err
	}
	body, err := readAll(p, r)
	return r.Response, body, err
}

// response is a response whose body is body, with Content-Length and the
// extra field lines.
func response(status int, body string, extra ...string) string {
	return fmt.Sprintf("HTTP/1.1 %d %s\r\nContent-Length: %d\r\n%s\r\n%s",
		status, http.StatusText(status), len(body), strings.Join(extra, ""), body)
}

// respond writes a response in one write.
func respond(c net.Conn, status int, body string, extra ...string) {
	io.WriteString(c, response(status, body, extra...))
}

func wantResponseError(t *testing.T, err, target error) {
	t.Helper()
	var re *ResponseError
	if !errors.As(err, &re) || (target != nil && !errors.Is(err, target)) {
		t.Fatalf("err = %v, want a *ResponseError wrapping %v", err, target)
	}
	if Unsent(err) {
		t.Fatalf("err = %v is an UnsentError: a request that was sent could be sent again", err)
	}
}

func TestResponseHeadIsBounded(t *testing.T) {
	field := func(n int) string { return "X-Big: " + strings.Repeat("a", n) + "\r\n" }
	for _, tc := range []struct {
		name    string
		limit   int // Options.MaxResponseHeaderBytes
		head    string
		endless bool // then bytes of a field value for ever
		wantOK  bool
	}{
		{name: "default limit, a head of just 64 KiB", head: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + field(64<<10-len("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n")-len("X-Big: \r\n\r\n")) + "\r\n", wantOK: true},
		{name: "default limit, one byte more", head: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + field(64<<10-len("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n")-len("X-Big: \r\n\r\n")+1) + "\r\n"},
		{name: "default limit, a head without end", head: "HTTP/1.1 200 OK\r\nX-Big: ", endless: true},
		{name: "default limit, a status line without end", head: "HTTP/1.1 200 ", endless: true},
		{name: "many small fields", head: "HTTP/1.1 200 OK\r\n" + strings.Repeat("X-A: b\r\n", 10000) + "Content-Length: 2\r\n\r\n"},
		{name: "a smaller limit", limit: 1 << 10, head: "HTTP/1.1 200 OK\r\n" + field(1<<10) + "Content-Length: 2\r\n\r\n"},
		{name: "interim heads count", limit: 1 << 10, head: "HTTP/1.1 103 Early Hints\r\n" + field(600) + "\r\nHTTP/1.1 200 OK\r\n" + field(600) + "Content-Length: 2\r\n\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := startRaw(t, func(c net.Conn, _ *http.Request) bool {
				io.WriteString(c, tc.head)
				if !tc.endless {
					io.WriteString(c, "ok")
					return true
				}
				chunk := bytes.Repeat([]byte("a"), 4096)
				for {
					if _, err := c.Write(chunk); err != nil {
						return false
					}
				}
			})
			p := New(Options{MaxResponseHeaderBytes: tc.limit})
			resp, body, err := roundTrip(t, p, request(srv.Addr, "/"), srv.Addr)
			if tc.wantOK {
				if err != nil || body != "ok" || resp.StatusCode != 200 {
					t.Fatalf("got %v, %q; want the response", err, body)
				}
				return
			}
			wantResponseError(t, err, ErrHeadTooLarge)
			srv.waitClosed(t, 1)
			if n, _ := idleConns(p); n != 0 {
				t.Errorf("%d idle connections kept", n)
			}
		})
	}
}

func TestInterimResponses(t *testing.T) {
	hints := func(n int) string {
		return strings.Repeat("HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n", n)
	}
	for _, tc := range []struct {
		name   string
		before string // what comes before the final response
		want   error  // nil: the final response
	}{
		{"one 103", hints(1), nil},
		{"five", hints(5), nil},
		{"a 100 Continue nobody asked for", "HTTP/1.1 100 Continue\r\n\r\n", nil},
		{"six", hints(6), ErrTooManyInterim},
		{"a flood", hints(1000), ErrTooManyInterim},
		{"101 Switching Protocols", "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", ErrSwitchingProtocols},
		{"101 after a 103", hints(1) + "HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", ErrSwitchingProtocols},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := startRaw(t, func(c net.Conn, _ *http.Request) bool {
				io.WriteString(c, tc.before)
				respond(c, 200, "final")
				return true
			})
			p := New(Options{})
			resp, body, err := roundTrip(t, p, request(srv.Addr, "/"), srv.Addr)
			if tc.want == nil {
				if err != nil || resp.StatusCode != 200 || body != "final" {
					t.Fatalf("got %v, %q; want the final response", err, body)
				}
				if n, _ := idleConns(p); n != 1 {
					t.Errorf("%d idle connections, want the connection kept", n)
				}
				return
			}
			wantResponseError(t, err, tc.want)
			// Never passed on, never pooled: the connection is closed.
			srv.waitClosed(t, 1)
			if n, _ := idleConns(p); n != 0 {
				t.Errorf("%d idle connections kept", n)
			}
		})
	}
}

// Statuses no server may answer with are refused rather than handed to a
// ResponseWriter, which panics on them.
func TestStatusOutOfRange(t *testing.T) {
	for _, status := range []string{"000", "099", "600", "999"} {
		srv := startRaw(t, func(c net.Conn, _ *http.Request) bool {
			io.WriteString(c, "HTTP/1.1 "+status+" X\r\nContent-Length: 0\r\n\r\n")
			return true
		})
		_, _, err := roundTrip(t, New(Options{}), request(srv.Addr, "/"), srv.Addr)
		wantResponseError(t, err, nil)
	}
}

// A body after a response that has none (HEAD, 204, 304) is bytes no
// request asked for: the body ends with an error and the connection is
// closed, whether the bytes came with the head or after it.
func TestBodyOnABodilessResponse(t *testing.T) {
	for _, tc := range []struct {
		name, method string
		status       int
	}{
		{"HEAD", http.MethodHead, 200},
		{"204", http.MethodGet, 204},
		{"304", http.MethodGet, 304},
	} {
		t.Run(tc.name+", with the head", func(t *testing.T) {
			srv := startRaw(t, func(c net.Conn, req *http.Request) bool {
				io.WriteString(c, fmt.Sprintf("HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\nSTRAY", tc.status))
				return true
			})
			p := New(Options{})
			req := &Request{Method: tc.method, Target: "/", Host: srv.Addr}
			resp, body, err := roundTrip(t, p, req, srv.Addr)
			wantResponseError(t, err, ErrBytesAfterResponse)
			if resp.StatusCode != tc.status || body != "" {
				t.Errorf("status %d, body %q; want %d without body", resp.StatusCode, body, tc.status)
			}
			srv.waitClosed(t, 1)
			if n, _ := idleConns(p); n != 0 {
				t.Errorf("%d idle connections kept", n)
			}
		})
		t.Run(tc.name+", after the exchange", func(t *testing.T) {
			released, sent := make(chan struct{}), make(chan struct{})
			var n atomic.Int64
			srv := startRaw(t, func(c net.Conn, req *http.Request) bool {
				if n.Add(1) > 1 {
					respond(c, 200, req.URL.Query().Get("id"))
					return true
				}
				io.WriteString(c, fmt.Sprintf("HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n", tc.status))
				<-released
				respond(c, 200, "STRAY")
				close(sent)
				return true
			})
			p := New(Options{})
			req := &Request{Method: tc.method, Target: "/?id=1", Host: srv.Addr}
			if _, _, err := roundTrip(t, p, req, srv.Addr); err != nil {
				t.Fatal(err)
			}
			close(released)
			<-sent
			waitStray(t, p)
			_, body, err := roundTrip(t, p, request(srv.Addr, "/?id=2"), srv.Addr)
			if err != nil || body != "2" {
				t.Fatalf("the next exchange got %q, %v; want its own response", body, err)
			}
			if n := srv.Opened.Load(); n != 2 {
				t.Errorf("%d connections, want the stray one replaced", n)
			}
		})
	}
}

// waitStray waits until the one idle connection of p has bytes to read.
func waitStray(t *testing.T, p *Pool) {
	t.Helper()
	waitFor(t, "the stray bytes to arrive", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, list := range p.idle {
			for _, c := range list {
				if c.peek() == idleBytes {
					return true
				}
			}
		}
		return false
	})
}

// A server that answers one request twice: the second response must never
// reach the next request.
func TestTwoResponsesToOneRequest(t *testing.T) {
	for _, later := range []bool{false, true} {
		t.Run(fmt.Sprintf("later=%v", later), func(t *testing.T) {
			released, sent := make(chan struct{}), make(chan struct{})
			srv := startRaw(t, func(c net.Conn, req *http.Request) bool {
				id := req.URL.Query().Get("id")
				if id != "1" {
					respond(c, 200, id)
					return true
				}
				first := "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1"
				if later {
					io.WriteString(c, first)
					<-released
					io.WriteString(c, first) // answers request 2 before it is sent
					close(sent)
				} else {
					io.WriteString(c, first+first) // in one write: read with the first
				}
				return true
			})
			p := New(Options{})
			addr := srv.Addr
			r, err := p.RoundTrip(context.Background(), request(addr, "/?id=1"), addr, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			body, err := readAll(p, r)
			if later {
				if err != nil || body != "1" {
					t.Fatalf("first exchange: %q, %v", body, err)
				}
				close(released)
				<-sent
				waitStray(t, p)
			} else {
				// The second response is already read with the first:
				// the first ends with an error, not as complete.
				wantResponseError(t, err, ErrBytesAfterResponse)
			}
			_, body, err = roundTrip(t, p, request(addr, "/?id=2"), addr)
			if err != nil || body != "2" {
				t.Fatalf("second exchange got %q, %v; want its own response", body, err)
			}
			if n := srv.Opened.Load(); n != 2 {
				t.Errorf("%d connections, want 2: the one with the stray response is not reused", n)
			}
		})
	}
}

// Every way a body can end short or wrong ends its read with an error,
// never io.EOF, and the connection is dropped.
func TestBrokenFramingEndsTheBodyWithAnError(t *testing.T) {
	big := strings.Repeat("x", 100<<10) // more than the read buffer: read past it
	for _, tc := range []struct {
		name     string
		response string
		close    bool // the server closes after writing it
		want     error
	}{
		{"closed before Content-Length", "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", true, io.ErrUnexpectedEOF},
		{"more than Content-Length", "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokAND MORE", false, ErrBytesAfterResponse},
		{"more than a big Content-Length", "HTTP/1.1 200 OK\r\nContent-Length: " + strconv.Itoa(len(big)) + "\r\n\r\n" + big + "MORE", false, ErrBytesAfterResponse},
		{"more than Content-Length, then close", "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nokMORE", true, ErrBytesAfterResponse},
		{"bytes after the last chunk", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nMORE", false, ErrBytesAfterResponse},
		{"invalid chunk size", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n", false, nil},
		{"chunk size overflow", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nok\r\n0\r\n\r\n", false, nil},
		{"negative chunk size", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nok\r\n0\r\n\r\n", false, nil},
		{"missing CRLF after the chunk", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX0\r\n\r\n", false, nil},
		{"chunk longer than its size", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokay\r\n0\r\n\r\n", false, nil},
		{"closed within a chunk", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\nshort", true, io.ErrUnexpectedEOF},
		{"closed before the last chunk", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n", true, io.ErrUnexpectedEOF},
		{"closed within the trailer", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Trailer: 1\r\n", true, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := startRaw(t, func(c net.Conn, _ *http.Request) bool {
				io.WriteString(c, tc.response)
				return !tc.close
			})
			p := New(Options{})
			r, err := p.RoundTrip(context.Background(), request(srv.Addr, "/"), srv.Addr, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			// Read as the proxy does, through Read, to the first error.
			buf := make([]byte, 32<<10)
			var rerr error
			for rerr == nil {
				_, rerr = r.Body.Read(buf)
			}
			p.Release(r, rerr == io.EOF)
			if rerr == io.EOF {
				t.Fatal("the body ended with io.EOF: a proxy would pass it on as complete")
			}
			if tc.want != nil && !errors.Is(rerr, tc.want) {
				t.Errorf("body ended with %v, want %v", rerr, tc.want)
			}
			srv.waitClosed(t, 1)
			if n, _ := idleConns(p); n != 0 {
				t.Errorf("%d idle connections kept", n)
			}
		})
	}
}

// A server that closes the connection right after a complete response
// (without saying Connection: close) is no error. When the socket is
// peeked at the end of the body (a large one, read past the buffer), the
// connection is not kept; else the next exchange passes it over (get).
func TestCloseAfterACompleteResponse(t *testing.T) {
	// Larger than the read buffer, small enough for the socket buffers to
	// hold it all until the client reads.
	big := strings.Repeat("x", 64<<10)
	srv := startRaw(t, func(c net.Conn, req *http.Request) bool {
		if req.URL.Path == "/small" {
			respond(c, 200, "ok")
		} else {
			respond(c, 200, big)
		}
		return false
	})
	p := New(Options{})
	for i, path := range []string{"/big", "/small", "/small"} {
		r, err := p.RoundTrip(context.Background(), request(srv.Addr, path), srv.Addr, 5*time.Second)
		if err != nil {
			t.Fatalf("exchange %d: %v", i, err)
		}
		srv.waitClosed(t, int64(i+1))
		body, err := readAll(p, r)
		if err != nil || (body != big && body != "ok") {
			t.Fatalf("exchange %d: %d bytes, %v", i, len(body), err)
		}
		if n, _ := idleConns(p); i == 0 && n != 0 {
			t.Errorf("%d idle connections kept, want the closed one dropped", n)
		}
		waitIdleGone(t, p)
	}
	if n := srv.Opened.Load(); n != 3 {
		t.Errorf("%d connections, want one per exchange", n)
	}
}

// waitIdleGone waits until no idle connection of p is quiet: the FIN of a
// server that closed one has come. A request sent before it comes is
// reset: the race every keep-alive client has with a server that closes,
// which no client settles without sending.
func waitIdleGone(t *testing.T, p *Pool) {
	t.Helper()
	waitFor(t, "the FIN", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, list := range p.idle {
			for _, c := range list {
				if c.peek() == idleQuiet {
					return false
				}
			}
		}
		return true
	})
}

// A huge body streams through in bounded memory: nothing in the pool grows
// with it.
func TestHugeBodyInBoundedMemory(t *testing.T) {
	const size = 1 << 30
	if testing.Short() {
		t.Skip("streams 1 GiB")
	}
	srv := startRaw(t, func(c net.Conn, _ *http.Request) bool {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: "+strconv.Itoa(size)+"\r\n\r\n")
		chunk := bytes.Repeat([]byte("0123456789abcdef"), 16<<10) // 256 KiB
		for left := size; left > 0; left -= len(chunk) {
			if _, err := c.Write(chunk[:min(left, len(chunk))]); err != nil {
				return false
			}
		}
		return true
	})
	p := New(Options{})
	buf := make([]byte, 32<<10)
	runtime.GC()
	var before, during runtime.MemStats
	runtime.ReadMemStats(&before)
	r, err := p.RoundTrip(context.Background(), request(srv.Addr, "/"), srv.Addr, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	var peak uint64
	for {
		m, err := r.Body.Read(buf)
		n += int64(m)
		if n%(64<<20) < int64(m) {
			runtime.ReadMemStats(&during)
			peak = max(peak, during.HeapAlloc)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("after %d bytes: %v", n, err)
		}
	}
	p.Release(r, true)
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	if n != size {
		t.Fatalf("read %d bytes, want %d", n, size)
	}
	const bound = 8 << 20
	if grew := int64(peak) - int64(before.HeapAlloc); grew > bound {
		t.Errorf("the heap grew by %d bytes reading %d, want less than %d", grew, n, bound)
	}
	if allocated := after.TotalAlloc - before.TotalAlloc; allocated > bound {
		t.Errorf("%d bytes allocated reading %d, want less than %d", allocated, n, bound)
	}
	if idle, _ := idleConns(p); idle != 1 {
		t.Errorf("%d idle connections, want the connection kept", idle)
	}
}

// A server that drips a byte every 100ms is bounded by the exchange's
// deadline, and then by Extend's: a trickle cannot keep a slot for ever.
func TestSlowDrip(t *testing.T) {
	drip := func(prefix, s string) serveFunc {
		return func(c net.Conn, _ *http.Request) bool {
			io.WriteString(c, prefix)
			for i := 0; ; i++ {
				if _, err := io.WriteString(c, s[i%len(s):i%len(s)+1]); err != nil {
					return false
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
	}
	const timeout = 400 * time.Millisecond
	wantTimeout := func(t *testing.T, err error, start time.Time) {
		t.Helper()
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("err = %v, want a timeout", err)
		}
		if took := time.Since(start); took > timeout+time.Second {
			t.Errorf("took %s, want about %s", took, timeout)
		}
	}
	t.Run("head", func(t *testing.T) {
		srv := startRaw(t, drip("", "HTTP/1.1 200 OK\r\nX-Drip: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"))
		start := time.Now()
		_, err := New(Options{}).RoundTrip(context.Background(), request(srv.Addr, "/"), srv.Addr, timeout)
		wantTimeout(t, err, start)
		srv.waitClosed(t, 1)
	})
	for _, extend := range []time.Duration{0, 50 * time.Millisecond} {
		t.Run(fmt.Sprintf("body, Extend(%s)", extend), func(t *testing.T) {
			srv := startRaw(t, drip("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "1\r\na\r\n"))
			p := New(Options{})
			start := time.Now()
			r, err := p.RoundTrip(context.Background(), request(srv.Addr, "/"), srv.Addr, timeout)
			if err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 1024)
			n := 0
			for err == nil {
				if extend > 0 {
					if err := r.Extend(extend); err != nil {
						t.Fatal(err)
					}
				}
				var m int
				m, err = r.Body.Read(buf)
				n += m
			}
			p.Release(r, false)
			wantTimeout(t, err, start)
			if extend > 0 && time.Since(start) > timeout {
				t.Errorf("with Extend(%s) against a byte per 100ms, the body was read for %s", extend, time.Since(start))
			}
			srv.waitClosed(t, 1)
		})
	}
}

// misbehaviour is a way the server of TestNoResponseReachesAnotherRequest
// answers a request.
type misbehaviour struct {
	name   string
	head   bool // a HEAD request
	wantOK bool // the exchange succeeds
	serve  func(c net.Conn, id string, later func()) (keep bool)
}

// ok writes a good response carrying id in a field and the body.
func ok(c net.Conn, id string) { respond(c, 200, id, "X-Id: "+id+"\r\n") }

var stray = "HTTP/1.1 200 OK\r\nX-Id: stray\r\nContent-Length: 5\r\n\r\nstray"

var misbehaviours = []misbehaviour{
	{"ok", false, true, func(c net.Conn, id string, _ func()) bool { ok(c, id); return true }},
	{"chunked in pieces", false, true, func(c net.Conn, id string, _ func()) bool {
		for _, s := range []string{"HTTP/1.1 200 OK\r\nX-Id: " + id + "\r\nTransfer-", "Encoding: chunked\r\n\r\n", fmt.Sprintf("%x\r\n%s\r\n", len(id), id), "0\r\n", "\r\n"} {
			io.WriteString(c, s)
			time.Sleep(50 * time.Microsecond)
		}
		return true
	}},
	{"103 first", false, true, func(c net.Conn, id string, _ func()) bool {
		io.WriteString(c, "HTTP/1.1 103 Early Hints\r\nX-Id: hint\r\n\r\n")
		ok(c, id)
		return true
	}},
	{"HEAD", true, true, func(c net.Conn, id string, _ func()) bool {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nX-Id: "+id+"\r\nContent-Length: 5\r\n\r\n")
		return true
	}},
	{"Connection: close", false, true, func(c net.Conn, id string, _ func()) bool {
		respond(c, 200, id, "X-Id: "+id+"\r\nConnection: close\r\n")
		return false
	}},
	{"closes after the response", false, true, func(c net.Conn, id string, _ func()) bool { ok(c, id); return false }},
	{"read to close", false, true, func(c net.Conn, id string, _ func()) bool {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nX-Id: "+id+"\r\n\r\n"+id)
		return false
	}},
	{"a second response with the first", false, false, func(c net.Conn, id string, _ func()) bool {
		// In one write, so that it arrives with the first.
		io.WriteString(c, response(200, id, "X-Id: "+id+"\r\n")+stray)
		return true
	}},
	{"a second response later", false, true, func(c net.Conn, id string, later func()) bool {
		ok(c, id)
		later()
		io.WriteString(c, stray)
		return true
	}},
	{"body on HEAD", true, false, func(c net.Conn, id string, _ func()) bool {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nX-Id: "+id+"\r\nContent-Length: 5\r\n\r\n"+stray)
		return true
	}},
	{"body on 204", false, false, func(c net.Conn, id string, _ func()) bool {
		io.WriteString(c, "HTTP/1.1 204 No Content\r\nX-Id: "+id+"\r\n\r\n"+stray)
		return true
	}},
	{"body on 304 later", false, true, func(c net.Conn, id string, later func()) bool {
		io.WriteString(c, "HTTP/1.1 304 Not Modified\r\nX-Id: "+id+"\r\n\r\n")
		later()
		io.WriteString(c, stray)
		return true
	}},
	{"short Content-Length", false, false, func(c net.Conn, id string, _ func()) bool {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nX-Id: "+id+"\r\nContent-Length: 100\r\n\r\n"+id)
		return false
	}},
	{"bad chunk", false, false, func(c net.Conn, id string, _ func()) bool {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nX-Id: "+id+"\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxyz\r\n0\r\n\r\n"+stray)
		return true
	}},
	{"interim flood", false, false, func(c net.Conn, id string, _ func()) bool {
		io.WriteString(c, strings.Repeat("HTTP/1.1 103 Early Hints\r\nX-Id: hint\r\n\r\n", 10))
		ok(c, id)
		return true
	}},
	{"101", false, false, func(c net.Conn, id string, _ func()) bool {
		io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
		ok(c, id)
		return true
	}},
	{"huge head", false, false, func(c net.Conn, id string, _ func()) bool {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nX-Id: "+id+"\r\nX-Big: "+strings.Repeat("b", 70<<10)+"\r\nContent-Length: 0\r\n\r\n"+stray)
		return true
	}},
	{"no response", false, false, func(c net.Conn, id string, _ func()) bool { return false }},
	{"garbage", false, false, func(c net.Conn, id string, _ func()) bool {
		io.WriteString(c, "HTTP/1.1 2OO OK\r\n\r\n"+stray)
		return true
	}},
}

// 1,000 sequential requests through one pool to a server that misbehaves at
// random: every response that is accepted is the one to its own request,
// and each exchange fails or succeeds as it must.
func TestNoResponseReachesAnotherRequest(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, seed))
	// later lets the server send its stray bytes once the client has
	// released the exchange, and tells the client they are sent.
	released, sent := make(chan struct{}), make(chan struct{})
	later := func() { released <- struct{}{} }
	srv := startRaw(t, func(c net.Conn, req *http.Request) bool {
		q := req.URL.Query()
		m := misbehaviours[mustAtoi(q.Get("case"))]
		keep := m.serve(c, q.Get("id"), later)
		if m.name == "a second response later" || m.name == "body on 304 later" {
			sent <- struct{}{}
		}
		return keep
	})
	p := New(Options{MaxIdlePerAddr: 2})
	counts := make([]int, len(misbehaviours))
	buf := make([]byte, 4096)
	for i := range 1000 {
		k := rng.IntN(len(misbehaviours))
		m := misbehaviours[k]
		counts[k]++
		id := strconv.Itoa(i)
		req := request(srv.Addr, "/?id="+id+"&case="+strconv.Itoa(k))
		if m.head {
			req.Method = http.MethodHead
		}
		r, err := p.RoundTrip(context.Background(), req, srv.Addr, 5*time.Second)
		var body []byte
		if err == nil {
			if got := r.Header.Get("X-Id"); got != id {
				t.Fatalf("request %d (%s): the response is the one to %q", i, m.name, got)
			}
			for err == nil {
				var n int
				n, err = r.Body.Read(buf)
				body = append(body, buf[:n]...)
			}
			if err == io.EOF {
				err = nil
			}
			p.Release(r, err == nil)
		}
		if err == nil && !m.head && r.StatusCode == 200 && string(body) != id {
			t.Fatalf("request %d (%s): body %q, want %q", i, m.name, body, id)
		}
		if (err == nil) != m.wantOK {
			t.Fatalf("request %d (%s): err = %v, want success %v", i, m.name, err, m.wantOK)
		}
		if err != nil && Unsent(err) {
			t.Fatalf("request %d (%s): %v is an UnsentError, yet the request was sent", i, m.name, err)
		}
		switch m.name {
		case "a second response later", "body on 304 later":
			<-released
			<-sent
			waitStray(t, p)
		case "closes after the response":
			waitIdleGone(t, p)
		}
	}
	t.Logf("cases: %v; %d connections", counts, srv.Opened.Load())
}

func mustAtoi(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		panic(err)
	}
	return n
}
