package server

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// start serves h on a loopback port until the test ends and returns the
// server and its address. configure, if any, sets the server's fields.
func start(t *testing.T, h http.HandlerFunc, configure ...func(*Server)) (*Server, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return serve(t, ln, h, configure...), ln.Addr().String()
}

// startPiped is start for a test in a synctest bubble: the server takes
// in-memory connections from the returned listener, so that it runs on the
// bubble's clock and the test sees time pass only once every goroutine
// waits.
func startPiped(t *testing.T, h http.HandlerFunc, configure ...func(*Server)) (*Server, *pipeListener) {
	t.Helper()
	ln := &pipeListener{conns: make(chan net.Conn), done: make(chan struct{})}
	return serve(t, ln, h, configure...), ln
}

func serve(t *testing.T, ln net.Listener, h http.HandlerFunc, configure ...func(*Server)) *Server {
	srv := &Server{Handler: h}
	for _, f := range configure {
		f(srv)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return srv
}

// pipeListener is a net.Listener whose connections are pipeConns.
type pipeListener struct {
	conns     chan net.Conn
	done      chan struct{}
	closeOnce sync.Once
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr{} }

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "pipe" }

// dial is dial over a pipeListener: it hands the server one end of a new
// pipeConn and returns the other, closed when the test ends.
func (l *pipeListener) dial(t *testing.T) (*pipeConn, *bufio.Reader) {
	t.Helper()
	up, upServer := net.Pipe()     // the client's bytes to the server
	downServer, down := net.Pipe() // the server's to the client
	c := &pipeConn{in: down, out: up}
	select {
	case l.conns <- &pipeConn{in: upServer, out: downServer}:
	case <-l.done:
		t.Fatal("dialing a closed listener")
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return c, bufio.NewReader(c)
}

// pipeConn is one end of an in-memory connection made of a net.Pipe each
// way, so that, as over TCP, an end can close its sending side and go on
// reading (CloseWrite), which net.Pipe alone cannot. Like net.Pipe it has
// no buffer: a write waits for the peer to read it.
type pipeConn struct {
	in, out net.Conn // what the peer sends; what this end sends
	closed  atomic.Bool
}

func (c *pipeConn) Read(p []byte) (int, error)  { return c.in.Read(p) }
func (c *pipeConn) Write(p []byte) (int, error) { return c.out.Write(p) }
func (c *pipeConn) CloseWrite() error           { return c.out.Close() }
func (c *pipeConn) LocalAddr() net.Addr         { return pipeAddr{} }
func (c *pipeConn) RemoteAddr() net.Addr        { return pipeAddr{} }

func (c *pipeConn) Close() error {
	c.closed.Store(true)
	return errors.Join(c.out.Close(), c.in.Close())
}

func (c *pipeConn) SetDeadline(t time.Time) error {
	return errors.Join(c.SetReadDeadline(t), c.SetWriteDeadline(t))
}
func (c *pipeConn) SetReadDeadline(t time.Time) error  { return c.deadline(c.in.SetReadDeadline(t)) }
func (c *pipeConn) SetWriteDeadline(t time.Time) error { return c.deadline(c.out.SetWriteDeadline(t)) }

// deadline passes on the error of setting a deadline, except that, as over
// TCP, the peer's closing does not make it fail (net.Pipe's does; there is
// nothing left to wait for then anyway).
func (c *pipeConn) deadline(err error) error {
	if errors.Is(err, io.ErrClosedPipe) && !c.closed.Load() {
		return nil
	}
	return err
}

// dial opens a raw connection for tests that need to see the bytes.
func dial(t *testing.T, addr string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return c, bufio.NewReader(c)
}

func readResponse(t *testing.T, br *bufio.Reader, method string) (*http.Response, string) {
	t.Helper()
	resp, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		t.Fatalf("reading a response: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading a response body: %v", err)
	}
	return resp, string(body)
}

func TestFraming(t *testing.T) {
	long := strings.Repeat("x", 3*bufferedBody)
	_, addr := start(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/small":
			io.WriteString(w, "hello")
		case "/long":
			io.WriteString(w, long)
		case "/declared":
			w.Header().Set("Content-Length", "5")
			io.WriteString(w, "hel")
			io.WriteString(w, "lo")
		case "/empty":
			w.WriteHeader(http.StatusNoContent)
			if _, err := io.WriteString(w, "x"); !errors.Is(err, http.ErrBodyNotAllowed) {
				t.Errorf("writing a 204's body: %v", err)
			}
		case "/too-long":
			w.Header().Set("Content-Length", "2")
			if _, err := io.WriteString(w, "abc"); !errors.Is(err, http.ErrContentLength) {
				t.Errorf("writing past Content-Length: %v", err)
			}
			io.WriteString(w, "ab")
		}
	})
	c, br := dial(t, addr)
	for _, tc := range []struct {
		method, path   string
		status         int
		body           string
		length         int64
		chunked        bool
		noContentLengt bool
	}{
		{method: "GET", path: "/small", status: 200, body: "hello", length: 5},
		{method: "GET", path: "/long", status: 200, body: long, length: -1, chunked: true},
		{method: "GET", path: "/declared", status: 200, body: "hello", length: 5},
		{method: "HEAD", path: "/small", status: 200, length: 5},
		{method: "GET", path: "/empty", status: 204, length: 0, noContentLengt: true},
		{method: "GET", path: "/too-long", status: 200, body: "ab", length: 2},
	} {
		// Every request on the one connection: keep-alive holds.
		fmt.Fprintf(c, "%s %s HTTP/1.1\r\nHost: test\r\n\r\n", tc.method, tc.path)
		resp, body := readResponse(t, br, tc.method)
		if resp.StatusCode != tc.status || body != tc.body || resp.ContentLength != tc.length || resp.Close {
			t.Errorf("%s %s: status %d, %d-byte body, Content-Length %d, close %v; want %d, %d bytes, %d, false",
				tc.method, tc.path, resp.StatusCode, len(body), resp.ContentLength, resp.Close, tc.status, len(tc.body), tc.length)
		}
		if chunked := len(resp.TransferEncoding) > 0; chunked != tc.chunked {
			t.Errorf("%s %s: chunked %v, want %v", tc.method, tc.path, chunked, tc.chunked)
		}
		if tc.noContentLengt && resp.Header.Get("Content-Length") != "" {
			t.Errorf("%s %s: Content-Length %q on a response without a body", tc.method, tc.path, resp.Header.Get("Content-Length"))
		}
		if resp.Header.Get("Date") == "" {
			t.Errorf("%s %s: no Date header", tc.method, tc.path)
		}
	}
}

func TestShortBodyClosesConnection(t *testing.T) {
	_, addr := start(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "10")
		io.WriteString(w, "short")
	})
	c, br := dial(t, addr)
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: test\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(resp.Body); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("reading a body shorter than declared: %v, want the connection closed early", err)
	}
}

func TestFlushStreamsBeforeTheHandlerReturns(t *testing.T) {
	release := make(chan struct{})
	_, addr := start(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: 1\n\n")
		if err := http.NewResponseController(w).Flush(); err != nil {
			t.Errorf("flush: %v", err)
		}
		<-release
		io.WriteString(w, "data: 2\n\n")
	})
	resp, err := http.Get("http://" + addr)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	first := make([]byte, len("data: 1\n\n"))
	if _, err := io.ReadFull(resp.Body, first); err != nil || string(first) != "data: 1\n\n" {
		t.Fatalf("first chunk %q, %v", first, err)
	}
	close(release)
	rest, err := io.ReadAll(resp.Body)
	if err != nil || string(rest) != "data: 2\n\n" {
		t.Fatalf("rest %q, %v", rest, err)
	}
}

func TestClientGoneCancelsContext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cause := make(chan error, 1)
		handler := func(w http.ResponseWriter, r *http.Request) {
			if r.Method != http.MethodGet {
				io.Copy(io.Discard, r.Body) // a GET's handler does not touch its empty body
			}
			select {
			case <-r.Context().Done():
				cause <- context.Cause(r.Context())
			case <-time.After(10 * time.Second):
				cause <- errors.New("not cancelled")
			}
		}
		// Short timeouts: the watch must outlive the deadlines the request
		// was read under.
		_, ln := startPiped(t, handler, func(s *Server) { s.IdleTimeout, s.ReadHeaderTimeout = 100*time.Millisecond, 50*time.Millisecond })
		for name, tc := range map[string]struct {
			request string
			after   time.Duration
		}{
			"with a body":                    {"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\n{}", 50 * time.Millisecond},
			"without a body":                 {"GET / HTTP/1.1\r\nHost: test\r\n\r\n", 50 * time.Millisecond},
			"chunked":                        {"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 50 * time.Millisecond},
			"past the connection's timeouts": {"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\n{}", 300 * time.Millisecond},
		} {
			c, _ := ln.dial(t)
			io.WriteString(c, tc.request)
			// On the bubble's clock, which moves once the server waits: the
			// request runs past WatchDelay, so the watch is what is tested.
			time.Sleep(tc.after)
			c.Close()
			if err := <-cause; !errors.Is(err, ErrClientGone) {
				t.Errorf("%s: context ended with %v, want ErrClientGone", name, err)
			}
		}
	})
}

// A client that only half-closes (it has sent everything and still reads)
// gets its answer.
func TestHalfClosedClientGetsTheResponse(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		_, ln := startPiped(t, func(w http.ResponseWriter, r *http.Request) {
			io.Copy(io.Discard, r.Body)
			// On the bubble's clock: several WatchDelays, so the watch has
			// seen the half-close before the handler answers.
			time.Sleep(100 * time.Millisecond)
			io.WriteString(w, "ok")
		})
		c, br := ln.dial(t)
		io.WriteString(c, "POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\n{}")
		c.CloseWrite()
		if _, body := readResponse(t, br, "POST"); body != "ok" {
			t.Fatalf("body %q, want ok", body)
		}
	})
}

func TestCloseCancelsRequestsInFlight(t *testing.T) {
	entered, cause := make(chan struct{}), make(chan error, 1)
	srv, addr := start(t, func(w http.ResponseWriter, r *http.Request) {
		close(entered)
		select {
		case <-r.Context().Done():
			cause <- context.Cause(r.Context())
		case <-time.After(10 * time.Second):
			cause <- errors.New("not cancelled")
		}
	})
	c, _ := dial(t, addr)
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: test\r\n\r\n")
	<-entered
	srv.Close()
	if err := <-cause; err == nil || err.Error() == "not cancelled" {
		t.Fatalf("context ended with %v, want it cancelled by Close", err)
	}
}

// Once the response has started, a handler reading a body whose client
// asked for 100 Continue must not put the interim response into it.
func TestNoContinueAfterTheResponseStarted(t *testing.T) {
	_, addr := start(t, func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "partial ")
		http.NewResponseController(w).Flush()
		b, _ := io.ReadAll(r.Body)
		w.Write(b)
	})
	c, br := dial(t, addr)
	io.WriteString(c, "POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	first := make([]byte, len("partial "))
	if _, err := io.ReadFull(resp.Body, first); err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "hello") // the client gave up waiting for 100
	rest, err := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || string(first)+string(rest) != "partial hello" || err != nil {
		t.Fatalf("status %d, body %q, %v; want 200 \"partial hello\"", resp.StatusCode, string(first)+string(rest), err)
	}
}

// A request that arrives while the previous one still runs (pipelining)
// must neither cancel it nor be lost.
func TestPipelinedRequestWhileWatched(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var cancelled atomic.Bool
		_, ln := startPiped(t, func(w http.ResponseWriter, r *http.Request) {
			io.Copy(io.Discard, r.Body)
			if r.URL.Path == "/slow" {
				select {
				case <-r.Context().Done():
					cancelled.Store(true)
				case <-time.After(100 * time.Millisecond): // several WatchDelays
				}
			}
			io.WriteString(w, r.URL.Path)
		})
		c, br := ln.dial(t)
		io.WriteString(c, "POST /slow HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\n{}")
		time.Sleep(30 * time.Millisecond) // on the bubble's clock: the first request is being watched
		io.WriteString(c, "GET /next HTTP/1.1\r\nHost: test\r\n\r\n")
		for _, want := range []string{"/slow", "/next"} {
			if _, body := readResponse(t, br, "GET"); body != want {
				t.Fatalf("response %q, want %q", body, want)
			}
		}
		if cancelled.Load() {
			t.Fatal("a pipelined request cancelled the running one")
		}
	})
}

func TestExpectContinue(t *testing.T) {
	_, addr := start(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/reject" {
			http.Error(w, "no", http.StatusRequestEntityTooLarge)
			return
		}
		b, _ := io.ReadAll(r.Body)
		w.Write(b)
	})
	t.Run("read", func(t *testing.T) {
		c, br := dial(t, addr)
		io.WriteString(c, "POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
		line, err := br.ReadString('\n')
		if err != nil || line != "HTTP/1.1 100 Continue\r\n" {
			t.Fatalf("first line %q, %v; want 100 Continue", line, err)
		}
		br.ReadString('\n')
		io.WriteString(c, "hello")
		if resp, body := readResponse(t, br, "POST"); resp.StatusCode != 200 || body != "hello" {
			t.Fatalf("%d %q", resp.StatusCode, body)
		}
	})
	t.Run("rejected unread", func(t *testing.T) {
		c, br := dial(t, addr)
		io.WriteString(c, "POST /reject HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
		resp, _ := readResponse(t, br, "POST")
		if resp.StatusCode != http.StatusRequestEntityTooLarge || !resp.Close {
			t.Fatalf("status %d, close %v; want 413 and the connection closed (the body was never asked for)", resp.StatusCode, resp.Close)
		}
	})
}

func TestUnreadBody(t *testing.T) {
	_, addr := start(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	for _, tc := range []struct {
		size  int
		close bool
	}{{size: 1 << 10, close: false}, {size: discardLimit + 1<<10, close: true}} {
		c, br := dial(t, addr)
		go func() {
			fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n%s", tc.size, strings.Repeat("x", tc.size))
		}()
		if resp, _ := readResponse(t, br, "POST"); resp.Close != tc.close {
			t.Errorf("%d unread bytes: close %v, want %v", tc.size, resp.Close, tc.close)
		}
	}
}

func TestBadRequests(t *testing.T) {
	_, addr := start(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") },
		func(s *Server) { s.MaxHeaderBytes = 1 << 10 })
	for name, tc := range map[string]struct {
		request string
		status  int
	}{
		"garbage":        {"\x16\x03\x01 hello\r\n\r\n", http.StatusBadRequest},
		"no Host":        {"GET / HTTP/1.1\r\n\r\n", http.StatusBadRequest},
		"bad Host":       {"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", http.StatusBadRequest},
		"HTTP/2 line":    {"GET / HTTP/2.0\r\nHost: test\r\n\r\n", http.StatusHTTPVersionNotSupported},
		"head too large": {"GET / HTTP/1.1\r\nHost: test\r\nX-Big: " + strings.Repeat("x", 64<<10) + "\r\n\r\n", http.StatusRequestHeaderFieldsTooLarge},
	} {
		c, br := dial(t, addr)
		io.WriteString(c, tc.request)
		resp, _ := readResponse(t, br, "GET")
		if resp.StatusCode != tc.status || !resp.Close {
			t.Errorf("%s: status %d, close %v; want %d and close", name, resp.StatusCode, resp.Close, tc.status)
		}
	}
}

// A handler that panics mid-body leaves the client an incomplete body,
// never one that looks complete: with a declared length, and streamed
// (chunked) even when the connection closes after the response anyway.
func TestPanics(t *testing.T) {
	_, addr := start(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Has("declared") {
			w.Header().Set("Content-Length", "10")
		}
		io.WriteString(w, "part")
		http.NewResponseController(w).Flush()
		if r.URL.Path == "/abort" {
			panic(http.ErrAbortHandler)
		}
		panic("a bug")
	})
	for _, target := range []string{"/abort?declared", "/bug?declared", "/abort", "/bug"} {
		for _, connection := range []string{"keep-alive", "close"} {
			c, br := dial(t, addr)
			fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: test\r\nConnection: %s\r\n\r\n", target, connection)
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadAll(resp.Body); !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Errorf("%s, Connection: %s: body read ended with %v, want the connection closed mid-body", target, connection, err)
			}
		}
	}
}

func TestShutdown(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	srv, addr := start(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			close(entered)
			<-release
		}
		io.WriteString(w, "done")
	})
	idle, idleBr := dial(t, addr)
	io.WriteString(idle, "GET /fast HTTP/1.1\r\nHost: test\r\n\r\n")
	readResponse(t, idleBr, "GET")
	busy, busyBr := dial(t, addr)
	io.WriteString(busy, "GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
	<-entered

	// A deadline that passes with the request still running.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := srv.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown with a request in flight past its deadline: %v", err)
	}
	if _, err := idleBr.ReadByte(); err != io.EOF {
		t.Errorf("the idle connection was not closed: %v", err)
	}
	if _, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		t.Error("the server still accepts connections")
	}

	shutdown := make(chan error, 1)
	go func() { shutdown <- srv.Shutdown(context.Background()) }()
	close(release)
	if resp, body := readResponse(t, busyBr, "GET"); body != "done" || !resp.Close {
		t.Fatalf("in-flight response %q, close %v; want it completed with Connection: close", body, resp.Close)
	}
	if err := <-shutdown; err != nil {
		t.Fatalf("Shutdown after the last request: %v", err)
	}
}

// net/http's client keeps using one connection for request after request,
// and each request's context is live.
func TestKeepAliveWithNetHTTPClient(t *testing.T) {
	_, addr := start(t, func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		if err := r.Context().Err(); err != nil {
			t.Errorf("a request's context has ended before it is served: %v", err)
		}
		io.WriteString(w, "ok")
	})
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	var reused atomic.Int32
	trace := &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) {
		if info.Reused {
			reused.Add(1)
		}
	}}
	for range 100 {
		req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), "POST", "http://"+addr, strings.NewReader("{}"))
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		if b, _ := io.ReadAll(resp.Body); string(b) != "ok" {
			t.Fatalf("body %q", b)
		}
		resp.Body.Close()
	}
	if got := reused.Load(); got != 99 {
		t.Fatalf("%d of 99 requests reused the connection", got)
	}
}

// On the bubble's clock each timeout is exact, and a connection closes no
// earlier than an eighth before it (wire.Deadline keeps a deadline set that
// close to the wanted one) and no later.
func TestTimeouts(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		_, ln := startPiped(t, func(w http.ResponseWriter, r *http.Request) {
			if _, err := io.ReadAll(r.Body); err != nil {
				return // a slow body: the read timed out
			}
			io.WriteString(w, "ok")
		}, func(s *Server) { s.IdleTimeout, s.ReadHeaderTimeout = time.Second, 50*time.Millisecond })
		for name, tc := range map[string]struct {
			send string
			// answered: a whole first request is answered before the close.
			answered bool
			timeout  time.Duration
		}{
			"idle after a request": {send: "GET / HTTP/1.1\r\nHost: test\r\n\r\n", answered: true, timeout: time.Second},
			// Well before IdleTimeout: ReadHeaderTimeout applies.
			"head cut short": {send: "GET / HTTP/1.1\r\nHost: te", timeout: 50 * time.Millisecond},
			"body cut short": {send: "POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\n{}", timeout: 50 * time.Millisecond},
		} {
			c, br := ln.dial(t)
			start := time.Now()
			io.WriteString(c, tc.send)
			if tc.answered {
				readResponse(t, br, "GET")
			}
			_, err := io.ReadAll(br)
			took := time.Since(start)
			if min := tc.timeout - tc.timeout/8; err != nil || took < min || took > tc.timeout {
				t.Errorf("%s: connection closed after %v (%v), want between %v and %v", name, took, err, min, tc.timeout)
			}
		}
	})
}

// ReadHeaderTimeout runs from the connection's start for its first
// request, so that a client that connects and waits, or starts late and
// trickles, holds the connection no longer; and from the first byte of a
// later one, which may take IdleTimeout to come.
func TestReadHeaderTimeoutStarts(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		_, ln := startPiped(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") },
			func(s *Server) { s.IdleTimeout, s.ReadHeaderTimeout = time.Second, 100*time.Millisecond })
		for name, tc := range map[string]struct {
			// first: a whole request, answered, then idle for idle.
			first bool
			idle  time.Duration
			// send: a head cut short, after waiting wait.
			send    bool
			wait    time.Duration
			timeout time.Duration // from the connection's start
		}{
			"nothing sent":      {timeout: 100 * time.Millisecond},
			"head begun late":   {send: true, wait: 60 * time.Millisecond, timeout: 100 * time.Millisecond},
			"second head":       {first: true, idle: 500 * time.Millisecond, send: true, timeout: 600 * time.Millisecond},
			"no second request": {first: true, timeout: time.Second},
		} {
			c, br := ln.dial(t)
			start := time.Now()
			if tc.first {
				io.WriteString(c, "GET / HTTP/1.1\r\nHost: test\r\n\r\n")
				readResponse(t, br, "GET")
				time.Sleep(tc.idle)
			}
			if tc.send {
				time.Sleep(tc.wait)
				io.WriteString(c, "GET / HTTP/1.1\r\nHost: te")
			}
			_, err := io.ReadAll(br)
			took := time.Since(start)
			if min := tc.timeout - tc.timeout/8; err != nil || took < min || took > tc.timeout {
				t.Errorf("%s: connection closed after %v (%v), want between %v and %v", name, took, err, min, tc.timeout)
			}
		}
	})
}

// connCount returns how many connections the server has.
func (s *Server) connCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// A client that stops reading makes the handler's writes fail once one has
// waited WriteTimeout, and every write after; the request's context ends
// and the connection closes, so the handler returns and what it holds is
// released. Over TCP, with the client's receive buffer small.
func TestWriteTimeoutStalledClient(t *testing.T) {
	const timeout = 300 * time.Millisecond
	type result struct {
		wrote       int
		stalled     time.Duration // from the last write that went through to the error
		err, cause  error
		laterWrites error
	}
	done := make(chan result, 1)
	srv, addr := start(t, func(w http.ResponseWriter, r *http.Request) {
		chunk := []byte(strings.Repeat("x", 32<<10))
		rc := http.NewResponseController(w)
		var res result
		last := time.Now()
		for res.wrote < 1<<30 {
			_, err := w.Write(chunk)
			if err == nil {
				err = rc.Flush()
			}
			if err != nil {
				res.stalled, res.err = time.Since(last), err
				break
			}
			res.wrote += len(chunk)
			last = time.Now()
		}
		select {
		case <-r.Context().Done():
			res.cause = context.Cause(r.Context())
		case <-time.After(time.Second):
		}
		_, res.laterWrites = w.Write(chunk)
		done <- res
	}, func(s *Server) { s.WriteTimeout = timeout })
	c, _ := dial(t, addr)
	c.(*net.TCPConn).SetReadBuffer(4 << 10)
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: test\r\n\r\n")
	var res result
	select {
	case res = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the handler's writes to a client that reads nothing have not failed after 10s")
	}
	t.Logf("wrote %d bytes; the write failed %v after the last one went through: %v", res.wrote, res.stalled, res.err)
	if res.stalled < timeout*7/8-50*time.Millisecond || res.stalled > timeout+2*time.Second {
		t.Errorf("the write failed after %v, want about %v", res.stalled, timeout)
	}
	if !errors.Is(res.cause, ErrClientStalled) {
		t.Errorf("the request's context ended with %v, want ErrClientStalled", res.cause)
	}
	if res.laterWrites == nil {
		t.Error("a write after the failed one succeeded")
	}
	deadline := time.Now().Add(5 * time.Second)
	for srv.connCount() > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the server still has %d connections", srv.connCount())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// WriteTimeout bounds each write, not the response: a stream that keeps
// flowing for many times WriteTimeout is never cut, and one whose client
// stops reading fails no earlier than an eighth before WriteTimeout (the
// deadline is re-armed only when it has drifted) and no later.
func TestWriteTimeoutPerWrite(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const timeout = time.Second
		type result struct {
			chunks  int
			stalled time.Duration
			err     error
		}
		done := make(chan result, 1)
		_, ln := startPiped(t, func(w http.ResponseWriter, r *http.Request) {
			rc := http.NewResponseController(w)
			var res result
			for ; res.chunks < 50; res.chunks++ {
				time.Sleep(100 * time.Millisecond)
				start := time.Now()
				if _, err := io.WriteString(w, "data: token\n\n"); err != nil {
					res.err = err
				} else if err := rc.Flush(); err != nil {
					res.err = err
				}
				if res.err != nil {
					res.stalled = time.Since(start)
					break
				}
			}
			done <- res
		}, func(s *Server) { s.WriteTimeout = timeout })

		// A client that reads all: 5s of streaming, 5 WriteTimeouts.
		c, br := ln.dial(t)
		c.SetDeadline(time.Now().Add(time.Minute))
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: test\r\n\r\n")
		if resp, body := readResponse(t, br, "GET"); resp.StatusCode != 200 || len(body) != 50*len("data: token\n\n") {
			t.Fatalf("status %d, %d bytes of body", resp.StatusCode, len(body))
		}
		if res := <-done; res.err != nil {
			t.Fatalf("a stream that flowed for 5s failed after %d chunks: %v", res.chunks, res.err)
		}

		// A client that reads the head and the first chunks, then stops.
		c, br = ln.dial(t)
		c.SetDeadline(time.Now().Add(time.Minute))
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: test\r\n\r\n")
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		io.ReadFull(resp.Body, make([]byte, 10*len("data: token\n\n")))
		res := <-done
		if res.err == nil || res.stalled < timeout-timeout/8 || res.stalled > timeout {
			t.Fatalf("after %d chunks, a write to a client that stopped reading failed after %v (%v), want between %v and %v",
				res.chunks, res.stalled, res.err, timeout-timeout/8, timeout)
		}
	})
}

// After SetKeepAlivesEnabled(false) (draining), idle connections close at
// once, and every response, on a connection old or new, says
// Connection: close and ends its connection; SetKeepAlivesEnabled(true)
// undoes it.
func TestSetKeepAlivesEnabled(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	srv, addr := start(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			entered <- struct{}{}
			<-release
		}
		io.WriteString(w, "done")
	})
	get := func(c net.Conn, br *bufio.Reader, path string) *http.Response {
		t.Helper()
		fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: test\r\n\r\n", path)
		resp, _ := readResponse(t, br, "GET")
		return resp
	}
	idle, idleBr := dial(t, addr)
	if resp := get(idle, idleBr, "/"); resp.Close {
		t.Fatal("Connection: close before draining")
	}
	busy, busyBr := dial(t, addr)
	fmt.Fprintf(busy, "GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
	<-entered
	fresh, freshBr := dial(t, addr) // connected, no request yet

	srv.SetKeepAlivesEnabled(false)
	if _, err := idleBr.ReadByte(); err != io.EOF {
		t.Errorf("the idle connection: %v, want it closed", err)
	}
	close(release)
	for name, conn := range map[string]struct {
		c  net.Conn
		br *bufio.Reader
	}{"in flight": {busy, busyBr}, "connected before": {fresh, freshBr}} {
		var resp *http.Response
		if name == "in flight" {
			resp, _ = readResponse(t, busyBr, "GET")
		} else {
			resp = get(conn.c, conn.br, "/")
		}
		if !resp.Close {
			t.Errorf("%s: the response does not close the connection", name)
		}
		if _, err := conn.br.ReadByte(); err != io.EOF {
			t.Errorf("%s: after the response: %v, want the connection closed", name, err)
		}
	}
	c, br := dial(t, addr)
	if resp := get(c, br, "/"); !resp.Close {
		t.Error("a new connection's response does not close it")
	}

	srv.SetKeepAlivesEnabled(true)
	c, br = dial(t, addr)
	for range 2 {
		if resp := get(c, br, "/"); resp.Close {
			t.Fatal("Connection: close after SetKeepAlivesEnabled(true)")
		}
	}
}
