package scrape

import (
	"compress/gzip"
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/klog/v2/ktesting"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

const textType = "text/plain; version=0.0.4; charset=utf-8"

// engineServer serves a metrics page, or misbehaves as told.
type engineServer struct {
	*httptest.Server
	mu          sync.Mutex
	page        string
	contentType string
	status      int
	gzip        bool
	hang        bool
	requests    atomic.Int64
	inFlight    atomic.Int64
	maxInFlight atomic.Int64
	delay       time.Duration
	conns       atomic.Int64 // connections opened to it
}

func newEngineServer(t *testing.T, page string, configure ...func(*http.Server)) *engineServer {
	s := &engineServer{page: page, contentType: textType, status: http.StatusOK}
	s.Server = httptest.NewUnstartedServer(http.HandlerFunc(s.serve))
	for _, f := range configure {
		f(s.Config)
	}
	s.Config.ConnState = func(_ net.Conn, state http.ConnState) {
		if state == http.StateNew {
			s.conns.Add(1)
		}
	}
	s.Start()
	t.Cleanup(s.Close)
	return s
}

func (s *engineServer) set(f func(s *engineServer)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f(s)
}

func (s *engineServer) serve(w http.ResponseWriter, r *http.Request) {
	s.requests.Add(1)
	n := s.inFlight.Add(1)
	defer s.inFlight.Add(-1)
	for {
		m := s.maxInFlight.Load()
		if n <= m || s.maxInFlight.CompareAndSwap(m, n) {
			break
		}
	}
	s.mu.Lock()
	page, ct, status, gz, hang, delay := s.page, s.contentType, s.status, s.gzip, s.hang, s.delay
	s.mu.Unlock()
	if hang {
		<-r.Context().Done()
		return
	}
	if delay > 0 {
		time.Sleep(delay)
	}
	w.Header().Set("Content-Type", ct)
	if gz { // whether or not the client asked for it
		w.Header().Set("Content-Encoding", "gzip")
		w.WriteHeader(status)
		zw := gzip.NewWriter(w)
		zw.Write([]byte(page))
		zw.Close()
		return
	}
	w.WriteHeader(status)
	w.Write([]byte(page))
}

func (s *engineServer) target(name string, engine modelserver.Engine) Target {
	return Target{Key: key(name), URL: s.URL + "/metrics", Engine: engine}
}

func key(name string) types.NamespacedName { return types.NamespacedName{Namespace: "ml", Name: name} }

func testdata(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile("../catalogue/testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// recorder is an Observer that remembers what it saw.
type recorder struct {
	mu       sync.Mutex
	observed map[types.NamespacedName]int
	latest   map[types.NamespacedName]sample
	// histograms records, per observation, whether histograms were read
	// and which ones the page had.
	histograms []int
	forgot     map[types.NamespacedName]bool
	late       []types.NamespacedName // observed after being forgotten
}

func newRecorder() *recorder {
	return &recorder{observed: map[types.NamespacedName]int{}, latest: map[types.NamespacedName]sample{},
		forgot: map[types.NamespacedName]bool{}}
}

// sample is what a test compares of an observation: the load metrics, and
// whether the page had them.
type sample struct {
	at                                 time.Time
	waiting, running, kvCache          float64
	hasWaiting, hasRunning, hasKVCache bool
}

func (r *recorder) sample(key types.NamespacedName) (sample, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	l, ok := r.latest[key]
	return l, ok
}

func (r *recorder) count(key types.NamespacedName) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.observed[key]
}

func scalar(v *catalogue.Values, name string) (float64, bool) {
	id, ok := cat.ID(name)
	if !ok || !v.Has[id] {
		return 0, false
	}
	return v.Scalar[id], true
}

func (r *recorder) Observe(t Target, at time.Time, v *catalogue.Values) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.forgot[t.Key] {
		r.late = append(r.late, t.Key)
	}
	r.observed[t.Key]++
	l := sample{at: at}
	l.waiting, l.hasWaiting = scalar(v, catalogue.RequestsWaiting)
	l.running, l.hasRunning = scalar(v, catalogue.RequestsRunning)
	l.kvCache, l.hasKVCache = scalar(v, catalogue.KVCacheUsage)
	r.latest[t.Key] = l
	n := -1 // not read
	if !v.HistogramsSkipped {
		n = 0
		for id, m := range cat.Metrics() {
			if m.Kind == catalogue.Histogram && v.Has[id] {
				n++
			}
		}
	}
	r.histograms = append(r.histograms, n)
}

var cat = catalogue.Builtin()

// observedScraper returns a scraper with opts and a recorder as its
// Observer.
func observedScraper(t *testing.T, opts Options) (*Scraper, *recorder) {
	t.Helper()
	rec := newRecorder()
	opts.Observer = rec
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return s, rec
}

func (r *recorder) Forget(key types.NamespacedName) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.forgot[key] = true
	delete(r.latest, key)
}

// run starts s until the test ends.
func run(t *testing.T, s *Scraper) {
	t.Helper()
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan error)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
}

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	err := wait.PollUntilContextTimeout(context.Background(), 10*time.Millisecond, timeout, true,
		func(context.Context) (bool, error) { return cond(), nil })
	if err != nil {
		t.Fatalf("waiting %s for %s: %v", timeout, what, err)
	}
}

func fastOptions() Options {
	return Options{Interval: 100 * time.Millisecond, Timeout: 50 * time.Millisecond,
		BackoffInitial: 100 * time.Millisecond, BackoffMax: 800 * time.Millisecond}
}

func TestValuesFromEachEngine(t *testing.T) {
	cases := map[string]struct {
		engine      modelserver.Engine
		page        string
		contentType string
		gzip        bool
		want        sample
	}{
		"vLLM text":           {modelserver.VLLM, "vllm-v1.prom", textType, false, sample{waiting: 7, running: 7, kvCache: 0.5, hasWaiting: true, hasRunning: true, hasKVCache: true}},
		"vLLM gzip":           {modelserver.VLLM, "vllm-v1.prom", textType, true, sample{waiting: 7, running: 7, kvCache: 0.5, hasWaiting: true, hasRunning: true, hasKVCache: true}},
		"vLLM OpenMetrics":    {modelserver.VLLM, "vllm-v1.openmetrics", "application/openmetrics-text; version=1.0.0; charset=utf-8", true, sample{waiting: 7, running: 3, kvCache: 0.5, hasWaiting: true, hasRunning: true, hasKVCache: true}},
		"vLLM V0":             {modelserver.VLLM, "vllm-v0.prom", "", false, sample{waiting: 9, running: 6, kvCache: 0.875, hasWaiting: true, hasRunning: true, hasKVCache: true}},
		"SGLang":              {modelserver.SGLang, "sglang.prom", textType, false, sample{waiting: 2826, running: 12, kvCache: 0.28, hasWaiting: true, hasRunning: true, hasKVCache: true}},
		"TGI has no KV":       {modelserver.TGI, "tgi.prom", textType, false, sample{waiting: 4, running: 16, hasWaiting: true, hasRunning: true}},
		"Triton TensorRT-LLM": {modelserver.Triton, "triton-trtllm.prom", textType, false, sample{waiting: 4, running: 6, kvCache: 0.25, hasWaiting: true, hasRunning: true, hasKVCache: true}},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			srv := newEngineServer(t, testdata(t, tc.page))
			srv.set(func(s *engineServer) { s.contentType, s.gzip = tc.contentType, tc.gzip })
			s, rec := observedScraper(t, fastOptions())
			target := srv.target("p", tc.engine)
			s.Upsert(target)
			before := time.Now()
			run(t, s)
			var got sample
			waitFor(t, 2*time.Second, "a sample", func() bool {
				var ok bool
				got, ok = rec.sample(target.Key)
				return ok
			})
			if got.at.Before(before) || got.at.After(time.Now()) {
				t.Errorf("sample time %s is not the time of a scrape made after %s", got.at, before)
			}
			got.at = time.Time{}
			if diff := cmp.Diff(tc.want, got, cmp.AllowUnexported(sample{})); diff != "" {
				t.Errorf("observed (-want +got):\n%s", diff)
			}
		})
	}
}

// Every way a target can fail is counted under its reason, is never
// observed, and never makes a scrape last longer than the timeout.
func TestFailingTargets(t *testing.T) {
	refusing, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refusedURL := "http://" + refusing.Addr().String() + "/metrics"
	refusing.Close()

	good := newEngineServer(t, testdata(t, "vllm-v1.prom"))
	hanging := newEngineServer(t, "")
	hanging.set(func(s *engineServer) { s.hang = true })
	garbage := newEngineServer(t, "<html><body>502 Bad Gateway</body></html>\nvllm:num_requests_waiting{model_name=\"x\" 3 \x00\n")
	html := newEngineServer(t, "<html>login</html>")
	html.set(func(s *engineServer) { s.contentType = "text/html" })
	errorPage := newEngineServer(t, "oops")
	errorPage.set(func(s *engineServer) { s.status = http.StatusInternalServerError })
	huge := newEngineServer(t, strings.Repeat("# padding\n", 2000)+testdata(t, "vllm-v1.prom"))
	otherEngine := newEngineServer(t, testdata(t, "tgi.prom"))
	badGzip := newEngineServer(t, "not gzip at all")
	badGzip.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Encoding", "gzip")
		w.Write([]byte("not gzip at all"))
	})

	seriesFlood := newEngineServer(t, vllmPage+strings.Repeat("vllm:num_requests_waiting 1\n", 200))
	bucketFlood := newEngineServer(t, vllmPage+"# TYPE vllm:time_to_first_token_seconds histogram\n"+
		strings.Repeat("vllm:time_to_first_token_seconds_bucket{le=\"+Inf\"} 1\n", 100))

	targets := []Target{
		seriesFlood.target("series-flood", modelserver.VLLM),
		bucketFlood.target("bucket-flood", modelserver.VLLM),
		good.target("good", modelserver.VLLM),
		{Key: key("refusing"), URL: refusedURL, Engine: modelserver.VLLM},
		hanging.target("hanging", modelserver.VLLM),
		garbage.target("garbage", modelserver.VLLM),
		html.target("html", modelserver.VLLM),
		errorPage.target("error", modelserver.VLLM),
		huge.target("huge", modelserver.VLLM),
		otherEngine.target("mislabelled", modelserver.VLLM),
		badGzip.target("bad-gzip", modelserver.VLLM),
	}
	want := map[string]Result{"refusing": Refused, "hanging": Timeout, "garbage": ParseError, "html": ParseError,
		"error": HTTPError, "huge": TooLarge, "mislabelled": Unmapped, "bad-gzip": ParseError,
		"series-flood": TooManySeries, "bucket-flood": TooManyBuckets}

	// Slower than fastOptions: a loaded machine must not turn a page that
	// is merely too large into a timeout.
	opts := Options{Interval: 500 * time.Millisecond, Timeout: 250 * time.Millisecond,
		BackoffInitial: 500 * time.Millisecond, BackoffMax: 4 * time.Second}
	opts.MaxPageBytes = 16 << 10
	opts.MaxSeriesPerFamily, opts.MaxBucketsPerHistogram = 100, 50
	reg := prometheus.NewPedanticRegistry()
	opts.Registerer = reg
	s, rec := observedScraper(t, opts)
	s.SetTargets(targets)
	run(t, s)

	waitFor(t, 10*time.Second, "every failing target to fail twice", func() bool {
		for name, r := range want {
			if s.state(key(name)).scrapes[r].Load() < 2 {
				return false
			}
		}
		return true
	})
	for name, r := range want {
		st := s.state(key(name))
		for other := range numResults {
			if other != r && st.scrapes[other].Load() > 0 {
				t.Errorf("%s: %d scrapes counted as %s, want only %s", name, st.scrapes[other].Load(), other, r)
			}
		}
		if n := rec.count(key(name)); n > 0 {
			t.Errorf("%s was observed %d times", name, n)
		}
		if d := time.Duration(st.lastNano.Load()); d > opts.Timeout+50*time.Millisecond {
			t.Errorf("%s: a scrape took %s, longer than the %s timeout", name, d, opts.Timeout)
		}
	}
	if rec.count(key("good")) == 0 {
		t.Error("the healthy target was not observed beside failing ones")
	}

	// Backoff: while the healthy target is scraped eight more times, the
	// failing one is tried less than half as often.
	healthy0 := s.state(key("good")).scrapes[Success].Load()
	failed0 := s.state(key("refusing")).scrapes[Refused].Load()
	waitFor(t, 10*time.Second, "eight more scrapes of the healthy target", func() bool {
		return s.state(key("good")).scrapes[Success].Load()-healthy0 >= 8
	})
	healthy := s.state(key("good")).scrapes[Success].Load() - healthy0
	failed := s.state(key("refusing")).scrapes[Refused].Load() - failed0
	if failed*2 > healthy {
		t.Errorf("the refusing target was tried %d times while the healthy one was scraped %d times: no backoff", failed, healthy)
	}

	// The operations metrics name each pod and reason.
	expected := `
# HELP capstan_scrape_target_up Whether the target's last scrape succeeded.
# TYPE capstan_scrape_target_up gauge
capstan_scrape_target_up{namespace="ml",pod="bad-gzip"} 0
capstan_scrape_target_up{namespace="ml",pod="bucket-flood"} 0
capstan_scrape_target_up{namespace="ml",pod="error"} 0
capstan_scrape_target_up{namespace="ml",pod="garbage"} 0
capstan_scrape_target_up{namespace="ml",pod="good"} 1
capstan_scrape_target_up{namespace="ml",pod="hanging"} 0
capstan_scrape_target_up{namespace="ml",pod="html"} 0
capstan_scrape_target_up{namespace="ml",pod="huge"} 0
capstan_scrape_target_up{namespace="ml",pod="mislabelled"} 0
capstan_scrape_target_up{namespace="ml",pod="refusing"} 0
capstan_scrape_target_up{namespace="ml",pod="series-flood"} 0
# HELP capstan_scrape_targets Targets being scraped.
# TYPE capstan_scrape_targets gauge
capstan_scrape_targets 11
# HELP capstan_scrape_targets_by_state Targets by the outcome of their last scrape: up (succeeded), failing (failed), unscraped (not scraped yet).
# TYPE capstan_scrape_targets_by_state gauge
capstan_scrape_targets_by_state{state="failing"} 10
capstan_scrape_targets_by_state{state="unscraped"} 0
capstan_scrape_targets_by_state{state="up"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(expected), "capstan_scrape_target_up", "capstan_scrape_targets", "capstan_scrape_targets_by_state"); err != nil {
		t.Error(err)
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sawRefused, sawAge, sawSeries, sawBuckets, sawOldest bool
	for _, f := range families {
		for _, m := range f.Metric {
			labels := map[string]string{}
			for _, l := range m.Label {
				labels[l.GetName()] = l.GetValue()
			}
			switch {
			case f.GetName() == "capstan_scrape_target_scrapes_total" && labels["pod"] == "refusing" && labels["result"] == "refused":
				sawRefused = m.GetCounter().GetValue() >= 2
			case f.GetName() == "capstan_scrape_target_scrapes_total" && labels["pod"] == "series-flood" && labels["result"] == "too_many_series":
				sawSeries = m.GetCounter().GetValue() >= 2
			case f.GetName() == "capstan_scrape_target_scrapes_total" && labels["pod"] == "bucket-flood" && labels["result"] == "too_many_buckets":
				sawBuckets = m.GetCounter().GetValue() >= 2
			case f.GetName() == "capstan_scrape_oldest_sample_age_seconds":
				// Only the healthy pod has a sample.
				sawOldest = m.GetGauge().GetValue() < 2*opts.Interval.Seconds()
			case f.GetName() == "capstan_scrape_target_sample_age_seconds":
				if labels["pod"] != "good" {
					t.Errorf("pod %s has a sample age but never had a sample", labels["pod"])
				}
				sawAge = m.GetGauge().GetValue() < 2*opts.Interval.Seconds()
			}
		}
	}
	if !sawRefused || !sawAge || !sawSeries || !sawBuckets || !sawOldest {
		t.Errorf("metrics lack the refused count (%v), the healthy pod's sample age (%v), the too_many_series (%v) or too_many_buckets (%v) counts, or the oldest sample's age (%v)",
			sawRefused, sawAge, sawSeries, sawBuckets, sawOldest)
	}
}

func (s *Scraper) state(key types.NamespacedName) *state {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.targets[key]
}

// A target that stops answering is not observed until it recovers: the
// observer decides how long the last good sample stands.
func TestFailingTargetIsObservedAgainOnRecovery(t *testing.T) {
	srv := newEngineServer(t, testdata(t, "vllm-v1.prom"))
	s, rec := observedScraper(t, fastOptions())
	target := srv.target("p", modelserver.VLLM)
	s.Upsert(target)
	run(t, s)
	waitFor(t, 2*time.Second, "a sample", func() bool { return rec.count(target.Key) > 0 })
	srv.set(func(s *engineServer) { s.hang = true })
	waitFor(t, 2*time.Second, "a failed scrape", func() bool { return s.state(target.Key).failing.Load() > 0 })
	seen := rec.count(target.Key)
	waitFor(t, 3*time.Second, "two more failed scrapes", func() bool { return s.state(target.Key).failing.Load() >= 3 })
	if n := rec.count(target.Key); n != seen {
		t.Errorf("observed %d times while failing", n-seen)
	}
	srv.set(func(s *engineServer) { s.hang = false })
	waitFor(t, 3*time.Second, "recovery after backoff", func() bool { return rec.count(target.Key) > seen })
}

func TestRemoveForgetsAtOnce(t *testing.T) {
	srv := newEngineServer(t, testdata(t, "vllm-v1.prom"))
	opts := fastOptions()
	s, rec := observedScraper(t, opts)
	a, b := srv.target("a", modelserver.VLLM), srv.target("b", modelserver.VLLM)
	s.SetTargets([]Target{a, b})
	run(t, s)
	waitFor(t, 2*time.Second, "samples of both", func() bool { return rec.count(a.Key) > 0 && rec.count(b.Key) > 0 })
	s.SetTargets([]Target{b})
	if s.state(a.Key) != nil {
		t.Error("a removed target is still a target")
	}
	before, seenB := srv.requests.Load(), rec.count(b.Key)
	waitFor(t, 2*time.Second, "three more samples of b", func() bool { return rec.count(b.Key) >= seenB+3 })
	// Only b is scraped now: one request per sample, give or take one
	// in flight at each end.
	if n := srv.requests.Load() - before; n > int64(rec.count(b.Key)-seenB)+2 {
		t.Errorf("%d scrapes for %d samples of one target: the removed one is still scraped", n, rec.count(b.Key)-seenB)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if !rec.forgot[a.Key] || rec.forgot[b.Key] {
		t.Errorf("forgotten: %v, want only a", rec.forgot)
	}
	if len(rec.late) > 0 {
		t.Errorf("observed after Forget: %v", rec.late)
	}
}

func TestUpsertWithNewURLRestartsTheTarget(t *testing.T) {
	vllm := newEngineServer(t, testdata(t, "vllm-v1.prom"))
	sglang := newEngineServer(t, testdata(t, "sglang.prom"))
	s, rec := observedScraper(t, fastOptions())
	s.Upsert(vllm.target("p", modelserver.VLLM))
	run(t, s)
	waitFor(t, 2*time.Second, "the vLLM sample", func() bool { l, ok := rec.sample(key("p")); return ok && l.waiting == 7 })
	s.Upsert(sglang.target("p", modelserver.SGLang))
	if l, ok := rec.sample(key("p")); ok {
		t.Errorf("after a new URL, the old endpoint's sample was not forgotten: %+v", l)
	}
	waitFor(t, 2*time.Second, "the SGLang sample", func() bool { l, ok := rec.sample(key("p")); return ok && l.waiting == 2826 })
}

// With an observer, gauges and counters are read on every scrape and
// histograms first and then every HistogramInterval.
func TestHistogramsAreReadEveryHistogramInterval(t *testing.T) {
	srv := newEngineServer(t, testdata(t, "vllm-v1.prom"))
	opts := fastOptions()
	opts.HistogramInterval = 3 * opts.Interval
	s, rec := observedScraper(t, opts)
	s.Upsert(srv.target("p", modelserver.VLLM))
	run(t, s)
	waitFor(t, 5*time.Second, "ten samples", func() bool {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		return len(rec.histograms) >= 10
	})
	rec.mu.Lock()
	defer rec.mu.Unlock()
	seen := rec.histograms[:10]
	if seen[0] != 2 {
		t.Errorf("the first scrape read %d histograms, want both of the page's (TTFT and e2e)", seen[0])
	}
	full := 0
	for _, n := range seen {
		if n >= 0 {
			full++
		}
	}
	// About one scrape in three, give or take scheduling.
	if full < 2 || full > 5 {
		t.Errorf("histograms read in %d of 10 scrapes (%v), want about every third", full, seen)
	}
}

func TestConcurrencyIsBounded(t *testing.T) {
	srv := newEngineServer(t, testdata(t, "vllm-v1.prom"))
	srv.set(func(s *engineServer) { s.delay = 80 * time.Millisecond })
	opts := fastOptions()
	opts.Concurrency = 3
	// Ten targets over the interval overlap about two at a time. No scrape
	// may time out: an abandoned one can still be running on the server
	// when the scraper starts the next, and the server would count both.
	opts.Interval, opts.Timeout = 400*time.Millisecond, 300*time.Millisecond
	s, rec := observedScraper(t, opts)
	var ts []Target
	for _, n := range []string{"a", "b", "c", "d", "e", "f", "g", "h", "i", "j"} {
		ts = append(ts, srv.target(n, modelserver.VLLM))
	}
	s.SetTargets(ts)
	run(t, s)
	waitFor(t, 3*time.Second, "every target sampled", func() bool {
		for _, target := range ts {
			if rec.count(target.Key) == 0 {
				return false
			}
		}
		return true
	})
	if m := srv.maxInFlight.Load(); m > 3 || m < 2 {
		t.Errorf("at most %d scrapes ran at once, want 2-3 with Concurrency 3", m)
	}
}

func TestOneKeptAliveConnectionPerTarget(t *testing.T) {
	for _, gz := range []bool{false, true} {
		srv := newEngineServer(t, testdata(t, "vllm-v1.prom"))
		srv.set(func(s *engineServer) { s.gzip = gz })
		s, rec := observedScraper(t, fastOptions())
		target := srv.target("p", modelserver.VLLM)
		s.Upsert(target)
		run(t, s)
		waitFor(t, 5*time.Second, "nine samples", func() bool {
			rec.mu.Lock()
			defer rec.mu.Unlock()
			return rec.observed[target.Key] >= 9
		})
		// On a quiet machine this is one connection. The 50ms timeout
		// can fire as a loaded machine's scrape closes the body, which
		// then closes the connection though the page was read; without
		// keep-alive every scrape would open one.
		if n, scrapes := srv.conns.Load(), srv.requests.Load(); n < 1 || n > scrapes/3 {
			t.Errorf("gzip=%v: %d scrapes opened %d connections, want 1 (at most a third as many on a loaded machine)", gz, scrapes, n)
		}
	}
}

// An idle connection the server closed is replaced without a failed scrape.
func TestClosedIdleConnectionIsReplaced(t *testing.T) {
	// The server closes each connection between scrapes.
	srv := newEngineServer(t, testdata(t, "vllm-v1.prom"), func(c *http.Server) { c.IdleTimeout = time.Millisecond })
	s, rec := observedScraper(t, fastOptions())
	target := srv.target("p", modelserver.VLLM)
	s.Upsert(target)
	run(t, s)
	waitFor(t, 5*time.Second, "five samples", func() bool { return rec.count(target.Key) >= 5 })
	st := s.state(target.Key)
	for r := range numResults {
		if n := st.scrapes[r].Load(); r != Success && n > 0 {
			t.Errorf("%d scrapes failed as %s", n, r)
		}
	}
	if n := srv.conns.Load(); n < 3 {
		t.Errorf("%d connections for %d scrapes: the server's closing them was not seen", n, srv.requests.Load())
	}
}

// Any http.RoundTripper can fetch the pages.
func TestOptionsTransport(t *testing.T) {
	srv := newEngineServer(t, testdata(t, "vllm-v1.prom"))
	var used atomic.Int64
	opts := fastOptions()
	opts.Transport = roundTripperFunc(func(r *http.Request) (*http.Response, error) {
		used.Add(1)
		return srv.Client().Transport.RoundTrip(r)
	})
	s, rec := observedScraper(t, opts)
	target := srv.target("p", modelserver.VLLM)
	s.Upsert(target)
	run(t, s)
	waitFor(t, 2*time.Second, "a sample", func() bool { return rec.count(target.Key) > 0 })
	if used.Load() == 0 {
		t.Error("Options.Transport was not used")
	}
}

type roundTripperFunc func(*http.Request) (*http.Response, error)

func (f roundTripperFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// Only the metrics the observer wants are parsed.
func TestOptionsWants(t *testing.T) {
	srv := newEngineServer(t, testdata(t, "vllm-v1.prom"))
	opts := fastOptions()
	opts.Wants = func(m catalogue.Metric) bool { return m.Name == catalogue.RequestsWaiting }
	s, rec := observedScraper(t, opts)
	target := srv.target("p", modelserver.VLLM)
	s.Upsert(target)
	run(t, s)
	var got sample
	waitFor(t, 2*time.Second, "a sample", func() bool { var ok bool; got, ok = rec.sample(target.Key); return ok })
	if !got.hasWaiting || got.hasRunning || got.hasKVCache {
		t.Errorf("observed %+v; want requests_waiting only", got)
	}
}

func TestInvalidOptions(t *testing.T) {
	cases := map[string]struct {
		opts     Options
		errMatch string
	}{
		"timeout not below interval": {Options{Interval: time.Second, Timeout: time.Second}, "scrape.timeout: Invalid value: \"1s\": must be shorter than the interval"},
		"negative interval":          {Options{Interval: -time.Second, Timeout: -2 * time.Second}, "scrape.interval: Invalid value: \"-1s\": must be positive"},
		"backoff max below initial":  {Options{BackoffInitial: 10 * time.Second, BackoffMax: time.Second}, "scrape.backoffMax"},
		"negative concurrency":       {Options{Concurrency: -1}, "scrape.concurrency"},
		"no observer":                {Options{}, "scrape.observer: Required value"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			if tc.opts.Observer == nil && tc.errMatch != "scrape.observer: Required value" {
				tc.opts.Observer = newRecorder()
			}
			_, err := New(tc.opts)
			if err == nil || !strings.Contains(err.Error(), tc.errMatch) {
				t.Fatalf("New: %v; want an error containing %q", err, tc.errMatch)
			}
		})
	}
}

func TestTargetForPod(t *testing.T) {
	pod := func(engine string, ip string) *corev1.Pod {
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "ml", Name: "p", Labels: map[string]string{modelserver.ModelLabel: "m"}},
			Spec: corev1.PodSpec{Containers: []corev1.Container{{Ports: []corev1.ContainerPort{
				{Name: "http", ContainerPort: 8000}, {Name: "metrics", ContainerPort: 8002}}}}},
			Status: corev1.PodStatus{PodIP: ip},
		}
		if engine != "" {
			p.Labels[modelserver.EngineLabel] = engine
		}
		return p
	}
	got, err := TargetForPod(pod("triton", "10.1.2.3"))
	want := Target{Key: key("p"), URL: "http://10.1.2.3:8002/metrics", Engine: modelserver.Triton}
	if err != nil || got != want {
		t.Errorf("TargetForPod = %+v, %v; want %+v", got, err, want)
	}
	if got, _ := TargetForPod(pod("", "fd00::7")); got.URL != "http://[fd00::7]:8002/metrics" || got.Engine != modelserver.VLLM {
		t.Errorf("IPv6 pod without engine label: %+v", got)
	}
	if _, err := TargetForPod(pod("llamacpp", "10.1.2.3")); err == nil || !strings.Contains(err.Error(), "unknown capstan.dev/engine") {
		t.Errorf("unknown engine: %v", err)
	}
	if _, err := TargetForPod(pod("vllm", "")); err == nil {
		t.Error("a pod without an IP has a target")
	}
}

func TestRunTwiceIsAnError(t *testing.T) {
	s, _ := observedScraper(t, fastOptions())
	run(t, s)
	waitFor(t, time.Second, "Run to start", func() bool { s.mu.RLock(); defer s.mu.RUnlock(); return s.started })
	if err := s.Run(context.Background()); err == nil {
		t.Error("a second Run did not fail")
	}
}

func TestOnlyPlainHTTPIsScraped(t *testing.T) {
	s, _ := observedScraper(t, fastOptions())
	w := &worker{values: s.opts.Catalogue.NewValues()}
	target := Target{Key: key("p"), URL: "https://127.0.0.1:1/metrics", Engine: modelserver.VLLM}
	st := &state{target: target, req: s.request(target)}
	_, result, err := s.fetch(context.Background(), w, st, s.filters[modelserver.VLLM].scalars)
	if result != NetworkError || err == nil || !strings.Contains(err.Error(), "plain HTTP") {
		t.Errorf("scraping %s: %v, %v; want a network_error saying metrics are scraped over plain HTTP", target.URL, result, err)
	}
}
