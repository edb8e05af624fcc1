package server

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httputil"
	"strconv"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"

	"github.com/capstan-dev/capstan/router/wire"
)

// bufferedBody is how much of a body of undeclared length the response
// holds before its head is written: a body that fits goes out with a
// Content-Length, a longer one (or one the handler flushes) chunked.
const bufferedBody = 2 << 10

// response is the http.ResponseWriter of one request. The connection
// reuses it for the next request, so it must not be used after ServeHTTP
// returns (which the http.ResponseWriter contract already says).
type response struct {
	c      *conn
	req    *http.Request
	header http.Header
	// status is 0 until WriteHeader.
	status int
	// contentLength is the body's declared length, -1 if none.
	contentLength int64
	written       int64
	// headWritten says the head is in the connection's buffer; body holds
	// the first bytes of the body until then.
	headWritten bool
	body        []byte
	chunked     io.WriteCloser // the chunked encoder, nil unless chunked
	closeAfter  bool
}

var (
	_ http.ResponseWriter = (*response)(nil)
	_ http.Flusher        = (*response)(nil)
)

func (w *response) reset(c *conn, req *http.Request) {
	if w.header == nil {
		w.header = make(http.Header, 8)
		w.body = make([]byte, 0, bufferedBody)
	}
	clear(w.header)
	*w = response{c: c, req: req, header: w.header, contentLength: -1, body: w.body[:0],
		closeAfter: !req.ProtoAtLeast(1, 1) || wantsClose(req)}
}

// wantsClose reports whether the client asked to close the connection
// after the response: req.Close, or, as net/http's server also reads it,
// "close" among the space- or comma-separated tokens of the first
// Connection field.
func wantsClose(req *http.Request) bool {
	if req.Close {
		return true
	}
	v := req.Header["Connection"]
	return len(v) > 0 && hasToken(v[0], "close")
}

func (w *response) Header() http.Header { return w.header }

// WriteHeader records the status; the head is written with the first
// bytes that must reach the client. Informational (1xx) statuses are not
// forwarded.
func (w *response) WriteHeader(code int) {
	if code < 100 || code > 999 {
		panic(fmt.Sprintf("invalid WriteHeader code %v", code)) // as net/http
	}
	if w.status != 0 || code < 200 {
		return
	}
	w.status = code
	if cl := w.header.Get("Content-Length"); cl != "" {
		if n, err := strconv.ParseInt(cl, 10, 64); err == nil && n >= 0 {
			w.contentLength = n
		} else {
			delete(w.header, "Content-Length")
		}
	}
}

func (w *response) bodyAllowed() bool {
	return w.status >= 200 && w.status != http.StatusNoContent && w.status != http.StatusNotModified
}

func (w *response) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if !w.bodyAllowed() {
		return 0, http.ErrBodyNotAllowed
	}
	if w.contentLength >= 0 && w.written+int64(len(p)) > w.contentLength {
		return 0, http.ErrContentLength
	}
	w.written += int64(len(p))
	if w.req.Method == http.MethodHead {
		return len(p), nil
	}
	if !w.headWritten {
		if w.contentLength < 0 && len(w.body)+len(p) <= cap(w.body) {
			w.body = append(w.body, p...)
			return len(p), nil
		}
		if err := w.writeHead(); err != nil {
			return 0, err
		}
	}
	return w.writeBody(p)
}

func (w *response) writeBody(p []byte) (int, error) {
	if w.chunked != nil {
		return w.chunked.Write(p)
	}
	return w.c.bw.Write(p)
}

// Flush sends what the handler wrote so far.
func (w *response) Flush() { _ = w.FlushError() }

// FlushError sends what the handler wrote so far; http.ResponseController
// calls it.
func (w *response) FlushError() error {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if !w.headWritten {
		if err := w.writeHead(); err != nil {
			return err
		}
	}
	return w.c.bw.Flush()
}

// finish completes the response after the handler returned.
func (w *response) finish() error {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if !w.headWritten {
		if w.contentLength < 0 && w.bodyAllowed() && (w.req.Method != http.MethodHead || w.written > 0) {
			// The whole body is here: declare its length.
			w.contentLength = w.written
		}
		if err := w.writeHead(); err != nil {
			return err
		}
	}
	if w.chunked != nil {
		// The last chunk, no trailers.
		if err := w.chunked.Close(); err != nil {
			return err
		}
		if _, err := w.c.bw.WriteString("\r\n"); err != nil {
			return err
		}
	}
	if w.contentLength >= 0 && w.written < w.contentLength && w.req.Method != http.MethodHead && w.bodyAllowed() {
		// A short body: only closing tells the client it ended early.
		w.closeAfter = true
	}
	return w.c.bw.Flush()
}

// writeHead writes the status line, the headers and the framing the body
// needs, then whatever body the response held back.
func (w *response) writeHead() error {
	w.headWritten = true
	bw := w.c.bw
	bw.WriteString("HTTP/1.1 ")
	bw.WriteString(strconv.Itoa(w.status))
	bw.WriteByte(' ')
	if text := http.StatusText(w.status); text != "" {
		bw.WriteString(text)
	} else {
		bw.WriteString("status code " + strconv.Itoa(w.status))
	}
	bw.WriteString("\r\n")
	wire.WriteFields(bw, w.header, framing)
	if _, ok := w.header["Date"]; !ok {
		bw.WriteString("Date: ")
		bw.Write(httpDate())
		bw.WriteString("\r\n")
	}
	if w.connectionClose() {
		w.closeAfter = true
	}
	switch {
	case !w.bodyAllowed():
	case w.contentLength >= 0:
		bw.WriteString("Content-Length: ")
		bw.WriteString(strconv.FormatInt(w.contentLength, 10))
		bw.WriteString("\r\n")
	case w.req.Method == http.MethodHead:
	case !w.req.ProtoAtLeast(1, 1):
		// An HTTP/1.0 client knows no chunks: the body ends with the
		// connection. (An HTTP/1.1 one gets chunks even when the
		// connection closes after, so that an aborted body shows.)
		w.closeAfter = true
	default:
		bw.WriteString("Transfer-Encoding: chunked\r\n")
		w.chunked = httputil.NewChunkedWriter(bw)
	}
	if w.closeAfter || !w.c.srv.keepAlives() {
		// Shutting down or draining (SetKeepAlivesEnabled) too.
		w.closeAfter = true
		bw.WriteString("Connection: close\r\n")
	}
	bw.WriteString("\r\n")
	if len(w.body) > 0 {
		body := w.body
		w.body = w.body[:0]
		if _, err := w.writeBody(body); err != nil {
			return err
		}
	}
	return nil
}

// framing reports the fields the server writes itself.
func framing(k string) bool {
	switch k {
	case "Content-Length", "Transfer-Encoding", "Connection", "Keep-Alive":
		return true
	}
	return false
}

// connectionClose reports whether the handler asked to close the
// connection after the response.
func (w *response) connectionClose() bool {
	for _, v := range w.header["Connection"] {
		if httpguts.HeaderValuesContainsToken([]string{v}, "close") {
			return true
		}
	}
	return false
}

// dateCache is the Date header's value for the current second, formatted
// once a second rather than once a response.
var dateCache atomic.Pointer[cachedDate]

type cachedDate struct {
	second int64
	value  []byte
}

func httpDate() []byte {
	now := time.Now()
	if d := dateCache.Load(); d != nil && d.second == now.Unix() {
		return d.value
	}
	d := &cachedDate{second: now.Unix(), value: now.UTC().AppendFormat(nil, http.TimeFormat)}
	dateCache.Store(d)
	return d.value
}
