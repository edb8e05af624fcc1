package upstream

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"
)

// fuzzHeadLimit is the pool's MaxResponseHeaderBytes in FuzzReadResponse:
// small, so that inputs of a few KiB reach it.
const fuzzHeadLimit = 2 << 10

// outcome is what reading a response gives, in the terms the differential
// fuzz compares.
type outcome struct {
	ok      bool
	why     string // when not ok, for the failure message
	status  int
	header  http.Header
	body    string
	length  int64
	chunked []string
	trailer http.Header
}

func (o outcome) String() string {
	if !o.ok {
		return "refused: " + o.why
	}
	return fmt.Sprintf("status %d, header %v, trailer %v, Content-Length %d, Transfer-Encoding %q, body %q", o.status, o.header, o.trailer, o.length, o.chunked, o.body)
}

func accepted(resp *http.Response, body []byte) outcome {
	return outcome{ok: true, status: resp.StatusCode, header: resp.Header, body: string(body), length: resp.ContentLength, chunked: resp.TransferEncoding, trailer: resp.Trailer}
}

func refused(why string, args ...any) outcome { return outcome{why: fmt.Sprintf(why, args...)} }

// reference is what net/http makes of raw as the response to a GET (or a
// HEAD), with the pool's deliberate differences applied: interim responses
// skipped (at most maxInterim), 101 and statuses outside 100-599 refused,
// the heads bounded by limit together, and any byte after the end of a
// response that does not end by the server closing the connection refused.
func reference(raw []byte, head bool, limit int) outcome {
	src := bytes.NewReader(raw)
	r := bufio.NewReader(src)
	consumed := func() int { return len(raw) - src.Len() - r.Buffered() }
	var req *http.Request
	if head {
		req = &http.Request{Method: http.MethodHead}
	}
	for interim := 0; ; interim++ {
		resp, err := http.ReadResponse(r, req)
		if err != nil {
			return refused("head: %v", err)
		}
		if consumed() > limit {
			return refused("the heads take %d bytes", consumed())
		}
		switch {
		case resp.StatusCode == http.StatusSwitchingProtocols:
			return refused("101")
		case resp.StatusCode < 100 || resp.StatusCode > 599:
			return refused("status %d", resp.StatusCode)
		case resp.StatusCode < 200:
			if interim == maxInterim {
				return refused("too many interim responses")
			}
			continue
		}
		toClose := resp.ContentLength < 0 && !isChunked(resp) && resp.Body != http.NoBody
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			return refused("body: %v", err)
		}
		if n := consumed(); !toClose && n < len(raw) {
			return refused("%d bytes after the response", len(raw)-n)
		}
		return accepted(resp, body)
	}
}

// throughPool is what the pool makes of raw, sent by a server on a real
// connection after it read the request, which then closes its side.
func throughPool(t *testing.T, l net.Listener, raw []byte, head bool) outcome {
	served := make(chan error, 1)
	// A pool that never connects must not leave the server waiting.
	l.(*net.TCPListener).SetDeadline(time.Now().Add(10 * time.Second))
	go func() {
		c, err := l.Accept()
		if err != nil {
			served <- err
			return
		}
		defer c.Close()
		if _, err := http.ReadRequest(bufio.NewReader(c)); err != nil {
			served <- err
			return
		}
		c.Write(raw) // fails when the pool gave up early
		c.(*net.TCPConn).CloseWrite()
		io.Copy(io.Discard, c) // until the pool closes it
		served <- nil
	}()
	p := New(Options{MaxResponseHeaderBytes: fuzzHeadLimit})
	defer func() {
		p.CloseIdle(0)
		if err := <-served; err != nil {
			t.Fatalf("the fake server: %v", err)
		}
	}()
	addr := l.Addr().String()
	req := request(addr, "/")
	if head {
		req.Method = http.MethodHead
	}
	r, err := p.RoundTrip(context.Background(), req, addr, 10*time.Second)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("RoundTrip timed out: %v", err)
		}
		if Unsent(err) {
			t.Fatalf("RoundTrip: %v is an UnsentError, but the request was sent", err)
		}
		return refused("RoundTrip: %v", err)
	}
	body, err := io.ReadAll(r.Body)
	p.Release(r, err == nil)
	if err != nil {
		return refused("body: %v", err)
	}
	return accepted(r.Response, body)
}

// FuzzReadResponse checks the pool against net/http: the same bytes, sent
// by a server after it read the request, are accepted or refused alike and,
// when accepted, give the same status, fields, trailer and body. The pool's
// deliberate differences are applied to net/http's answer (reference).
func FuzzReadResponse(f *testing.F) {
	for _, seed := range []struct {
		raw  string
		head bool
	}{
		{"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false},
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", false},
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n", false},
		// Content-Length and Transfer-Encoding together, twice, wrong.
		{"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", false},
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 100\r\n\r\n5\r\nhello\r\n0\r\n\r\n", false},
		{"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", false},
		{"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", false},
		{"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello", false},
		{"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhello", false},
		{"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello", false},
		{"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\nhello", false},
		{"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhello", false},
		{"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello", false},
		// Chunk sizes and extensions.
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\nhello\r\n0\r\n\r\n", false},
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n", false},
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;name=value\r\nhello\r\n0;last\r\n\r\n", false},
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5 ; x=\"y\"\r\nhello\r\n0\r\n\r\n", false},
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", false},
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", false},
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n", false},
		// Bare LF, obs-fold.
		{"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello", false},
		{"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 5\r\n\r\nhello", false},
		{"HTTP/1.1 200 OK\r\n X-Leading: fold\r\nContent-Length: 5\r\n\r\nhello", false},
		{"HTTP/1.1 200 OK\r\nContent-Length:\r\n 5\r\n\r\nhello", false},
		// Transfer codings.
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n", false},
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nContent-Length: 5\r\n\r\nhello", false},
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", false},
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", false},
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: CHUNKED\r\n\r\n5\r\nhello\r\n0\r\n\r\n", false},
		// HTTP/1.0, and bodies that end when the server closes.
		{"HTTP/1.0 200 OK\r\n\r\nhello", false},
		{"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello", false},
		{"HTTP/1.1 200 OK\r\n\r\nhello, until the server closes", false},
		{"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello", false},
		// Interim responses, 101.
		{"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false},
		{"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false},
		{strings.Repeat("HTTP/1.1 103 Early Hints\r\n\r\n", 6) + "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false},
		{"HTTP/1.1 103 Early Hints\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false},
		{"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nbinary", false},
		{"HTTP/1.1 199 Whatever\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false},
		// Bodiless responses, with and without a body.
		{"HTTP/1.1 204 No Content\r\n\r\n", false},
		{"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello", false},
		{"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", false},
		{"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true},
		{"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", true},
		// Two responses to one request; nothing at all; not HTTP.
		{"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nworld", false},
		{"", false},
		{"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", false},
		{"SSH-2.0-OpenSSH_9.6\r\n", false},
		{"HTTP/1.1 2000 OK\r\n\r\n", false},
		{"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n", false},
		{"HTTP/1.1 600 High\r\nContent-Length: 0\r\n\r\n", false},
		{"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", false},
		{"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 0\r\n\r\n", false},
		{"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n", false},
		// The head bound: just within, just over, over with interim heads.
		{"HTTP/1.1 200 OK\r\nX: " + strings.Repeat("a", fuzzHeadLimit-len("HTTP/1.1 200 OK\r\nX: \r\n\r\n")) + "\r\n\r\n", false},
		{"HTTP/1.1 200 OK\r\nX: " + strings.Repeat("a", fuzzHeadLimit-len("HTTP/1.1 200 OK\r\nX: \r\n\r\n")+1) + "\r\n\r\n", false},
		{"HTTP/1.1 103 Early Hints\r\nX: " + strings.Repeat("a", fuzzHeadLimit/2) + "\r\n\r\nHTTP/1.1 200 OK\r\nX: " + strings.Repeat("a", fuzzHeadLimit/2) + "\r\nContent-Length: 0\r\n\r\n", false},
	} {
		f.Add([]byte(seed.raw), seed.head)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { l.Close() })
	f.Fuzz(func(t *testing.T, raw []byte, head bool) {
		// Sent in one write, the bytes arrive together: what comes after a
		// response is there when its end is read.
		if len(raw) > 32<<10 {
			t.Skip("larger than one loopback segment")
		}
		want := reference(raw, head, fuzzHeadLimit)
		got := throughPool(t, l, raw, head)
		if got.ok != want.ok || (got.ok && !reflect.DeepEqual(got, want)) {
			t.Errorf("for %q (HEAD %v):\npool:     %v\nnet/http: %v", raw, head, got, want)
		}
	})
}
