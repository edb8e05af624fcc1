package proxy

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"unicode/utf8"
)

// What the router takes from a client is bounded and checked here, before
// anything is routed or logged: the request id it may send, the path, the
// X-Forwarded-For chain, and the memory its body may take.

// maxRequestIDLength bounds a client's X-Request-Id; a longer or
// non-printable one is replaced by the router's own.
const maxRequestIDLength = 128

// requestID is the client's X-Request-Id when it is short printable ASCII,
// else a new random one: the id is logged and echoed, so a client may not
// make it arbitrary.
func requestID(r *http.Request) string {
	id := r.Header.Get("X-Request-Id")
	if id == "" || len(id) > maxRequestIDLength {
		return newRequestID()
	}
	for i := 0; i < len(id); i++ {
		if id[i] <= ' ' || id[i] >= 0x7f {
			return newRequestID()
		}
	}
	return id
}

// maxEchoedLength bounds what of a client's own strings (a model name) goes
// into a log line or an error message.
const maxEchoedLength = 256

// echoed returns s cut to maxEchoedLength bytes, at a rune boundary, marked
// when cut.
func echoed(s string) string {
	if len(s) <= maxEchoedLength {
		return s
	}
	cut := maxEchoedLength
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…(cut)"
}

// errEncodedSeparator is a path with an encoded "/" or "\" or a literal
// "\": servers and proxies split such paths differently, which is how a
// request reaches a path its route did not allow.
var errEncodedSeparator = errors.New(`the path has an encoded "/" or "\" (%2F, %5C) or a "\"; send them unencoded or not at all`)

// normalizePath removes dot segments from the request's path (RFC 3986
// section 5.2.4) and rejects encoded separators, so that matching, routing
// and the model server all see the same path: "/v1/../admin" becomes
// "/admin" before any route sees it, and the normalised path is what goes
// upstream.
func normalizePath(r *http.Request) error {
	if strings.ContainsRune(r.URL.Path, '\\') {
		return errEncodedSeparator
	}
	if raw := r.URL.RawPath; raw != "" {
		lower := strings.ToLower(raw)
		if strings.Contains(lower, "%2f") || strings.Contains(lower, "%5c") {
			return errEncodedSeparator
		}
	}
	clean := removeDotSegments(r.URL.Path)
	if clean == r.URL.Path {
		return nil
	}
	r.URL.Path, r.URL.RawPath = clean, ""
	r.RequestURI = r.URL.RequestURI()
	return nil
}

// removeDotSegments is RFC 3986's algorithm on an absolute path: "." and
// ".." segments go, ".." taking the segment before it (never above the
// root); a trailing dot segment leaves a trailing "/". Other segments,
// empty ones included, are kept as they are.
func removeDotSegments(p string) string {
	if !strings.Contains(p, ".") {
		return p // the common case: nothing to do, no allocation
	}
	in := strings.Split(p, "/")
	out := make([]string, 0, len(in))
	for i, seg := range in {
		last := i == len(in)-1
		switch seg {
		case ".":
			if last {
				out = append(out, "")
			}
		case "..":
			if len(out) > 1 {
				out = out[:len(out)-1]
			}
			if last {
				out = append(out, "")
			}
		default:
			out = append(out, seg)
		}
	}
	clean := strings.Join(out, "/")
	if !strings.HasPrefix(clean, "/") {
		clean = "/" + clean
	}
	return clean
}

// forwardedFor is the X-Forwarded-For sent upstream: the entries the last
// trustedHops proxies in front of the router appended (the rightmost ones),
// then the address the request came from. Entries further left were written
// by the client or an untrusted proxy and are dropped: a model server that
// logs or limits by the first address must not be lied to.
func forwardedFor(in *http.Request, trustedHops int) (string, bool) {
	ip, _, err := net.SplitHostPort(in.RemoteAddr)
	if err != nil {
		return "", false
	}
	prior := in.Header["X-Forwarded-For"]
	if trustedHops == 0 || len(prior) == 0 {
		return ip, true
	}
	var entries []string
	for _, v := range prior {
		for f := range strings.SplitSeq(v, ",") {
			if f = strings.TrimSpace(f); f != "" {
				entries = append(entries, f)
			}
		}
	}
	if len(entries) > trustedHops {
		entries = entries[len(entries)-trustedHops:]
	}
	return strings.Join(append(entries, ip), ", "), true
}

// bodyBudget bounds the bytes of request bodies held at once, so that a
// flood of large bodies is answered 429 instead of costing memory. A body of
// known length takes its length before a byte of it is read; one of unknown
// length takes the budget in steps as it arrives.
type bodyBudget struct {
	max  int64 // 0: unbounded
	used atomic.Int64
}

// bodyStep is the granularity in which a body of unknown length takes the
// budget.
const bodyStep = 4 << 10

func (b *bodyBudget) take(n int64) bool {
	if b.max <= 0 {
		return true
	}
	for {
		u := b.used.Load()
		if u+n > b.max {
			return false
		}
		if b.used.CompareAndSwap(u, u+n) {
			return true
		}
	}
}

func (b *bodyBudget) give(n int64) {
	if b.max > 0 && n > 0 {
		b.used.Add(-n)
	}
}

// errBodyBudget is returned by a budgeted body read when the budget is spent.
var errBodyBudget = errors.New("the router's budget for request bodies in flight is spent")

// budgetedReader takes the budget for a body of unknown length as it is
// read.
type budgetedReader struct {
	r        io.Reader
	budget   *bodyBudget
	taken    int64
	consumed int64
}

func (br *budgetedReader) Read(p []byte) (int, error) {
	n, err := br.r.Read(p)
	br.consumed += int64(n)
	if need := br.consumed - br.taken; need > 0 {
		need = (need + bodyStep - 1) / bodyStep * bodyStep
		if !br.budget.take(need) {
			return n, errBodyBudget
		}
		br.taken += need
	}
	return n, err
}

// overloaded answers a request whose body the budget cannot hold, then reads
// the rest of the body into nothing (at most --max-body-size, within the
// server's read deadline), as nginx's lingering close does: a client still
// sending its body would otherwise see the connection reset and lose the
// answer, and it costs no memory.
func (h *Handler) overloaded(w http.ResponseWriter, r *http.Request, x *exchange) {
	x.status = http.StatusTooManyRequests
	writeError(w, x.status, rateLimit, codeRouterOverloaded, fmt.Sprintf(
		"the router is holding its limit of %d bytes of request bodies; retry later or send a smaller body", h.budget.max), h.opts.RetryAfter)
	if err := http.NewResponseController(w).Flush(); err != nil {
		return
	}
	_, _ = io.CopyN(io.Discard, r.Body, h.opts.MaxBodyBytes)
}
