package upstream

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"sync/atomic"
	"testing"
	"time"
)

// server starts an HTTP server with handler and counts the connections
// clients open to it.
func server(t testing.TB, idleTimeout time.Duration, handler http.HandlerFunc) (addr string, conns *atomic.Int64) {
	addr, conns, _ = serverCountingClosed(t, idleTimeout, handler)
	return addr, conns
}

// serverCountingClosed is server that also counts the connections it closed.
func serverCountingClosed(t testing.TB, idleTimeout time.Duration, handler http.HandlerFunc) (addr string, opened, closed *atomic.Int64) {
	t.Helper()
	opened, closed = new(atomic.Int64), new(atomic.Int64)
	srv := httptest.NewUnstartedServer(handler)
	srv.Config.IdleTimeout = idleTimeout
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		switch s {
		case http.StateNew:
			opened.Add(1)
		case http.StateClosed:
			closed.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String(), opened, closed
}

func get(t *testing.T, addr string) *Request {
	t.Helper()
	return &Request{Method: http.MethodGet, Target: "/metrics", Host: addr}
}

// exchange makes one GET and reads the body to its end.
func exchange(t *testing.T, p *Pool, addr string) string {
	t.Helper()
	r, err := p.RoundTrip(context.Background(), get(t, addr), addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(r.Body)
	p.Release(r, err == nil)
	if err != nil {
		t.Fatal(err)
	}
	return string(body)
}

func hello(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "hello") }

// hangingServer never answers; a handler returns when its client goes away.
func hangingServer(t *testing.T) string {
	addr, _ := server(t, time.Minute, func(_ http.ResponseWriter, r *http.Request) { <-r.Context().Done() })
	return addr
}

// waitClosed waits until the server has closed n connections.
func waitClosed(t *testing.T, closed *atomic.Int64, n int64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for closed.Load() < n {
		if time.Now().After(deadline) {
			t.Fatal("the server never closed the idle connection")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func idleConns(p *Pool) (n int, buffered int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, list := range p.idle {
		for _, c := range list {
			n++
			if c.buf != nil {
				buffered++
			}
		}
	}
	return n, buffered
}

func TestConnectionsAreKeptAliveWithoutBuffers(t *testing.T) {
	addr, conns := server(t, time.Minute, hello)
	p := New(Options{})
	for i := range 10 {
		if got := exchange(t, p, addr); got != "hello" {
			t.Fatalf("exchange %d: body %q", i, got)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("10 sequential exchanges opened %d connections, want 1", n)
	}
	// An idle connection lends its buffers back: a scraper keeping
	// thousands of connections must not keep thousands of buffers.
	if n, buffered := idleConns(p); n != 1 || buffered != 0 {
		t.Errorf("%d idle connections, %d holding buffers; want 1 and 0", n, buffered)
	}
	p.CloseIdle(0)
	exchange(t, p, addr)
	if n := conns.Load(); n != 2 {
		t.Errorf("after CloseIdle(0): %d connections, want a second one", n)
	}
}

func TestStaleConnectionIsRedialed(t *testing.T) {
	addr, conns, closed := serverCountingClosed(t, 20*time.Millisecond, hello)
	p := New(Options{})
	for i := range 3 {
		// The exchange goes out on the connection the server closed
		// while it was idle, fails before any response, and is made
		// again on a new connection without an error.
		if got := exchange(t, p, addr); got != "hello" {
			t.Fatalf("exchange %d: body %q", i, got)
		}
		waitClosed(t, closed, int64(i+1))
	}
	if n := conns.Load(); n != 3 {
		t.Errorf("%d connections, want 3 (one per exchange after each idle close)", n)
	}
}

func TestIncompleteOrClosingExchangesDoNotKeepTheConnection(t *testing.T) {
	for _, tc := range []struct {
		name     string
		handler  http.HandlerFunc
		complete bool
	}{
		{"body not read to its end", hello, false},
		{"server asks to close", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Connection", "close")
			hello(w, r)
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr, conns := server(t, time.Minute, tc.handler)
			p := New(Options{})
			for range 2 {
				r, err := p.RoundTrip(context.Background(), get(t, addr), addr, 5*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				if tc.complete {
					io.Copy(io.Discard, r.Body)
				}
				p.Release(r, tc.complete)
			}
			if n := conns.Load(); n != 2 {
				t.Errorf("%d connections for 2 exchanges, want 2", n)
			}
			if n, _ := idleConns(p); n != 0 {
				t.Errorf("%d idle connections kept, want 0", n)
			}
		})
	}
}

// Bytes after a complete response (a server that sent more than it
// declared) mean the connection's framing is lost: it is not reused.
func TestExtraBytesAfterTheResponseCloseTheConnection(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 4096)
		c.Read(buf)
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokGARBAGE")
		c.Read(buf) // until the client closes
	}()
	p := New(Options{})
	addr := l.Addr().String()
	r, err := p.RoundTrip(context.Background(), get(t, addr), addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	// The body ends with an error, not io.EOF: the server sent more than
	// it declared, so a proxy must not pass the response on as complete.
	body, err := io.ReadAll(r.Body)
	if string(body) != "ok" || !errors.Is(err, ErrBytesAfterResponse) {
		t.Fatalf("body %q, %v; want \"ok\" and ErrBytesAfterResponse", body, err)
	}
	p.Release(r, err == nil)
	if n, _ := idleConns(p); n != 0 {
		t.Errorf("%d idle connections kept after a response followed by stray bytes, want 0", n)
	}
}

func TestCancelAbortsTheExchange(t *testing.T) {
	addr := hangingServer(t)
	p := New(Options{})
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	start := time.Now()
	_, err := p.RoundTrip(ctx, get(t, addr), addr, time.Minute)
	if err == nil {
		t.Fatal("RoundTrip succeeded; want it aborted by the cancelled context")
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("the cancelled exchange took %s", took)
	}
}

func TestTimeoutBoundsTheResponseHeaders(t *testing.T) {
	addr := hangingServer(t)
	p := New(Options{})
	_, err := p.RoundTrip(context.Background(), get(t, addr), addr, 100*time.Millisecond)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("err = %v, want a timeout", err)
	}
}

// A connection kept from an exchange with a long timeout still holds a
// later exchange to its shorter one: deadlines are kept only when they are
// about right, never when they are too late.
func TestShorterTimeoutOnAReusedConnection(t *testing.T) {
	addr, conns := server(t, time.Minute, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/hang" {
			<-r.Context().Done()
			return
		}
		io.WriteString(w, "hello")
	})
	p := New(Options{})
	r, err := p.RoundTrip(context.Background(), get(t, addr), addr, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	_, err = io.ReadAll(r.Body)
	p.Release(r, err == nil)
	start := time.Now()
	_, err = p.RoundTrip(context.Background(), &Request{Method: http.MethodGet, Target: "/hang", Host: addr}, addr, 100*time.Millisecond)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("err = %v, want a timeout", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("timed out after %v, want about 100ms", took)
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("%d connections, want the second exchange on the first one", n)
	}
}

func TestRequestIsSentAsGiven(t *testing.T) {
	type seen struct {
		method, uri, host, contentLength, ua, custom, body string
		transferEncoding                                   []string
	}
	got := make(chan seen, 1)
	addr, _ := server(t, time.Minute, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got <- seen{r.Method, r.RequestURI, r.Host, r.Header.Get("Content-Length"), r.Header.Get("User-Agent"),
			r.Header.Get("X-Custom"), string(b), r.TransferEncoding}
	})
	p := New(Options{})
	r, err := p.RoundTrip(context.Background(), &Request{
		Method: http.MethodPost, Target: "/v1/completions?x=%2F", Host: "model.example",
		Header: http.Header{"X-Custom": {"a\r\nInjected: yes"}, "Content-Length": {"999"}, "User-Agent": {"client/1"}},
		Body:   []byte(`{"model":"m"}`),
	}, addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	p.Release(r, false)
	want := seen{"POST", "/v1/completions?x=%2F", "model.example", "13", "client/1", "a  Injected: yes", `{"model":"m"}`, nil}
	if s := <-got; !reflect.DeepEqual(s, want) {
		t.Errorf("the server saw %+v, want %+v", s, want)
	}
}

// A request with a body goes out again on a fresh connection when the
// kept-alive one turns out stale, body and all.
func TestStaleConnectionResendsTheBody(t *testing.T) {
	addr, conns, closed := serverCountingClosed(t, 20*time.Millisecond, func(w http.ResponseWriter, r *http.Request) { io.Copy(w, r.Body) })
	p := New(Options{})
	for i := range 2 {
		r, err := p.RoundTrip(context.Background(), &Request{Method: http.MethodPost, Target: "/", Host: addr, Body: []byte("prompt")}, addr, 5*time.Second)
		if err != nil {
			t.Fatalf("exchange %d: %v", i, err)
		}
		body, err := io.ReadAll(r.Body)
		p.Release(r, err == nil)
		if string(body) != "prompt" {
			t.Fatalf("exchange %d: echoed %q", i, body)
		}
		waitClosed(t, closed, int64(i+1))
	}
	if n := conns.Load(); n != 2 {
		t.Errorf("%d connections, want 2", n)
	}
}

func TestRunClosesIdleConnectionsWhenDone(t *testing.T) {
	addr, _ := server(t, time.Minute, hello)
	p := New(Options{IdleTimeout: time.Hour})
	exchange(t, p, addr)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { p.Run(ctx); close(done) }()
	cancel()
	<-done
	if n, _ := idleConns(p); n != 0 {
		t.Errorf("%d idle connections after Run returned, want 0", n)
	}
}
