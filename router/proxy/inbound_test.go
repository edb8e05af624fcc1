package proxy

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
)

func TestRequestID(t *testing.T) {
	for name, tc := range map[string]struct {
		sent string
		kept bool
	}{
		"a client's id":          {"req-123", true},
		"128 bytes":              {strings.Repeat("a", 128), true},
		"too long":               {strings.Repeat("a", 129), false},
		"a space":                {"req 123", false},
		"a control byte":         {"req\x01", false},
		"not ASCII":              {"réq", false},
		"none: the router's own": {"", false},
	} {
		t.Run(name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodPost, "/v1/completions", nil)
			if tc.sent != "" {
				r.Header.Set("X-Request-Id", tc.sent)
			}
			got := requestID(r)
			if tc.kept && got != tc.sent {
				t.Errorf("requestID = %q, want the client's %q", got, tc.sent)
			}
			if !tc.kept && (got == tc.sent || len(got) != 32) {
				t.Errorf("requestID = %q, want a new 32-digit one", got)
			}
		})
	}
}

func TestEchoedIsBounded(t *testing.T) {
	if got := echoed("llama"); got != "llama" {
		t.Errorf("echoed(llama) = %q", got)
	}
	long := strings.Repeat("é", 300) // two bytes each: a cut must not split one
	got := echoed(long)
	if len(got) > maxEchoedLength+len("…(cut)") || !strings.HasSuffix(got, "…(cut)") || !strings.HasPrefix(long, strings.TrimSuffix(got, "…(cut)")) {
		t.Errorf("echoed of %d bytes = %d bytes %q", len(long), len(got), got[len(got)-12:])
	}
}

func TestNormalizePath(t *testing.T) {
	for target, want := range map[string]string{
		"/v1/completions":             "/v1/completions",
		"/v1/../admin":                "/admin",
		"/v1/./completions":           "/v1/completions",
		"/v1/models/..":               "/v1/",
		"/v1/models/.":                "/v1/models/",
		"/../../etc/passwd":           "/etc/passwd",
		"/v1/%2e%2e/admin":            "/admin",
		"/v1//completions":            "/v1//completions",
		"/v1/a..b/c":                  "/v1/a..b/c",
		"/public/..%2Fadmin":          "error",
		"/public/%2fadmin":            "error",
		"/public/..%5Cadmin":          "error",
		"/v1/chat?x=/../y":            "/v1/chat",
		"/v1/completions/../../admin": "/admin",
	} {
		r := &http.Request{Method: http.MethodPost, RequestURI: target}
		u, err := url.ParseRequestURI(target)
		if err != nil {
			t.Fatal(err)
		}
		r.URL = u
		err = normalizePath(r)
		switch {
		case want == "error":
			if err == nil {
				t.Errorf("%s: normalised to %s, want an error", target, r.URL.Path)
			}
		case err != nil:
			t.Errorf("%s: %v", target, err)
		case r.URL.Path != want:
			t.Errorf("%s: path %s, want %s", target, r.URL.Path, want)
		case !strings.HasPrefix(r.RequestURI, want):
			t.Errorf("%s: the request target sent upstream is %s, want %s…", target, r.RequestURI, want)
		}
	}
}

// A path that climbs out of /v1/ never reaches a model server.
func TestDotSegmentsNeverReachAPod(t *testing.T) {
	var got []string
	var mu sync.Mutex
	b := startBackend(t, "llama-0", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got = append(got, r.RequestURI)
		mu.Unlock()
		ok(w, r)
	})
	f := newFixture(t, "llama", []backend{b})
	for target, status := range map[string]int{
		"/v1/../admin":                http.StatusNotFound,
		"/v1/completions/../../admin": http.StatusNotFound,
		"/v1/x/..%2F..%2Fadmin":       http.StatusBadRequest,
		"/v1/./completions":           http.StatusOK,
		"/v1/chat/../completions?k=v": http.StatusOK,
	} {
		resp, data := f.postRaw(target, completion)
		if resp.StatusCode != status {
			t.Errorf("POST %s: %d %s, want %d", target, resp.StatusCode, data, status)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	for _, uri := range got {
		if uri != "/v1/completions" && uri != "/v1/completions?k=v" {
			t.Errorf("the model server got %s", uri)
		}
	}
	if len(got) != 2 {
		t.Errorf("the model server got %d requests (%v), want 2", len(got), got)
	}
}

func TestForwardedFor(t *testing.T) {
	for name, tc := range map[string]struct {
		prior []string
		hops  int
		want  string
	}{
		"no trusted hops: the client's entries go": {[]string{"203.0.113.9"}, 0, "127.0.0.1"},
		"one hop keeps the rightmost entry":        {[]string{"198.51.100.7, 203.0.113.9"}, 1, "203.0.113.9, 127.0.0.1"},
		"two hops across two header lines":         {[]string{"198.51.100.7", "203.0.113.9, 192.0.2.1"}, 2, "203.0.113.9, 192.0.2.1, 127.0.0.1"},
		"more hops trusted than entries":           {[]string{"203.0.113.9"}, 3, "203.0.113.9, 127.0.0.1"},
		"none sent":                                {nil, 2, "127.0.0.1"},
	} {
		t.Run(name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodPost, "/v1/completions", nil)
			r.RemoteAddr = "127.0.0.1:5555"
			r.Header["X-Forwarded-For"] = tc.prior
			if got, ok := forwardedFor(r, tc.hops); !ok || got != tc.want {
				t.Errorf("forwardedFor = %q, %v; want %q", got, ok, tc.want)
			}
		})
	}
}

// Bodies beyond the budget are answered 429 before they are read, while a
// small request still fits.
func TestBodyBudget(t *testing.T) {
	release := make(chan struct{})
	b := startBackend(t, "llama-0", func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		<-release
		ok(w, r)
	})
	const size = 4 << 10
	f := newFixture(t, "llama", []backend{b}, func(o *Options) {
		o.MaxBodyBytes = 16 << 10
		o.MaxInFlightBodyBytes = 3*size + 512 // three large bodies and a small one
	})
	big := `{"model":"llama","prompt":"` + strings.Repeat("x", size-40) + `"}`
	var wg sync.WaitGroup
	statuses := make(chan int, 6)
	for range 3 {
		wg.Go(func() { statuses <- postStatus(f.url+"/v1/completions", big) })
	}
	waitFor(t, "three bodies held", func() bool { return b.hits.Load() == 3 })
	resp, data := f.post("/v1/completions", big)
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") == "" || !strings.Contains(data, codeRouterOverloaded) {
		t.Errorf("a fourth large body: %d %s (Retry-After %q), want 429 %s", resp.StatusCode, data, resp.Header.Get("Retry-After"), codeRouterOverloaded)
	}
	// A small request fits in what is left.
	wg.Go(func() { statuses <- postStatus(f.url+"/v1/completions", completion) })
	waitFor(t, "the small request to arrive", func() bool { return b.hits.Load() == 4 })
	close(release)
	wg.Wait()
	close(statuses)
	for s := range statuses {
		if s != http.StatusOK {
			t.Errorf("an admitted request got %d", s)
		}
	}
	if used := f.handler.budget.used.Load(); used != 0 {
		t.Errorf("%d bytes of the budget are still taken after every request ended", used)
	}
	// A chunked body takes the budget as it arrives.
	req, _ := http.NewRequest(http.MethodPost, f.url+"/v1/completions", io.MultiReader(strings.NewReader(big), strings.NewReader(big[:0])))
	req.ContentLength = -1
	resp2, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp2.Body.Close()
	if resp2.StatusCode != http.StatusOK {
		t.Errorf("a chunked body within the budget: %d", resp2.StatusCode)
	}
	if used := f.handler.budget.used.Load(); used != 0 {
		t.Errorf("%d bytes of the budget still taken after a chunked body", used)
	}
}

// postRaw sends a request target as it is (an http.Client would keep it, but
// this states it), and reads the answer.
func (f *fixture) postRaw(target, body string) (*http.Response, string) {
	f.t.Helper()
	c, err := net.Dial("tcp", strings.TrimPrefix(f.url, "http://"))
	if err != nil {
		f.t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", target, len(body), body)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		f.t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return resp, string(data)
}

// postStatus posts and returns the status, or 0 when the exchange failed; it
// may run outside the test's goroutine.
func postStatus(url, body string) int {
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode
}
