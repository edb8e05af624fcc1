// Package rawhttp is a test server that answers each HTTP/1.1 request by
// writing bytes of the test's choosing to the connection: a model server
// that breaks HTTP on purpose, for the tests of the router's upstream pool
// and of the metrics adapter's scraper.
package rawhttp

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
)

// Server is a running raw server on a loopback address.
type Server struct {
	// Addr is the server's host:port.
	Addr string
	// Opened counts the connections accepted, Closed those that ended
	// (the client closed, or Serve said so).
	Opened, Closed atomic.Int64
}

// Serve answers one request (its body already read) on c, the n-th on the
// server counting from 1; false closes the connection.
type Serve func(c net.Conn, req *http.Request, n int64) (keep bool)

// Start starts a server that answers with serve until the test ends. Every
// connection is kept until the client closes it or serve says no, so that a
// client that wrongly reuses one is seen.
func Start(t testing.TB, serve Serve) *Server {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{Addr: l.Addr().String()}
	var (
		requests atomic.Int64
		wg       sync.WaitGroup
		mu       sync.Mutex
		conns    = map[net.Conn]bool{}
	)
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s.Opened.Add(1)
			mu.Lock()
			conns[c] = true
			mu.Unlock()
			wg.Go(func() {
				defer func() {
					c.Close()
					s.Closed.Add(1)
				}()
				br := bufio.NewReader(c)
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					_, _ = io.Copy(io.Discard, req.Body)
					if !serve(c, req, requests.Add(1)) {
						return
					}
				}
			})
		}
	})
	return s
}
