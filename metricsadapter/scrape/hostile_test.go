package scrape

// Model-server pods are tenants' code: these tests play a metrics endpoint
// that breaks HTTP on purpose and check that the scraper's own transport
// refuses what it must, in bounded memory, and never reads one exchange's
// bytes as another's.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/test/rawhttp"
)

// rawEngine answers each scrape by writing bytes of its own choosing.
type rawEngine struct {
	*rawhttp.Server
	url string
}

// startRawEngine serves every request on a connection with serve (n counts
// the requests on the server, from 1) until serve returns false or the
// client closes the connection.
func startRawEngine(t *testing.T, serve func(c net.Conn, n int64) (keep bool)) *rawEngine {
	t.Helper()
	s := rawhttp.Start(t, func(c net.Conn, _ *http.Request, n int64) bool { return serve(c, n) })
	return &rawEngine{Server: s, url: "http://" + s.Addr + "/metrics"}
}

const vllmPage = "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 3\n"

func page(body string, extra ...string) string {
	return fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s", textType, len(body), strings.Join(extra, ""), body)
}

// get makes one exchange through tr and reads the page.
func get(t *testing.T, tr *keepAlive, url string) (*http.Response, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp, string(b), err
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func idleCount(tr *keepAlive) int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return len(tr.idle)
}

func TestTransportRefusesHostileHeads(t *testing.T) {
	hints := func(n int) string { return strings.Repeat("HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n", n) }
	// pad is a field that makes the page's head n bytes long.
	pad := func(n int) string {
		return "X: " + strings.Repeat("a", n-(len(page(vllmPage, "X: \r\n"))-len(vllmPage))) + "\r\n"
	}
	for _, tc := range []struct {
		name    string
		before  string // before the page
		field   string // in the page's head
		endless bool   // a field value that never ends, instead of the page
		want    error  // nil: the page
	}{
		{name: "five interim responses", before: hints(5)},
		{name: "a head of 64 KiB", field: pad(maxHeadBytes)},
		{name: "a byte more", field: pad(maxHeadBytes + 1), want: errHeadTooLarge},
		{name: "a head without end", before: "HTTP/1.1 200 OK\r\nX: ", endless: true, want: errHeadTooLarge},
		{name: "a head over 64 KiB", before: "HTTP/1.1 200 OK\r\nX: " + strings.Repeat("a", maxHeadBytes) + "\r\n\r\n", want: errHeadTooLarge},
		{name: "interim heads count", before: strings.Repeat("HTTP/1.1 103 Early Hints\r\nX: "+strings.Repeat("a", 20<<10)+"\r\n\r\n", 4), want: errHeadTooLarge},
		{name: "six interim responses", before: hints(6), want: errTooManyInterim},
		{name: "an interim flood", before: hints(10000), want: errTooManyInterim},
		{name: "101 Switching Protocols", before: "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", want: errSwitchingProtocols},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := startRawEngine(t, func(c net.Conn, _ int64) bool {
				io.WriteString(c, tc.before)
				if tc.endless {
					chunk := bytes.Repeat([]byte("a"), 4096)
					for {
						if _, err := c.Write(chunk); err != nil {
							return false
						}
					}
				}
				io.WriteString(c, page(vllmPage, tc.field))
				return true
			})
			tr := newKeepAlive()
			resp, body, err := get(t, tr, e.url)
			if tc.want == nil {
				if err != nil || resp.StatusCode != 200 || body != vllmPage {
					t.Fatalf("got %q, %v; want the page", body, err)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			// Never reused: the connection is closed.
			waitUntil(t, "the connection to close", func() bool { return e.Closed.Load() == 1 })
			if n := idleCount(tr); n != 0 {
				t.Errorf("%d idle connections kept", n)
			}
		})
	}
}

// Bytes the server sends beyond a response, with it or later, while the
// connection is idle, close it: they are never read as the next page.
func TestTransportDropsConnectionsWithStrayBytes(t *testing.T) {
	stray := page("stray 1\n")
	for _, tc := range []struct {
		name  string
		first string // the answer to the first request
		later bool   // then a stray response while idle
	}{
		{name: "more than Content-Length", first: page(vllmPage) + stray},
		{name: "a body on 204", first: "HTTP/1.1 204 No Content\r\n\r\n" + stray},
		{name: "a body on 304", first: "HTTP/1.1 304 Not Modified\r\nContent-Length: 8\r\n\r\n" + stray},
		{name: "a stray response while idle", first: page(vllmPage), later: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sent := make(chan struct{})
			e := startRawEngine(t, func(c net.Conn, n int64) bool {
				if n > 1 {
					io.WriteString(c, page(vllmPage))
					return true
				}
				io.WriteString(c, tc.first)
				if tc.later {
					time.Sleep(10 * time.Millisecond)
					io.WriteString(c, stray)
					close(sent)
				}
				return true
			})
			tr := newKeepAlive()
			if _, _, err := get(t, tr, e.url); err != nil {
				t.Fatal(err)
			}
			if tc.later {
				<-sent
				// Wait until the bytes are on the client's socket.
				time.Sleep(20 * time.Millisecond)
			}
			_, body, err := get(t, tr, e.url)
			if err != nil || body != vllmPage {
				t.Fatalf("the second scrape got %q, %v; want its own page", body, err)
			}
			if n := e.Opened.Load(); n != 2 {
				t.Errorf("%d connections, want the one with stray bytes replaced", n)
			}
		})
	}
}

// A page of a million series is refused by MaxPageBytes: the scraper reads
// at most MaxPageBytes+1 of it, in memory bounded by that, not by the page.
func TestMillionSeriesPageIsRefusedInBoundedMemory(t *testing.T) {
	const series = 1_000_000
	line := func(i int) string {
		return fmt.Sprintf("vllm:num_requests_waiting{model_name=\"m\",replica=\"%07d\"} 1\n", i)
	}
	size := len("# TYPE vllm:num_requests_waiting gauge\n") + series*len(line(0))
	var written atomic.Int64
	e := startRawEngine(t, func(c net.Conn, _ int64) bool {
		w := bufio.NewWriterSize(c, 64<<10)
		fmt.Fprintf(w, "HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n", textType, size)
		w.WriteString("# TYPE vllm:num_requests_waiting gauge\n")
		// Each line made in place: the server allocates nothing per
		// line, so what is allocated is the scraper's.
		b := []byte(line(0))
		digits := bytes.IndexByte(b, '0')
		for i := range series {
			for j, v := 6, i; j >= 0; j, v = j-1, v/10 {
				b[digits+j] = byte('0' + v%10)
			}
			n, err := w.Write(b)
			written.Add(int64(n))
			if err != nil {
				return false
			}
		}
		w.Flush()
		return true
	})
	opts := fastOptions()
	opts.MaxPageBytes = 1 << 20
	opts.Timeout = 5 * time.Second
	opts.Interval = 10 * time.Second
	s, _ := observedScraper(t, opts)
	w := &worker{values: s.opts.Catalogue.NewValues()}
	target := Target{Key: key("p"), URL: e.url, Engine: modelserver.VLLM}
	st := &state{target: target, req: s.request(target)}
	// A worker keeps its page buffer from scrape to scrape: grown to the
	// cap once, as after the first large page.
	w.body.Grow(int(opts.MaxPageBytes) + 1 + bytes.MinRead)

	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, result, err := s.fetch(context.Background(), w, st, s.filters[modelserver.VLLM].all)
	runtime.ReadMemStats(&after)
	if result != TooLarge {
		t.Fatalf("result %v (%v), want %v", result, err, TooLarge)
	}
	if n := int64(w.body.Len()); n != opts.MaxPageBytes+1 {
		t.Errorf("read %d bytes of the page, want MaxPageBytes+1 = %d", n, opts.MaxPageBytes+1)
	}
	// Nothing grows with the page's 62 MB: besides the worker's page
	// buffer, refusing it takes a connection's few buffers.
	const bound = 1 << 20
	if allocated := after.TotalAlloc - before.TotalAlloc; allocated > bound {
		t.Errorf("%d bytes allocated refusing a %d-byte page, want at most %d", allocated, size, bound)
	}
	if grew := int64(after.HeapAlloc) - int64(before.HeapAlloc); grew > bound {
		t.Errorf("the heap grew by %d bytes, want at most %d", grew, bound)
	}
	t.Logf("%d bytes allocated, the heap grew by %d; the server wrote %d of the %d-byte page", after.TotalAlloc-before.TotalAlloc, int64(after.HeapAlloc)-int64(before.HeapAlloc), written.Load(), size)
}

// servePage answers every request with the same bytes, written as they are:
// the server allocates nothing per scrape, so what is allocated is the
// scraper's.
func servePage(t *testing.T, body []byte) *rawEngine {
	head := []byte(fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n", textType, len(body)))
	return startRawEngine(t, func(c net.Conn, _ int64) bool {
		if _, err := c.Write(head); err != nil {
			return false
		}
		_, err := c.Write(body)
		return err == nil
	})
}

// A page within MaxPageBytes whose series exceed a cap fails the scrape with
// the cap's reason, having cost memory bounded by the cap, not by the page:
// the lines over it never reach expfmt. A family read only for its newest
// series (vLLM's lora_requests_info, which grows by a series per state it
// ever reported) is no flood: the page is read, at the cost of one series.
func TestSeriesAndBucketFloodsAreRefusedInBoundedMemory(t *testing.T) {
	loraInfo := func() []byte {
		// 20,000 series of lora_requests_info: 2.0 MB.
		var b bytes.Buffer
		b.WriteString(vllmPage + "# TYPE vllm:lora_requests_info gauge\n")
		for i := range 20_000 {
			fmt.Fprintf(&b, "vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"a%05d\",waiting_lora_adapters=\"\"} %d\n", i, 1_700_000_000+i)
		}
		return b.Bytes()
	}
	series := func() []byte {
		// 50,000 tiny series of one gauge: 2.3 MB.
		var b bytes.Buffer
		b.WriteString("# TYPE vllm:num_requests_waiting gauge\n")
		for i := range 50_000 {
			fmt.Fprintf(&b, "vllm:num_requests_waiting{r=\"%05d\"} 1\n", i)
		}
		return b.Bytes()
	}
	buckets := func() []byte {
		// One histogram series of 10,000 buckets: 0.6 MB.
		var b bytes.Buffer
		b.WriteString(vllmPage + "# TYPE vllm:time_to_first_token_seconds histogram\n")
		for i := range 10_000 {
			fmt.Fprintf(&b, "vllm:time_to_first_token_seconds_bucket{model_name=\"m\",le=\"%d\"} %d\n", i+1, i)
		}
		b.WriteString("vllm:time_to_first_token_seconds_bucket{model_name=\"m\",le=\"+Inf\"} 10000\n")
		b.WriteString("vllm:time_to_first_token_seconds_sum{model_name=\"m\"} 1\nvllm:time_to_first_token_seconds_count{model_name=\"m\"} 10000\n")
		return b.Bytes()
	}
	for _, tc := range []struct {
		name string
		page []byte
		want Result
	}{
		{"50,000 series", series(), TooManySeries},
		{"10,000 buckets", buckets(), TooManyBuckets},
		{"20,000 lora_requests_info series", loraInfo(), Success},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := servePage(t, tc.page)
			opts := fastOptions()
			opts.Timeout = 5 * time.Second
			opts.Interval = 10 * time.Second
			s, _ := observedScraper(t, opts)
			if int64(len(tc.page)) > s.opts.MaxPageBytes {
				t.Fatalf("the %d-byte page exceeds MaxPageBytes (%d)", len(tc.page), s.opts.MaxPageBytes)
			}
			w := s.newWorker()
			target := Target{Key: key("p"), URL: e.url, Engine: modelserver.VLLM}
			st := &state{target: target, req: s.request(target)}
			// The page buffer as a worker keeps it from a page this size.
			w.body.Grow(len(tc.page) + bytes.MinRead)

			runtime.GC()
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			_, result, err := s.fetch(context.Background(), w, st, s.filters[modelserver.VLLM].all)
			runtime.ReadMemStats(&after)
			if result != tc.want {
				t.Errorf("result %v (%v), want %v", result, err, tc.want)
			}
			if id, _ := s.opts.Catalogue.ID(catalogue.LoRAAdapterRunningPods); tc.want == Success &&
				(!w.values.Has[id] || !slices.Equal(w.values.Adapters[id], []string{"a19999"})) {
				t.Errorf("running adapters %v, want the newest series' [a19999]", w.values.Adapters[id])
			}
			t.Logf("%v: %v", result, err)
			// Parsing the whole page would take tens of MB.
			const bound = 2 << 20
			if allocated := after.TotalAlloc - before.TotalAlloc; allocated > bound {
				t.Errorf("%d bytes allocated refusing the %d-byte page, want at most %d", allocated, len(tc.page), bound)
			}
			if grew := int64(after.HeapAlloc) - int64(before.HeapAlloc); grew > bound {
				t.Errorf("the heap grew by %d bytes, want at most %d", grew, bound)
			}
			t.Logf("%d bytes allocated, the heap grew by %d", after.TotalAlloc-before.TotalAlloc, int64(after.HeapAlloc)-int64(before.HeapAlloc))
		})
	}
}

// A worker's page buffer grown for an unusually large page is dropped after
// it, not kept for as long as the worker lives.
func TestLargePageBufferIsDropped(t *testing.T) {
	large := []byte(strings.Repeat("# padding\n", 200_000) + vllmPage) // 2 MB, within MaxPageBytes
	e := servePage(t, large)
	// Reading and parsing 2 MB under -race on a loaded machine can take
	// longer than fastOptions' timeout.
	opts := fastOptions()
	opts.Timeout = 5 * time.Second
	opts.Interval = 10 * time.Second
	s, rec := observedScraper(t, opts)
	w := s.newWorker()
	target := Target{Key: key("p"), URL: e.url, Engine: modelserver.VLLM}
	st := &state{target: target, req: s.request(target)}
	s.targets[target.Key] = st
	s.scrape(context.Background(), w, st)
	if rec.count(target.Key) != 1 {
		t.Fatalf("the large page was not observed: %d failures", st.failing.Load())
	}
	if c := w.body.Cap(); c > keepPageBytes {
		t.Errorf("after a %d-byte page the worker keeps a %d-byte buffer, want at most %d", len(large), c, keepPageBytes)
	}
	// A page of the usual size is kept, to be reused.
	small := servePage(t, []byte(vllmPage))
	target = Target{Key: key("q"), URL: small.url, Engine: modelserver.VLLM}
	st = &state{target: target, req: s.request(target)}
	s.targets[target.Key] = st
	s.scrape(context.Background(), w, st)
	if rec.count(target.Key) != 1 || w.body.Cap() == 0 {
		t.Errorf("the small page: observed %d times, buffer of %d bytes kept", rec.count(target.Key), w.body.Cap())
	}
}
