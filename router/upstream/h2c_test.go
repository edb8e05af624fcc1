package upstream

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// h2cServer starts a server that speaks only HTTP/2 with prior knowledge,
// net/http's, and counts the connections clients open to it.
func h2cServer(t testing.TB, handler http.HandlerFunc) (addr string, conns *atomic.Int64) {
	t.Helper()
	conns = new(atomic.Int64)
	srv := httptest.NewUnstartedServer(handler)
	srv.Config.Protocols = new(http.Protocols)
	srv.Config.Protocols.SetUnencryptedHTTP2(true)
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String(), conns
}

func h2cPost(addr, body string) *Request {
	return &Request{Protocol: H2C, Method: http.MethodPost, Target: "/v1/completions?x=1", Host: "model.example",
		Header: http.Header{"Content-Type": {"application/json"}, "X-Request-Id": {"r1"}}, Body: []byte(body)}
}

func TestH2CExchange(t *testing.T) {
	addr, conns := h2cServer(t, func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("X-Proto", r.Proto)
		w.Header().Set("X-Seen", r.Method+" "+r.Host+" "+r.RequestURI+" "+r.Header.Get("X-Request-Id")+" "+r.Header.Get("Accept-Encoding"))
		w.Header().Set("Content-Length", "5")
		w.Write(body[:5])
	})
	p := New(Options{})
	defer p.CloseIdle(0)
	for i := range 3 {
		r, err := p.RoundTrip(context.Background(), h2cPost(addr, `{"model":"m"}`), addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := r.Header.Get("X-Proto"), "HTTP/2.0"; got != want {
			t.Errorf("the server saw %s, want %s", got, want)
		}
		if got, want := r.Header.Get("X-Seen"), "POST model.example /v1/completions?x=1 r1 "; got != want {
			t.Errorf("the server saw %q, want %q", got, want)
		}
		if r.ContentLength != 5 {
			t.Errorf("ContentLength = %d, want 5", r.ContentLength)
		}
		body, err := readAll(p, r)
		if err != nil || body != `{"mod` {
			t.Fatalf("exchange %d: body %q, %v", i, body, err)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("%d connections for three exchanges in a row, want 1", n)
	}
}

// TestH2CStreaming reads a streamed body chunk by chunk while the server is
// still writing it: each chunk arrives before the next is sent.
func TestH2CStreaming(t *testing.T) {
	next := make(chan struct{})
	addr, _ := h2cServer(t, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range 3 {
			io.WriteString(w, "data: "+string(rune('a'+i))+"\n\n")
			w.(http.Flusher).Flush()
			select {
			case <-next:
			case <-time.After(10 * time.Second):
				return
			}
		}
	})
	p := New(Options{})
	defer p.CloseIdle(0)
	r, err := p.RoundTrip(context.Background(), h2cPost(addr, "{}"), addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if r.ContentLength != -1 {
		t.Errorf("ContentLength = %d, want -1 for a stream", r.ContentLength)
	}
	br := bufio.NewReader(r.Body)
	for i := range 3 {
		if err := r.Extend(5 * time.Second); err != nil {
			t.Fatal(err)
		}
		line, err := br.ReadString('\n')
		if want := "data: " + string(rune('a'+i)) + "\n"; line != want || err != nil {
			t.Fatalf("chunk %d: %q, %v; want %q", i, line, err, want)
		}
		br.ReadString('\n')
		next <- struct{}{}
	}
	if _, err := br.ReadByte(); err != io.EOF {
		t.Errorf("after the stream: %v, want io.EOF", err)
	}
	p.Release(r, true)
}

// TestH2CTimeouts: no response head within the timeout is a timeout, sent
// (not retryable); a body silent for longer than Extend allows is one too.
func TestH2CTimeouts(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	addr, _ := h2cServer(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/body" {
			io.WriteString(w, "first")
			w.(http.Flusher).Flush()
		}
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	p := New(Options{})
	defer p.CloseIdle(0)
	start := time.Now()
	_, err := p.RoundTrip(context.Background(), h2cPost(addr, "{}"), addr, 200*time.Millisecond)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() || Unsent(err) {
		t.Fatalf("no head in time: %v; want a timeout that is not an UnsentError", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("the timeout of 200ms took %s", d)
	}

	req := h2cPost(addr, "{}")
	req.Target = "/body"
	r, err := p.RoundTrip(context.Background(), req, addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Release(r, false)
	buf := make([]byte, 5)
	if _, err := io.ReadFull(r.Body, buf); err != nil {
		t.Fatal(err)
	}
	r.Extend(200 * time.Millisecond)
	_, err = r.Body.Read(buf)
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("silent body: %v, want a timeout", err)
	}
}

// TestH2CConnectionsBounded: many exchanges at once share one connection
// while the server allows that many streams; when it allows fewer,
// MaxH2ConnsPerAddr caps the connections and the rest wait for a stream.
func TestH2CConnectionsBounded(t *testing.T) {
	for _, tc := range []struct {
		name       string
		maxStreams int
		maxConns   int
		// inside is how many exchanges the server holds at once, conns
		// how many connections it sees.
		inside int64
		conns  int64
	}{
		{"room for all", 100, 4, 12, 1},
		// A new connection carries one exchange until a response
		// shows the server's SETTINGS are known (see h2Conn.proven):
		// two on the first, one on each of the others.
		{"two streams per connection", 2, 3, 4, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const n = 12
			var inside atomic.Int64
			gate := make(chan struct{})
			srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == "/hold" {
					inside.Add(1)
					<-gate
				}
				io.WriteString(w, "ok")
			}))
			srv.Config.Protocols = new(http.Protocols)
			srv.Config.Protocols.SetUnencryptedHTTP2(true)
			srv.Config.HTTP2 = &http.HTTP2Config{MaxConcurrentStreams: tc.maxStreams}
			var conns atomic.Int64
			srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
				if s == http.StateNew {
					conns.Add(1)
				}
			}
			srv.Start()
			defer srv.Close()
			addr := srv.Listener.Addr().String()
			p := New(Options{MaxH2ConnsPerAddr: tc.maxConns})
			defer p.CloseIdle(0)
			// One exchange first: the client learns the server's SETTINGS.
			r, err := p.RoundTrip(context.Background(), h2cPost(addr, "{}"), addr, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := readAll(p, r); err != nil {
				t.Fatal(err)
			}
			errs := make(chan error, n)
			for range n {
				go func() {
					req := h2cPost(addr, "{}")
					req.Target = "/hold"
					r, err := p.RoundTrip(context.Background(), req, addr, 10*time.Second)
					if err == nil {
						var body string
						body, err = readAll(p, r)
						if err == nil && body != "ok" {
							err = errors.New("body " + body)
						}
					}
					errs <- err
				}()
			}
			deadline := time.Now().Add(5 * time.Second)
			for inside.Load() < tc.inside && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
			if got := inside.Load(); got != tc.inside {
				t.Errorf("the server holds %d exchanges at once, want %d", got, tc.inside)
			}
			if got := conns.Load(); got != tc.conns {
				t.Errorf("%d connections, want %d", got, tc.conns)
			}
			close(gate)
			for range n {
				if err := <-errs; err != nil {
					t.Error(err)
				}
			}
			if got := conns.Load(); got != tc.conns {
				t.Errorf("%d connections in the end, want %d", got, tc.conns)
			}
		})
	}
}

// rawH2 starts a listener whose connections speak HTTP/2 as script says:
// the helper reads the client preface and sends empty SETTINGS, script
// gets a Framer and an HPACK encoder for the rest. It stands for a server
// that breaks the protocol.
func rawH2(t *testing.T, script func(c *rawConn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var open []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range open {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			open = append(open, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				preface := make([]byte, len(http2.ClientPreface))
				if _, err := io.ReadFull(c, preface); err != nil || string(preface) != http2.ClientPreface {
					return
				}
				fr := http2.NewFramer(c, c)
				fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
				if fr.WriteSettings() != nil {
					return
				}
				rc := &rawConn{Conn: c, fr: fr}
				rc.enc = hpack.NewEncoder(&rc.hbuf)
				script(rc)
			}()
		}
	}()
	return ln.Addr().String()
}

// rawConn is a connection of rawH2's.
type rawConn struct {
	net.Conn
	fr   *http2.Framer
	enc  *hpack.Encoder
	hbuf bytes.Buffer
}

// nextRequest reads frames until a request's HEADERS and returns its
// stream, acknowledging SETTINGS on the way; 0 when the client went away.
func (c *rawConn) nextRequest() uint32 {
	fr := c.fr
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			return 0
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				c.fr.WriteSettingsAck()
			}
		case *http2.MetaHeadersFrame:
			return f.StreamID
		}
	}
}

// block encodes a head's fields.
func (c *rawConn) block(fields ...string) []byte {
	c.hbuf.Reset()
	for i := 0; i+1 < len(fields); i += 2 {
		c.enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	return c.hbuf.Bytes()
}

// writeHead sends a response head on a stream.
func (c *rawConn) writeHead(stream uint32, endStream bool, fields ...string) {
	c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: stream, BlockFragment: c.block(fields...), EndHeaders: true, EndStream: endStream})
}

// TestH2CRetryRule: only what provably reached no server is an
// UnsentError — a refused stream, a stream above a GOAWAY's last stream ID,
// nothing listening — and a reset of any other kind, a GOAWAY that covers the
// stream, or a connection that breaks mid-stream is not.
func TestH2CRetryRule(t *testing.T) {
	for _, tc := range []struct {
		name   string
		script func(c *rawConn)
		unsent bool
	}{
		{"REFUSED_STREAM", func(c *rawConn) {
			id := c.nextRequest()
			c.fr.WriteRSTStream(id, http2.ErrCodeRefusedStream)
			c.nextRequest()
		}, true},
		{"GOAWAY above the stream", func(c *rawConn) {
			id := c.nextRequest()
			c.fr.WriteGoAway(id-1, http2.ErrCodeNo, nil)
			c.nextRequest()
		}, true},
		{"GOAWAY covering the stream, then close", func(c *rawConn) {
			id := c.nextRequest()
			c.fr.WriteGoAway(id, http2.ErrCodeNo, nil)
		}, false},
		{"RST_STREAM INTERNAL_ERROR", func(c *rawConn) {
			id := c.nextRequest()
			c.fr.WriteRSTStream(id, http2.ErrCodeInternal)
			c.nextRequest()
		}, false},
		{"RST_STREAM CANCEL", func(c *rawConn) {
			id := c.nextRequest()
			c.fr.WriteRSTStream(id, http2.ErrCodeCancel)
			c.nextRequest()
		}, false},
		{"close after the request", func(c *rawConn) {
			c.nextRequest()
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr := rawH2(t, tc.script)
			p := New(Options{})
			defer p.CloseIdle(0)
			_, err := p.RoundTrip(context.Background(), h2cPost(addr, "{}"), addr, 5*time.Second)
			if err == nil {
				t.Fatal("no error")
			}
			var bad *ResponseError
			if Unsent(err) != tc.unsent || errors.As(err, &bad) {
				t.Errorf("Unsent(%v) = %v, want %v (and no ResponseError)", err, Unsent(err), tc.unsent)
			}
		})
	}

	t.Run("nothing listening", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		_, err = New(Options{}).RoundTrip(context.Background(), h2cPost(addr, "{}"), addr, 5*time.Second)
		if !Unsent(err) {
			t.Errorf("dialling a closed port: %v, want an UnsentError", err)
		}
	})
}

// TestH2CHostileServer: what a server breaks costs the exchange, with the
// same errors as on HTTP/1.1, and its connection is not used again.
func TestH2CHostileServer(t *testing.T) {
	big := strings.Repeat("x", 8<<10)
	for _, tc := range []struct {
		name string
		// maxHead is Options.MaxResponseHeaderBytes.
		maxHead int
		script  func(c *rawConn)
		// head: the error comes with the head; else from the body.
		head bool
		want func(error) bool
	}{
		{"head too large", 4 << 10, func(c *rawConn) {
			// One frame, over the bound but by less than twice it: the
			// stream is refused, the connection lives.
			c.writeHead(c.nextRequest(), true, ":status", "200", "x-big-a", big[:2<<10], "x-big-b", big[:2<<10], "x-big-c", big[:2<<10])
			c.nextRequest()
		}, true, func(err error) bool { return errors.Is(err, ErrHeadTooLarge) }},
		{"head far too large", 0, func(c *rawConn) {
			id := c.nextRequest()
			fields := []string{":status", "200"}
			for i := range 16 {
				fields = append(fields, "x-big-"+string(rune('a'+i)), big)
			}
			// CONTINUATION frames carry what one frame cannot: the
			// client stops reading them and closes the connection.
			block := c.block(fields...)
			c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block[:16000]})
			for block = block[16000:]; len(block) > 16000; block = block[16000:] {
				c.fr.WriteContinuation(id, false, block[:16000])
			}
			c.fr.WriteContinuation(id, true, block)
			c.nextRequest()
		}, true, func(err error) bool { var bad *ResponseError; return errors.As(err, &bad) }},
		{"status out of range", 0, func(c *rawConn) {
			c.writeHead(c.nextRequest(), true, ":status", "999")
			c.nextRequest()
		}, true, func(err error) bool { var bad *ResponseError; return errors.As(err, &bad) }},
		{"garbage frames", 0, func(c *rawConn) {
			c.nextRequest()
			c.fr.WriteRawFrame(http2.FrameData, 0, 0, []byte("not on stream 0"))
			c.nextRequest()
		}, true, func(err error) bool { var bad *ResponseError; return errors.As(err, &bad) }},
		{"an HTTP/1.1 answer", 0, func(c *rawConn) {
			c.nextRequest()
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
			c.nextRequest()
		}, true, func(err error) bool { return errors.Is(err, ErrHTTP1Answer) }},
		{"reset mid-body", 0, func(c *rawConn) {
			id := c.nextRequest()
			c.writeHead(id, false, ":status", "200")
			c.fr.WriteData(id, false, []byte("partial"))
			c.fr.WriteRSTStream(id, http2.ErrCodeInternal)
			c.nextRequest()
		}, false, func(err error) bool {
			var se http2.StreamError
			return errors.As(err, &se) && se.Code == http2.ErrCodeInternal
		}},
		{"body shorter than its content-length", 0, func(c *rawConn) {
			id := c.nextRequest()
			c.writeHead(id, false, ":status", "200", "content-length", "100")
			c.fr.WriteData(id, true, []byte("short"))
			c.nextRequest()
		}, false, func(err error) bool { return err != nil && err != io.EOF }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr := rawH2(t, tc.script)
			p := New(Options{MaxResponseHeaderBytes: tc.maxHead})
			defer p.CloseIdle(0)
			r, err := p.RoundTrip(context.Background(), h2cPost(addr, "{}"), addr, 5*time.Second)
			if !tc.head {
				if err != nil {
					t.Fatal(err)
				}
				_, err = readAll(p, r)
			} else if err == nil {
				p.Release(r, false)
				t.Fatal("a response")
			}
			if !tc.want(err) {
				t.Errorf("unexpected error %v (%T)", err, err)
			}
		})
	}
}

// TestH2CForget: forgetting an address closes its idle connection at once
// and a busy one when its exchange ends.
func TestH2CForget(t *testing.T) {
	gate := make(chan struct{})
	var closed atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/hold" {
			<-gate
		}
		io.WriteString(w, "ok")
	}))
	srv.Config.Protocols = new(http.Protocols)
	srv.Config.Protocols.SetUnencryptedHTTP2(true)
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateClosed {
			closed.Add(1)
		}
	}
	srv.Start()
	defer srv.Close()
	addr := srv.Listener.Addr().String()
	p := New(Options{})
	r, err := p.RoundTrip(context.Background(), h2cPost(addr, "{}"), addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	readAll(p, r)
	p.Forget(addr)
	waitFor(t, "the idle connection closed", func() bool { return closed.Load() == 1 })

	req := h2cPost(addr, "{}")
	req.Target = "/hold"
	done := make(chan error, 1)
	go func() {
		r, err := p.RoundTrip(context.Background(), req, addr, 5*time.Second)
		if err == nil {
			_, err = readAll(p, r)
		}
		done <- err
	}()
	waitFor(t, "the second connection in use", func() bool {
		p.h2.mu.Lock()
		defer p.h2.mu.Unlock()
		return len(p.h2.conns[addr]) == 1 && p.h2.conns[addr][0].streams == 1
	})
	p.Forget(addr)
	if closed.Load() != 1 {
		t.Error("Forget closed a connection an exchange runs on")
	}
	close(gate)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the busy connection closed after its exchange", func() bool { return closed.Load() == 2 })
}
