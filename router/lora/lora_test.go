package lora

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestParse(t *testing.T) {
	for name, c := range map[string]struct {
		body string
		want []string
	}{
		"vLLM's list: the base model has no parent": {
			`{"object":"list","data":[{"id":"llama","parent":null},{"id":"sql","parent":"llama"},{"id":"chat","root":"/a","parent":"llama"}]}`,
			[]string{"chat", "sql"}},
		"no adapters":     {`{"data":[{"id":"llama"}]}`, nil},
		"an empty parent": {`{"data":[{"id":"x","parent":""}]}`, nil},
		"duplicates once": {`{"data":[{"id":"sql","parent":"llama"},{"id":"sql","parent":"llama"}]}`, []string{"sql"}},
		"insane names skipped": {`{"data":[{"id":"a b","parent":"l"},{"id":"","parent":"l"},{"id":"x\u0000","parent":"l"},{"id":"` + strings.Repeat("n", MaxNameBytes+1) + `","parent":"l"},{"id":"ok","parent":"l"}]}`,
			[]string{"ok"}},
	} {
		got, err := Parse([]byte(c.body))
		if err != nil || !slices.Equal(got, c.want) {
			t.Errorf("%s: %v, %v; want %v", name, got, err, c.want)
		}
	}
	if _, err := Parse([]byte(`<html>`)); err == nil {
		t.Error("a page that is not JSON parsed")
	}
	var b strings.Builder
	b.WriteString(`{"data":[`)
	for i := range MaxAdapters + 10 {
		fmt.Fprintf(&b, `{"id":"a%03d","parent":"l"},`, i)
	}
	b.WriteString(`{"id":"last","parent":"l"}]}`)
	if got, _ := Parse([]byte(b.String())); len(got) != MaxAdapters {
		t.Errorf("%d adapters taken, want at most %d", len(got), MaxAdapters)
	}
}

// engines answers GET /v1/models for each address as its entry says: a
// list of adapters, or a status or an error.
type engines struct {
	mu      sync.Mutex
	answers map[string]func() (*http.Response, error)
}

func (e *engines) set(addr string, answer func() (*http.Response, error)) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.answers[addr] = answer
}

func (e *engines) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.URL.Path != "/v1/models" || r.Method != http.MethodGet {
		return nil, fmt.Errorf("unexpected %s %s", r.Method, r.URL)
	}
	e.mu.Lock()
	answer := e.answers[r.URL.Host]
	e.mu.Unlock()
	return answer()
}

func listing(adapters ...string) func() (*http.Response, error) {
	var data []string
	for _, a := range adapters {
		data = append(data, fmt.Sprintf(`{"id":%q,"parent":"llama"}`, a))
	}
	return answer(http.StatusOK, `{"data":[{"id":"llama"}`+strings.Join(append([]string{""}, data...), ",")+`]}`)
}

func answer(status int, body string) func() (*http.Response, error) {
	return func() (*http.Response, error) {
		return &http.Response{StatusCode: status, Body: io.NopCloser(strings.NewReader(body))}, nil
	}
}

func refused() (*http.Response, error) { return nil, errors.New("connection refused") }

// reports records what the Poller reports.
type reports struct {
	mu  sync.Mutex
	got []string
}

func (r *reports) AdaptersChanged(addr string, adapters []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.got = append(r.got, addr+"="+strings.Join(adapters, ","))
}

func (r *reports) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	got := r.got
	r.got = nil
	slices.Sort(got)
	return got
}

// A pass reports only the endpoints whose adapters changed; an endpoint
// without a model list has none; one that stops answering keeps its report
// for staleAfter-1 passes and loses it on the next; one that is gone is
// reported with none; and a list beyond MaxBodyBytes is refused.
func TestPollerReportsChanges(t *testing.T) {
	ctx := context.Background()
	e := &engines{answers: map[string]func() (*http.Response, error){}}
	addrs := []string{"a:8000", "b:8000", "c:8000"}
	r := &reports{}
	p := New(Options{Interval: time.Second, Timeout: time.Second, Endpoints: func() []string { return addrs }, Reporter: r, Transport: e})

	e.set("a:8000", listing("sql", "chat"))
	e.set("b:8000", listing())
	e.set("c:8000", answer(http.StatusNotFound, "no such path"))
	p.Sync(ctx)
	if got := r.take(); !slices.Equal(got, []string{"a:8000=chat,sql"}) {
		t.Fatalf("first pass reported %v", got)
	}
	p.Sync(ctx)
	if got := r.take(); len(got) != 0 {
		t.Fatalf("a pass without changes reported %v", got)
	}

	e.set("b:8000", listing("sql"))
	e.set("a:8000", refused)
	for range staleAfter - 1 {
		p.Sync(ctx)
	}
	if got := r.take(); !slices.Equal(got, []string{"b:8000=sql"}) {
		t.Fatalf("while a fails, reported %v", got)
	}
	p.Sync(ctx)
	if got := r.take(); !slices.Equal(got, []string{"a:8000="}) {
		t.Fatalf("after %d failed passes, reported %v", staleAfter, got)
	}

	e.set("b:8000", answer(http.StatusOK, `{"data":[{"id":"x","parent":"l"}`+strings.Repeat(" ", MaxBodyBytes)+`]}`))
	for range staleAfter {
		p.Sync(ctx)
	}
	if got := r.take(); !slices.Equal(got, []string{"b:8000="}) {
		t.Fatalf("an oversized list: reported %v", got)
	}

	e.set("c:8000", listing("sql"))
	p.Sync(ctx)
	r.take()
	addrs = []string{"a:8000"}
	p.Sync(ctx)
	if got := r.take(); !slices.Equal(got, []string{"c:8000="}) {
		t.Fatalf("an endpoint gone: reported %v", got)
	}
}

// Through the default transport, an endpoint that never answers costs one
// Timeout per pass, and one that answers with an endless list is cut off at
// MaxBodyBytes; neither is reported.
func TestPollerBoundsHostileEngines(t *testing.T) {
	hang := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }))
	defer hang.Close()
	endless := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `{"data":[`)
		for r.Context().Err() == nil {
			if _, err := io.WriteString(w, `{"id":"x","parent":"l"},`); err != nil {
				return
			}
		}
	}))
	defer endless.Close()
	r := &reports{}
	const timeout = 300 * time.Millisecond
	errs := prometheus.NewCounter(prometheus.CounterOpts{Name: "errors"})
	p := New(Options{Interval: time.Second, Timeout: timeout, Reporter: r, Errors: errs,
		Endpoints: func() []string { return []string{hang.Listener.Addr().String(), endless.Listener.Addr().String()} }})
	start := time.Now()
	p.Sync(context.Background())
	if d := time.Since(start); d > 3*timeout {
		t.Errorf("a pass took %v with a %v timeout", d, timeout)
	}
	if got := r.take(); len(got) != 0 {
		t.Errorf("reported %v", got)
	}
	if n := testutil.ToFloat64(errs); n != 2 {
		t.Errorf("%v errors counted, want 2", n)
	}
}
