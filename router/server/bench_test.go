package server

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"strconv"
	"testing"
)

// BenchmarkServe measures one kept-alive request and its response through
// the server alone, over loopback: a typical OpenAI-style POST head (a
// dozen fields) and small body, a handler that reads the body and writes a
// small answer.
func BenchmarkServe(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"id":"cmpl-1","choices":[{"text":"ok"}]}`)
	})}
	go srv.Serve(ln)
	defer srv.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	body := `{"model":"llama","prompt":"Say hello","max_tokens":16}`
	req := "POST /v1/completions HTTP/1.1\r\nHost: router.example:8080\r\nUser-Agent: OpenAI/Python 1.54.0\r\n" +
		"Accept: application/json\r\nAccept-Encoding: gzip, deflate\r\nContent-Type: application/json\r\n" +
		"Authorization: Bearer sk-0123456789abcdef0123456789abcdef\r\nX-Stainless-Lang: python\r\n" +
		"X-Stainless-Package-Version: 1.54.0\r\nX-Stainless-Runtime: CPython\r\nX-Request-Id: 5f0c2e4e-8c1b-4b55-9d7c-1c1f0e6c2a10\r\n" +
		"Connection: keep-alive\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body
	br := bufio.NewReader(c)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := io.WriteString(c, req); err != nil {
			b.Fatal(err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != http.StatusOK {
			b.Fatalf("status %d", resp.StatusCode)
		}
	}
}

// BenchmarkHeadScan measures the scan of a typical head that came in one
// read, what the server adds to http.ReadRequest per request.
func BenchmarkHeadScan(b *testing.B) {
	head := []byte("POST /v1/completions HTTP/1.1\r\nHost: router.example:8080\r\nUser-Agent: OpenAI/Python 1.54.0\r\n" +
		"Accept: application/json\r\nAccept-Encoding: gzip, deflate\r\nContent-Type: application/json\r\n" +
		"Authorization: Bearer sk-0123456789abcdef0123456789abcdef\r\nX-Stainless-Lang: python\r\n" +
		"X-Stainless-Package-Version: 1.54.0\r\nX-Stainless-Runtime: CPython\r\nX-Request-Id: 5f0c2e4e-8c1b-4b55-9d7c-1c1f0e6c2a10\r\n" +
		"Connection: keep-alive\r\nContent-Length: 55\r\n\r\n")
	var h headScan
	b.ReportAllocs()
	for b.Loop() {
		h.start(head)
	}
	if !h.ended || h.fields() != 12 || h.hosts != 1 || h.contentLengths != 1 {
		b.Fatalf("scan %+v", h)
	}
}
