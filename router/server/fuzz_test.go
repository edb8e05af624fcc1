package server

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/net/http/httpguts"
)

// FuzzServerVsNetHTTP sends the same bytes, as one connection's, to Server
// and to net/http.Server, each with a handler that records the requests it
// gets, and requires that both accept the same requests, see each alike
// (method, target, protocol, Host, header fields, framing, body, trailers),
// and reject alike what they do not accept. What one server accepts and
// the other does not is where a server in front of the router and the
// router could read one stream as different requests: request smuggling.
//
// The servers differ on purpose in these places, which the comparison
// allows for and nothing else:
//
//   - MaxHeaderFields is net/http-less; the fuzz server's is out of reach
//     (limits_test.go tests it). MaxHeaderBytes is the same on both, but
//     where exactly a head crosses it depends on how the bytes were read
//     (both count what they read from the connection, past what was
//     buffered), so around it one may answer 431 where the other accepts;
//     comparing stops there.
//   - Server closes the connection after a request with both
//     Transfer-Encoding and Content-Length, or with Transfer-Encoding in
//     HTTP/1.0 (RFC 9112 sections 6.1 and 6.3 say it must), and after
//     every HTTP/1.0 request (it keeps no HTTP/1.0 connection alive):
//     net/http may go on to serve more requests where Server stops.
//   - "PRI * HTTP/2.0" reaches net/http's handler (for an h2c upgrade it
//     may do); Server, which speaks no HTTP/2, answers 505.
//   - Server checks the host a request is routed by, Request.Host, which
//     for a target in absolute form is the target's, as a valid host; net/http
//     checks only the Host field's, so it lets a target such as
//     `a://"/` through. Server answers 400: safe, it only rejects more.
//   - net/http answers "OPTIONS *" itself unless told not to; the fuzz
//     server is told not to.
//
// Rejections are compared as such, not by status: net/http answers an
// unknown Transfer-Encoding with 501, Server with 400.
func FuzzServerVsNetHTTP(f *testing.F) {
	for _, seed := range smugglingSeeds() {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		checkScanInPieces(t, data)
		ours := exchangeOurs(t, data)
		theirs := exchangeNetHTTP(t, data)
		compareExchanges(t, data, ours, theirs)
	})
}

// fuzzMaxHeaderBytes is both servers' MaxHeaderBytes: small, so that the
// fuzzer reaches it.
const fuzzMaxHeaderBytes = 4 << 10

// fuzzRequest is what a handler saw of a request.
type fuzzRequest struct {
	Method, RequestURI, Proto, Host, URL string
	Header, Trailer                      http.Header
	ContentLength                        int64
	TransferEncoding                     []string
	Close                                bool
	Body                                 string
	BodyErr                              bool
}

// fuzzExchange is what one server made of the bytes.
type fuzzExchange struct {
	requests []fuzzRequest
	// closes says, for each request Server served, why it closes the
	// connection after it where net/http may not ("" when nothing does).
	closes []string
	// rejected is the status of the server's own answer (not the
	// handler's) after the requests, 0 if it gave none.
	rejected int
	raw      []byte
}

const fuzzHandlerField = "X-Fuzz-Handler"

func recordRequest(r *http.Request) fuzzRequest {
	body, err := io.ReadAll(r.Body)
	return fuzzRequest{
		Method: r.Method, RequestURI: r.RequestURI, Proto: r.Proto, Host: r.Host, URL: r.URL.String(),
		Header: r.Header.Clone(), Trailer: r.Trailer.Clone(),
		ContentLength: r.ContentLength, TransferEncoding: r.TransferEncoding, Close: r.Close,
		Body: string(body), BodyErr: err != nil,
	}
}

func answer(w http.ResponseWriter) {
	w.Header().Set(fuzzHandlerField, "1")
	w.WriteHeader(http.StatusNoContent)
}

func exchangeOurs(t *testing.T, data []byte) fuzzExchange {
	var (
		mu sync.Mutex
		x  fuzzExchange
	)
	srv := &Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			rec := recordRequest(r)
			why := ""
			switch c := w.(*response).c; {
			case c.cr.scan.suspiciousFraming(r.ProtoAtLeast(1, 1)):
				why = "framing"
			case !r.ProtoAtLeast(1, 1):
				why = "HTTP/1.0"
			}
			mu.Lock()
			x.requests, x.closes = append(x.requests, rec), append(x.closes, why)
			mu.Unlock()
			answer(w)
		}),
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       5 * time.Second,
		WriteTimeout:      5 * time.Second,
		MaxHeaderBytes:    fuzzMaxHeaderBytes,
		MaxHeaderFields:   1 << 20,
	}
	client, server := pipePair()
	c := srv.newConn(server)
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.serve()
	}()
	raw := talk(t, client, data)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Server did not end the connection")
	}
	mu.Lock()
	defer mu.Unlock()
	x.raw = raw
	x.rejected = rejection(raw)
	return x
}

func exchangeNetHTTP(t *testing.T, data []byte) fuzzExchange {
	var (
		mu sync.Mutex
		x  fuzzExchange
	)
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			rec := recordRequest(r)
			mu.Lock()
			x.requests = append(x.requests, rec)
			mu.Unlock()
			answer(w)
		}),
		ReadHeaderTimeout:            5 * time.Second,
		IdleTimeout:                  5 * time.Second,
		MaxHeaderBytes:               fuzzMaxHeaderBytes,
		DisableGeneralOptionsHandler: true,
		ErrorLog:                     log.New(io.Discard, "", 0),
	}
	client, server := pipePair()
	ln := &oneConnListener{conn: server, done: make(chan struct{})}
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.Serve(ln)
	}()
	raw := talk(t, client, data)
	// Its connection may still wait out net/http's linger (a real 500ms
	// sleep after a 431); what it wrote is all there is.
	srv.Close()
	<-served
	mu.Lock()
	defer mu.Unlock()
	x.raw = raw
	x.rejected = rejection(raw)
	return x
}

// talk sends data on c, then ends its sending side, and returns all the
// server wrote until it closed the connection.
func talk(t *testing.T, c *pipeConn, data []byte) []byte {
	go func() {
		c.Write(data)
		c.CloseWrite()
	}()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	raw, err := io.ReadAll(c)
	c.Close()
	if err != nil {
		t.Fatalf("reading the answers: %v (after %q)", err, raw)
	}
	return raw
}

// rejection returns the status of the first answer in raw that no
// handler gave, 0 if there is none.
func rejection(raw []byte) int {
	br := bufio.NewReader(bytes.NewReader(raw))
	for {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return 0
		}
		io.Copy(io.Discard, resp.Body)
		switch {
		case resp.StatusCode < 200:
		case resp.Header.Get(fuzzHandlerField) == "":
			return resp.StatusCode
		}
	}
}

func compareExchanges(t *testing.T, data []byte, ours, theirs fuzzExchange) {
	t.Helper()
	n := min(len(ours.requests), len(theirs.requests))
	for i := range n {
		if diff := cmp.Diff(theirs.requests[i], ours.requests[i]); diff != "" {
			t.Fatalf("request %d is seen differently (-net/http +ours):\n%s\ninput %q", i, diff, data)
		}
	}
	// Server closed the connection where net/http may not have: what
	// came after is net/http's alone.
	oursClosed := n > 0 && len(ours.requests) == n && ours.closes[n-1] != ""
	// Around MaxHeaderBytes a 431 may come a request earlier or later.
	headLimit := len(data) >= fuzzMaxHeaderBytes && (ours.rejected == http.StatusRequestHeaderFieldsTooLarge || theirs.rejected == http.StatusRequestHeaderFieldsTooLarge)
	switch {
	case len(ours.requests) < len(theirs.requests):
		next := theirs.requests[n]
		switch {
		case oursClosed, headLimit:
		case ours.rejected == http.StatusHTTPVersionNotSupported && next.Method == "PRI" && next.Proto == "HTTP/2.0":
		case ours.rejected == http.StatusBadRequest && !httpguts.ValidHostHeader(next.Host):
		default:
			t.Fatalf("net/http served request %d (%+v), ours did not (rejected: %d)\ninput %q\nours  %q\ntheirs %q",
				n, next, ours.rejected, data, ours.raw, theirs.raw)
		}
	case len(ours.requests) > len(theirs.requests):
		if !headLimit {
			t.Fatalf("ours served request %d (%+v), net/http did not (rejected: %d)\ninput %q\nours  %q\ntheirs %q",
				n, ours.requests[n], theirs.rejected, data, ours.raw, theirs.raw)
		}
	case (ours.rejected != 0) != (theirs.rejected != 0):
		if !oursClosed && !headLimit {
			t.Fatalf("after %d requests, ours rejected with %d, net/http with %d (0: not at all)\ninput %q\nours  %q\ntheirs %q",
				n, ours.rejected, theirs.rejected, data, ours.raw, theirs.raw)
		}
	}
}

// checkScanInPieces requires that a head's scan finds the same however
// its bytes came: at once, byte by byte, or in two reads split anywhere.
func checkScanInPieces(t *testing.T, data []byte) {
	t.Helper()
	data = data[:min(len(data), 2<<10)]
	whole := scanPieces(data)
	bytewise := make([][]byte, len(data))
	for i := range data {
		bytewise[i] = data[i : i+1]
	}
	if got := scanPieces(bytewise...); got != whole {
		t.Fatalf("scanned byte by byte: %+v, at once: %+v; input %q", got, whole, data)
	}
	for i := range min(len(data), 300) {
		if got := scanPieces(data[:i], data[i:]); got != whole {
			t.Fatalf("scanned in two pieces split at %d: %+v, at once: %+v; input %q", i, got, whole, data)
		}
	}
}

// scanPieces scans a head that comes in pieces and returns what it found
// (not the state of the line it was reading).
func scanPieces(pieces ...[]byte) headScan {
	var h headScan
	h.start(nil)
	for _, p := range pieces {
		h.feed(p)
	}
	return headScan{on: h.on, ended: h.ended, lines: h.lines, hosts: h.hosts, contentLengths: h.contentLengths,
		transferEncodings: h.transferEncodings, badHost: h.badHost, badName: h.badName}
}

// pipePair returns the two ends of an in-memory connection.
func pipePair() (client, server *pipeConn) {
	up, upServer := net.Pipe()     // the client's bytes to the server
	downServer, down := net.Pipe() // the server's to the client
	return &pipeConn{in: down, out: up}, &pipeConn{in: upServer, out: downServer}
}

// oneConnListener is a net.Listener with one connection to accept.
type oneConnListener struct {
	conn      net.Conn
	once      sync.Once
	done      chan struct{}
	closeOnce sync.Once
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	var c net.Conn
	l.once.Do(func() { c = l.conn })
	if c != nil {
		return c, nil
	}
	<-l.done
	return nil, net.ErrClosed
}

func (l *oneConnListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return nil
}

func (l *oneConnListener) Addr() net.Addr { return pipeAddr{} }

// smugglingSeeds are the fuzz test's seeds, and so a unit test of each on
// every test run: the request smuggling catalogue (CL.TE, TE.CL, and the
// ways a field or line can be read two ways) and the edges of the rules
// both servers keep.
func smugglingSeeds() []string {
	const host = "Host: a\r\n"
	next := "GET /next HTTP/1.1\r\n" + host + "\r\n"
	post := func(fields, body string) string {
		return "POST /p HTTP/1.1\r\n" + host + fields + "\r\n" + body
	}
	seeds := []string{
		// Plain and pipelined.
		"GET / HTTP/1.1\r\n" + host + "\r\n",
		"GET / HTTP/1.1\r\n" + host + "\r\n" + next + next,
		post("Content-Length: 5\r\n", "hello") + next,
		post("Transfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n") + next,
		post("Content-Length: 2\r\n", "{}") + "\r\n" + next, // a stray CRLF after a POST
		post("Content-Length: 2\r\n", "{}") + "\r\n\r\n\r\n" + next,
		"GET / HTTP/1.1\r\n" + host + "Connection: close\r\n\r\n" + next,

		// CL.TE and TE.CL.
		post("Content-Length: 13\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\nSMUGGLED") + next,
		post("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", "8\r\nSMUGGLED\r\n0\r\n\r\n") + next,
		post("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", "5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n"),
		// Duplicate and malformed Content-Length.
		post("Content-Length: 5\r\nContent-Length: 5\r\n", "hello") + next,
		post("Content-Length: 5\r\nContent-Length: 6\r\n", "hello!") + next,
		post("Content-Length: 5, 5\r\n", "hello") + next,
		post("Content-Length: +5\r\n", "hello") + next,
		post("Content-Length: -1\r\n", "hello") + next,
		post("Content-Length: 0x5\r\n", "hello") + next,
		post("Content-Length: 5 \r\n", "hello") + next,
		post("Content-Length:  5\r\n", "hello") + next,
		post("Content-Length: 99999999999999999999\r\n", "hello"),
		post("Content-Length: 10\r\n", "short"),
		// Chunked edges.
		post("Transfer-Encoding: chunked\r\n", "ffffffffffffffffff\r\nhello\r\n0\r\n\r\n") + next,
		post("Transfer-Encoding: chunked\r\n", "5;ext=1\r\nhello\r\n0\r\n\r\n") + next,
		post("Transfer-Encoding: chunked\r\n", "5;a=\"b;c\"\r\nhello\r\n0;x\r\n\r\n") + next,
		post("Transfer-Encoding: chunked\r\n", "5\nhello\n0\n\n") + next,
		post("Transfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n") + next,
		post("Transfer-Encoding: chunked\r\nTrailer: X-T\r\n", "5\r\nhello\r\n0\r\nX-T: t\r\n\r\n") + next,
		post("Transfer-Encoding: chunked\r\n", "5\r\nhelloXX0\r\n\r\n") + next,
		post("Transfer-Encoding: chunked\r\n", "-5\r\nhello\r\n0\r\n\r\n") + next,
		post("Transfer-Encoding: chunked\r\n", "0x5\r\nhello\r\n0\r\n\r\n") + next,
		post("Transfer-Encoding: chunked\r\n", " 5\r\nhello\r\n0\r\n\r\n") + next,
		// Transfer-Encoding values and spellings.
		post("Transfer-Encoding: chunked, identity\r\n", "5\r\nhello\r\n0\r\n\r\n") + next,
		post("Transfer-Encoding: identity\r\n", "hello") + next,
		post("Transfer-Encoding: identity, chunked\r\n", "5\r\nhello\r\n0\r\n\r\n") + next,
		post("Transfer-Encoding: Chunked\r\n", "5\r\nhello\r\n0\r\n\r\n") + next,
		post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n") + next,
		post("Transfer-Encoding: xchunked\r\n", "5\r\nhello\r\n0\r\n\r\n") + next,
		post("Transfer-Encoding: chunked \r\n", "5\r\nhello\r\n0\r\n\r\n") + next,
		post("Transfer-Encoding:\tchunked\r\n", "5\r\nhello\r\n0\r\n\r\n") + next,
		post("Transfer-Encoding : chunked\r\n", "5\r\nhello\r\n0\r\n\r\n") + next,
		post("Transfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n") + next,
		post("Transfer-Encoding:\r\n chunked\r\n", "5\r\nhello\r\n0\r\n\r\n") + next,
		post("X: x\r\n Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", "hello") + next,
		post("Transfer_Encoding: chunked\r\nContent-Length: 5\r\n", "hello") + next,
		post("Transfer-Encoding: gzip, chunked\r\n", "5\r\nhello\r\n0\r\n\r\n") + next,
		// HTTP/1.0 with Transfer-Encoding.
		"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello" + next,
		"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + next,
		// Line ends.
		"GET / HTTP/1.1\n" + "Host: a\n\n" + next,
		"GET / HTTP/1.1\r\nHost: a\r\n\n" + next,
		"GET / HTTP/1.1\rHost: a\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost: a\r\n\r\r\n" + next,
		"GET / HTTP/1.1\r\r\nHost: a\r\n\r\n",
		"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
		// obs-fold.
		"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\tc\r\n \r\n\r\n" + next,
		"GET / HTTP/1.1\r\n Host: a\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost: a\r\n b\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost:\r\n a\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost:\r\n a\r\n \r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost:\r\n \r\n a\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost: a\r\n \r\n\r\n" + next,
		"GET http://b/ HTTP/1.1\r\nHost: a\r\n b\r\n\r\n" + next,
		// Field names and values.
		"GET / HTTP/1.1\r\nHost: a\r\nX A: b\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost: a\r\nX:A: b\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost: a\r\n: b\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost: a\r\nX\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost: a\r\nX: \xff\xfe\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost: a\r\nX-\xc3\xa9: b\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost: a\r\nx-lower: b\r\nX-LOWER: c\r\n\r\n" + next,
		// Host.
		"GET / HTTP/1.1\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost:\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost: a b\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost: a\tb\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost:  a  \r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n" + next,
		"GET / HTTP/1.1\r\nHost : a\r\n\r\n" + next,
		"GET / HTTP/1.0\r\n\r\n",
		// Request targets.
		"GET http://b/x?y HTTP/1.1\r\n" + host + "\r\n" + next,
		"GET http://b/x HTTP/1.1\r\n\r\n" + next,
		"GET http://b/x HTTP/1.1\r\nHost: a b\r\n\r\n" + next,
		"GET http://b/x HTTP/1.1\r\nHost: \r\n\r\n" + next,
		"GET https://b:443/x HTTP/1.1\r\n" + host + "\r\n" + next,
		"GET //b/x HTTP/1.1\r\n" + host + "\r\n" + next,
		"OPTIONS * HTTP/1.1\r\n" + host + "\r\n" + next,
		"GET * HTTP/1.1\r\n" + host + "\r\n" + next,
		"CONNECT b:443 HTTP/1.1\r\n\r\n" + next,
		"CONNECT b:443 HTTP/1.1\r\n" + host + "\r\n" + next,
		"CONNECT /rpc HTTP/1.1\r\n" + host + "\r\n" + next,
		"GET /a%20b/%2F?q=%ZZ HTTP/1.1\r\n" + host + "\r\n" + next,
		"GET /a b HTTP/1.1\r\n" + host + "\r\n" + next,
		"GET /a\tb HTTP/1.1\r\n" + host + "\r\n" + next,
		"GET  / HTTP/1.1\r\n" + host + "\r\n" + next,
		"GET / HTTP/1.1 \r\n" + host + "\r\n" + next,
		"GET /\x00 HTTP/1.1\r\n" + host + "\r\n" + next,
		"get / HTTP/1.1\r\n" + host + "\r\n" + next,
		"G(T / HTTP/1.1\r\n" + host + "\r\n" + next,
		"GET / http/1.1\r\n" + host + "\r\n" + next,
		"GET / HTTP/1.10\r\n" + host + "\r\n" + next,
		"GET / HTTP/2.0\r\n" + host + "\r\n" + next,
		"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
		"GET / HTTP/0.9\r\n" + host + "\r\n" + next,
		"GET /\r\n\r\n",
		// HTTP/1.0 and keep-alive.
		"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.0\r\n\r\n",
		"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n" + host + "\r\n" + next,
		"POST / HTTP/1.0\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n{}" + next,
		"GET / HTTP/1.1\r\n" + host + "Connection: keep-alive, close\r\n\r\n" + next,
		// Expect.
		post("Content-Length: 5\r\nExpect: 100-continue\r\n", "hello") + next,
		post("Content-Length: 5\r\nExpect: 100-Continue\r\n", "hello") + next,
		post("Content-Length: 5\r\nExpect: 100-continue, foo\r\n", "hello") + next,
		post("Content-Length: 5\r\nExpect: foo\r\n", "hello") + next,
		post("Content-Length: 5\r\nExpect: 100-continuex\r\n", "hello") + next,
		post("Content-Length: 0\r\nExpect: 100-continue\r\n", "") + next,
		post("Content-Length: 5\r\nExpect:\r\n", "hello") + next,
		post("Content-Length: 5\r\nExpect: foo\r\nExpect: 100-continue\r\n", "hello") + next,
		"GET / HTTP/1.1\r\n" + host + "Expect: 200-ok\r\n\r\n" + next,
		"POST / HTTP/1.0\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello",
		// Sizes: within and beyond fuzzMaxHeaderBytes, and the default.
		"GET / HTTP/1.1\r\n" + host + "X: " + strings.Repeat("x", 2<<10) + "\r\n\r\n" + next,
		"GET / HTTP/1.1\r\n" + host + "X: " + strings.Repeat("x", 10<<10) + "\r\n\r\n" + next,
		"GET / HTTP/1.1\r\n" + host + "X: " + strings.Repeat("x", 70<<10) + "\r\n\r\n" + next,
		"GET /" + strings.Repeat("u", 10<<10) + " HTTP/1.1\r\n" + host + "\r\n" + next,
		"GET / HTTP/1.1\r\n" + host + strings.Repeat("X: y\r\n", 150) + "\r\n" + next,
		post("Content-Length: 70000\r\n", strings.Repeat("b", 70000)) + next,
	}
	return append(seeds, fmt.Sprintf("POST / HTTP/1.1\r\n%sTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n%s", host, 9000, strings.Repeat("c", 9000), next))
}
