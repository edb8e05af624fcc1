//go:build unix

package server

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// 2,000 clients that connect and trickle a head, a byte a second, cost
// the server little memory each (a connection allocates a 4 KiB read
// buffer and a goroutine until it has a request to answer) and do not
// slow other clients down: 200 requests on fresh connections made
// meanwhile are answered as fast as ever. (ReadHeaderTimeout ends each
// trickler 30s after it connected; the test stops before.)
func TestSlowloris(t *testing.T) {
	if testing.Short() {
		t.Skip("opens 2,000 connections for 5s")
	}
	const (
		trickling = 2000
		requests  = 200
		duration  = 5 * time.Second
	)
	raiseOpenFiles(t, 2*trickling+requests+200)
	srv, addr := start(t, func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, "ok")
	})
	get := func() (time.Duration, error) {
		start := time.Now()
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return 0, err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, "POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
		b, err := io.ReadAll(c)
		if err != nil || !strings.HasPrefix(string(b), "HTTP/1.1 200 ") {
			return 0, fmt.Errorf("%q, %v", b, err)
		}
		return time.Since(start), nil
	}
	if _, err := get(); err != nil { // everything made once is made
		t.Fatal(err)
	}

	before := memInUse()
	conns := make([]net.Conn, 0, trickling)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range trickling {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatalf("dialing trickler %d: %v", len(conns), err)
		}
		conns = append(conns, c)
	}
	// One goroutine trickles for all: a byte a second each, of a head
	// that never ends.
	head := "GET / HTTP/1.1\r\nHost: test\r\nX-Slow: " + strings.Repeat("s", 100)
	stop := make(chan struct{})
	trickled := make(chan struct{})
	go func() {
		defer close(trickled)
		for i := 0; ; i++ {
			for _, c := range conns {
				c.Write([]byte{head[i%len(head)]})
			}
			select {
			case <-stop:
				return
			case <-time.After(time.Second):
			}
		}
	}()
	defer func() { close(stop); <-trickled }()

	latencies := make([]time.Duration, 0, requests)
	tick := time.NewTicker(duration / requests)
	defer tick.Stop()
	for range requests {
		<-tick.C
		d, err := get()
		if err != nil {
			t.Fatalf("a request among the tricklers: %v", err)
		}
		latencies = append(latencies, d)
	}
	if n := srv.connCount(); n < trickling {
		t.Fatalf("the server has %d connections, want the %d tricklers'", n, trickling)
	}
	perConn := (memInUse() - before) / trickling
	slices.Sort(latencies)
	p50, p99 := latencies[requests/2], latencies[requests*99/100-1]
	t.Logf("%d trickling connections: %d bytes of heap and stacks each (both ends); %d requests meanwhile: p50 %v, p99 %v, max %v",
		trickling, perConn, requests, p50, p99, latencies[requests-1])

	maxPerConn, maxP99 := int64(32<<10), 50*time.Millisecond
	if raceEnabled {
		maxPerConn, maxP99 = 64<<10, 250*time.Millisecond
	}
	if perConn > maxPerConn {
		t.Errorf("a trickling connection costs %d bytes, want at most %d", perConn, maxPerConn)
	}
	if p99 > maxP99 {
		t.Errorf("p99 latency %v among the tricklers, want at most %v", p99, maxP99)
	}
}

// memInUse is the heap and stack memory in use after a collection.
func memInUse() int64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapInuse + m.StackInuse)
}

// raiseOpenFiles makes the soft limit on open files at least n, as far as
// the hard limit allows, for the test.
func raiseOpenFiles(t *testing.T, n uint64) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur >= n {
		return
	}
	if lim.Max < n {
		t.Skipf("the open file limit is %d, the test needs %d", lim.Max, n)
	}
	old := lim
	lim.Cur = n
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Skipf("raising the open file limit to %d: %v", n, err)
	}
	t.Cleanup(func() { syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })
}
