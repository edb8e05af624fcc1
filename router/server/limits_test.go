package server

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"testing/synctest"
)

// headWith returns a GET head with fields field lines, Host included, and
// one more field whose value has pad bytes.
func headWith(fields, pad int) string {
	var b strings.Builder
	b.WriteString("GET / HTTP/1.1\r\nHost: test\r\n")
	for i := 1; i < fields; i++ {
		fmt.Fprintf(&b, "X-F%d: v\r\n", i)
	}
	if pad > 0 {
		b.WriteString("X-Pad: " + strings.Repeat("p", pad) + "\r\n")
	}
	b.WriteString("\r\n")
	return b.String()
}

// The defaults are Envoy's: a head of up to 64 KiB and 100 field lines;
// beyond either the client gets 431 and the connection closes, whether the
// head came in one piece or trickled in, so that the limit is kept while
// reading, not after.
func TestHeadLimits(t *testing.T) {
	for name, tc := range map[string]struct {
		head   string
		status int
	}{
		"100 fields":  {headWith(100, 0), http.StatusOK},
		"101 fields":  {headWith(101, 0), http.StatusRequestHeaderFieldsTooLarge},
		"1000 fields": {headWith(1000, 0), http.StatusRequestHeaderFieldsTooLarge},
		"60 KiB":      {headWith(1, 60<<10), http.StatusOK},
		"70 KiB":      {headWith(1, 70<<10), http.StatusRequestHeaderFieldsTooLarge},
		// Names longer than any framing field's, split across reads.
		"long field names": {"GET / HTTP/1.1\r\nHost: test\r\nX-Stainless-Package-Version: 1.54.0\r\nTransfer-Encodings: x\r\n" +
			"X-" + strings.Repeat("n", 100) + ": v\r\n\r\n", http.StatusOK},
		"100 folded fields": {"GET / HTTP/1.1\r\nHost: test\r\nX: a\r\n" + strings.Repeat(" b\r\n", 100) + "\r\n", http.StatusRequestHeaderFieldsTooLarge},
	} {
		for _, piece := range []int{0, 7} {
			t.Run(fmt.Sprintf("%s, in pieces of %d bytes", name, piece), func(t *testing.T) {
				synctest.Test(t, func(t *testing.T) {
					_, ln := startPiped(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
					c, br := ln.dial(t)
					go func() {
						// A pipe delivers each write to one read: small writes
						// reach the server one by one.
						for rest := tc.head; rest != ""; {
							n := len(rest)
							if piece > 0 {
								n = min(n, piece)
							}
							if _, err := io.WriteString(c, rest[:n]); err != nil {
								return
							}
							rest = rest[n:]
						}
					}()
					resp, body := readResponse(t, br, "GET")
					if resp.StatusCode != tc.status {
						t.Fatalf("status %d (%q), want %d", resp.StatusCode, body, tc.status)
					}
					if tc.status == http.StatusOK {
						return
					}
					if !resp.Close || body != "431 Request Header Fields Too Large" {
						t.Errorf("close %v, body %q; want the connection closed and a plain 431 body", resp.Close, body)
					}
					if _, err := br.ReadByte(); err != io.EOF {
						t.Errorf("after the 431: %v, want the connection closed", err)
					}
				})
			})
		}
	}
}

// The rules of RFC 9112 that http.ReadRequest leaves to the server, kept
// as net/http's server keeps them (FuzzServerVsNetHTTP holds the two to
// it), and the rules that close a connection whose framing a server in
// front may have read differently.
func TestRequestRules(t *testing.T) {
	type answer struct {
		status int
		close  bool
		body   string // the handler's echo of what it read
	}
	_, addr := start(t, func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		fmt.Fprintf(w, "%s %s host=%s body=%s trailer=%s", r.Method, r.RequestURI, r.Host, b, r.Trailer.Get("X-T"))
	})
	next := "GET /next HTTP/1.1\r\nHost: test\r\n\r\n"
	for name, tc := range map[string]struct {
		request string
		want    answer
		// next: a request pipelined after it is served.
		next bool
	}{
		"plain": {request: "GET / HTTP/1.1\r\nHost: test\r\n\r\n",
			want: answer{200, false, "GET / host=test body= trailer="}, next: true},
		// TE overrides CL, but the connection closes after: a server in
		// front that framed by CL sees "0\r\n\r\n" as this body's start
		// and what follows as another request.
		"Transfer-Encoding and Content-Length": {request: "POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
			want: answer{200, true, "POST / host=test body=hello trailer="}},
		"Content-Length and Transfer-Encoding": {request: "POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\ncontent-length: 30\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
			want: answer{200, true, "POST / host=test body=hello trailer="}},
		"chunked alone": {request: "POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
			want: answer{200, false, "POST / host=test body=hello trailer="}, next: true},
		"undeclared trailer": {request: "POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: t\r\n\r\n",
			want: answer{200, false, "POST / host=test body=hello trailer=t"}, next: true},
		// A field name with a space: textproto keeps it as another field;
		// a server in front may have read a Transfer-Encoding.
		"space in a field name": {request: "POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding : chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
			want: answer{400, true, ""}},
		"unknown expectation": {request: "POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nExpect: 200-ok\r\n\r\nhello",
			want: answer{417, true, ""}},
		"expectation in other case": {request: "POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nExpect: 100-Continue\r\n\r\nhello",
			want: answer{200, false, "POST / host=test body=hello trailer="}, next: true},
		"absolute form without Host": {request: "GET http://test/x HTTP/1.1\r\n\r\n",
			want: answer{400, true, ""}},
		"absolute form, bad Host": {request: "GET http://test/x HTTP/1.1\r\nHost: a b\r\n\r\n",
			want: answer{400, true, ""}},
		"absolute form, folded Host": {request: "GET http://test/x HTTP/1.1\r\nHost: a\r\n b\r\n\r\n",
			want: answer{400, true, ""}},
		"absolute form": {request: "GET http://test/x HTTP/1.1\r\nHost: other\r\n\r\n",
			want: answer{200, false, "GET http://test/x host=test body= trailer="}, next: true},
		"empty Host": {request: "GET / HTTP/1.1\r\nHost:\r\n\r\n",
			want: answer{200, false, "GET / host= body= trailer="}, next: true},
		"two Hosts": {request: "GET / HTTP/1.1\r\nHost: test\r\nhost: other\r\n\r\n",
			want: answer{400, true, ""}},
		"close among other tokens": {request: "GET / HTTP/1.1\r\nHost: test\r\nConnection: foo close\r\n\r\n",
			want: answer{200, true, "GET / host=test body= trailer="}},
		"control character in the target": {request: "GET /a\tb HTTP/1.1\r\nHost: test\r\n\r\n",
			want: answer{400, true, ""}},
		"stray line ends after a POST": {request: "POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\n{}\r\n",
			want: answer{200, false, "POST / host=test body={} trailer="}, next: true},
	} {
		t.Run(name, func(t *testing.T) {
			c, br := dial(t, addr)
			go io.WriteString(c, tc.request+next)
			resp, body := readResponse(t, br, "GET")
			if resp.StatusCode == http.StatusContinue {
				resp, body = readResponse(t, br, "GET")
			}
			got := answer{resp.StatusCode, resp.Close, body}
			if got.status != http.StatusOK {
				got.body = ""
			}
			if got != tc.want {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
			if !tc.next {
				if _, err := br.ReadByte(); err != io.EOF {
					t.Fatalf("after the response: %v, want the connection closed", err)
				}
				return
			}
			if resp, body := readResponse(t, br, "GET"); resp.StatusCode != http.StatusOK || !strings.HasPrefix(body, "GET /next") {
				t.Fatalf("the pipelined request: %d %q", resp.StatusCode, body)
			}
		})
	}
}

// A head cut short by a client that still reads is answered, as net/http
// answers it; one that never began is not.
func TestHeadCutShort(t *testing.T) {
	_, addr := start(t, func(w http.ResponseWriter, r *http.Request) {})
	for name, tc := range map[string]struct {
		send   string
		answer string
	}{
		"cut short": {"GET / HTTP/1.1\r\nHost: te", "HTTP/1.1 400 Bad Request"},
		"nothing":   {"", ""},
	} {
		c, _ := dial(t, addr)
		io.WriteString(c, tc.send)
		c.(interface{ CloseWrite() error }).CloseWrite()
		got, err := bufio.NewReader(c).ReadString('\n')
		if strings.TrimSpace(got) != tc.answer || err != nil && tc.answer != "" {
			t.Errorf("%s: answer %q (%v), want %q", name, got, err, tc.answer)
		}
	}
}
