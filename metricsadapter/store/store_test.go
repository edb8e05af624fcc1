package store

import (
	"math"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/metricsadapter/scrape"
)

var (
	cat   = catalogue.Builtin()
	epoch = time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)
	inf   = math.Inf(1)
)

func id(t testing.TB, name string) int {
	t.Helper()
	i, ok := cat.ID(name)
	if !ok {
		t.Fatalf("no metric %s", name)
	}
	return i
}

func served(t testing.TB, name string) catalogue.ServedName {
	t.Helper()
	s, ok := cat.Lookup(name)
	if !ok {
		t.Fatalf("%s is not served", name)
	}
	return s
}

func podKey(name string) types.NamespacedName {
	return types.NamespacedName{Namespace: "ml", Name: name}
}

// sample builds what the scraper would deliver.
type sample struct {
	waiting  float64
	prompt   float64   // prompt tokens counter
	ttft     []float64 // cumulative counts for ttftBounds
	noPrompt bool
}

var ttftBounds = []float64{0.1, 0.5, 1, inf}

func (sm sample) values(t testing.TB) *catalogue.Values {
	v := cat.NewValues()
	w := id(t, "requests_waiting")
	v.Has[w], v.Scalar[w] = true, sm.waiting
	if !sm.noPrompt {
		p := id(t, "prompt_tokens_per_second")
		v.Has[p], v.Scalar[p] = true, sm.prompt
	}
	if sm.ttft != nil {
		h := id(t, "time_to_first_token_seconds")
		v.Has[h] = true
		v.Hist[h] = catalogue.HistogramValue{Bounds: ttftBounds, Counts: sm.ttft, Count: sm.ttft[len(sm.ttft)-1]}
	}
	return v
}

func newStore(t testing.TB) *Store {
	s, err := New(Options{Window: 30 * time.Second, MaxAge: 5 * time.Second, Catalogue: cat})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func observe(t testing.TB, s *Store, pod string, at time.Time, sm sample) {
	s.Observe(scrape.Target{Key: podKey(pod), Engine: modelserver.VLLM}, at, sm.values(t))
}

func TestGaugeIsServedOnlyWhileFresh(t *testing.T) {
	s := newStore(t)
	observe(t, s, "a", epoch, sample{waiting: 4})
	v, ok := s.PodValue(podKey("a"), served(t, "requests_waiting"), epoch.Add(time.Second))
	if !ok || v.Value != 4 || !v.Time.Equal(epoch) || v.Window != 0 {
		t.Errorf("PodValue = %+v, %v; want 4 at %s with no window", v, ok, epoch)
	}
	if v, ok := s.PodValue(podKey("a"), served(t, "requests_waiting"), epoch.Add(6*time.Second)); ok {
		t.Errorf("a sample older than MaxAge is served: %+v", v)
	}
	if _, ok := s.PodValue(podKey("a"), served(t, "kv_cache_usage"), epoch); ok {
		t.Error("a gauge the sample did not have is served")
	}
	if _, ok := s.PodValue(podKey("b"), served(t, "requests_waiting"), epoch); ok {
		t.Error("an unknown pod has a value")
	}
	s.Forget(podKey("a"))
	if _, ok := s.PodValue(podKey("a"), served(t, "requests_waiting"), epoch); ok || s.Len() != 0 {
		t.Error("a forgotten pod is still served")
	}
}

func TestRateOverTheWindow(t *testing.T) {
	cases := map[string]struct {
		counter  func(sec int) float64
		seconds  int
		wantRate float64
	}{
		"steady 10/s": {counter: func(sec int) float64 { return float64(10 * sec) }, seconds: 60, wantRate: 10},
		"faster lately: only the window counts": {counter: func(sec int) float64 {
			if sec < 30 {
				return float64(sec)
			}
			return 30 + float64(100*(sec-30))
		}, seconds: 70, wantRate: 100},
		"a reset in the window": {counter: func(sec int) float64 {
			if sec < 50 {
				return 1000 + float64(10*sec)
			}
			return float64(10 * (sec - 50))
		}, seconds: 65, wantRate: 10},
		"two resets": {counter: func(sec int) float64 { return float64(10 * (sec % 12)) }, seconds: 65, wantRate: 10 * 11.0 / 12},
		// The history keeps growth in float32s: a large cumulative value
		// must not lose what it grew by.
		"an engine up for long": {counter: func(sec int) float64 { return 1e12 + float64(7*sec) }, seconds: 60, wantRate: 7},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			s := newStore(t)
			for sec := 0; sec <= tc.seconds; sec++ {
				observe(t, s, "a", epoch.Add(time.Duration(sec)*time.Second), sample{prompt: tc.counter(sec)})
			}
			end := epoch.Add(time.Duration(tc.seconds) * time.Second)
			v, ok := s.PodValue(podKey("a"), served(t, "prompt_tokens_per_second"), end)
			if !ok {
				t.Fatal("no rate")
			}
			if v.Window < 30*time.Second || v.Window > 35*time.Second {
				t.Errorf("window %s, want between the 30s window and 35s", v.Window)
			}
			if !v.Time.Equal(end) {
				t.Errorf("time %s, want the last sample's %s", v.Time, end)
			}
			// The "two resets" counter loses one step per reset, as any
			// sampled rate does.
			if math.Abs(v.Value-tc.wantRate) > tc.wantRate*0.1 {
				t.Errorf("rate %v, want about %v", v.Value, tc.wantRate)
			}
		})
	}
}

func TestRateNeedsTwoSamplesAndUsesTheRealSpan(t *testing.T) {
	s := newStore(t)
	observe(t, s, "a", epoch, sample{prompt: 100})
	if _, ok := s.PodValue(podKey("a"), served(t, "prompt_tokens_per_second"), epoch); ok {
		t.Fatal("a rate from one sample")
	}
	// Checkpoints are 5s apart: the second sample 5s later gives a 5s rate.
	observe(t, s, "a", epoch.Add(5*time.Second), sample{prompt: 150})
	v, ok := s.PodValue(podKey("a"), served(t, "prompt_tokens_per_second"), epoch.Add(5*time.Second))
	if !ok || v.Value != 10 || v.Window != 5*time.Second {
		t.Errorf("PodValue = %+v, %v; want 10/s over the real 5s", v, ok)
	}
}

func TestSilenceLongerThanMaxAgeStartsAFreshHistory(t *testing.T) {
	s := newStore(t)
	for sec := 0; sec <= 40; sec++ {
		observe(t, s, "a", epoch.Add(time.Duration(sec)*time.Second), sample{prompt: float64(10 * sec)})
	}
	// 20s of silence, then the counter went on at 10/s meanwhile.
	back := epoch.Add(60 * time.Second)
	observe(t, s, "a", back, sample{prompt: 600})
	if v, ok := s.PodValue(podKey("a"), served(t, "prompt_tokens_per_second"), back); ok {
		t.Errorf("a rate across a gap: %+v", v)
	}
	observe(t, s, "a", back.Add(5*time.Second), sample{prompt: 650})
	if v, ok := s.PodValue(podKey("a"), served(t, "prompt_tokens_per_second"), back.Add(5*time.Second)); !ok || v.Window != 5*time.Second {
		t.Errorf("after the gap: %+v, %v; want a rate over the 5s since", v, ok)
	}
}

func TestQuantilesOverTheWindow(t *testing.T) {
	s := newStore(t)
	// For 60s every request is fast (<= 0.1s); then for 40s every request is
	// slow (0.5-1s). Cumulatively most requests are fast, but within the
	// window all are slow.
	for sec := 0; sec <= 100; sec++ {
		fast, slow := float64(min(sec, 60)*10), float64(max(0, sec-60)*10)
		observe(t, s, "a", epoch.Add(time.Duration(sec)*time.Second),
			sample{ttft: []float64{fast, fast, fast + slow, fast + slow}})
	}
	end := epoch.Add(100 * time.Second)
	for name, want := range map[string]float64{"time_to_first_token_seconds_p50": 0.75, "time_to_first_token_seconds_p90": 0.95} {
		v, ok := s.PodValue(podKey("a"), served(t, name), end)
		if !ok || math.Abs(v.Value-want) > 1e-9 || v.Window < 30*time.Second {
			t.Errorf("%s = %+v, %v; want %v over the window", name, v, ok, want)
		}
	}
	// An idle window has no latency at all, not a zero one.
	for sec := 101; sec <= 140; sec++ {
		observe(t, s, "a", epoch.Add(time.Duration(sec)*time.Second), sample{ttft: []float64{600, 600, 1000, 1000}})
	}
	if v, ok := s.PodValue(podKey("a"), served(t, "time_to_first_token_seconds_p50"), epoch.Add(140*time.Second)); ok {
		t.Errorf("an idle window has a quantile: %+v", v)
	}
}

func TestHistogramResetAndNewBounds(t *testing.T) {
	s := newStore(t)
	for sec := 0; sec <= 40; sec++ {
		n := float64(sec * 10)
		if sec >= 35 { // the engine restarted: counts start again
			n = float64((sec - 35) * 10)
		}
		// All observations in (0.5, 1].
		observe(t, s, "a", epoch.Add(time.Duration(sec)*time.Second), sample{ttft: []float64{0, 0, n, n}})
	}
	v, ok := s.PodValue(podKey("a"), served(t, "time_to_first_token_seconds_p50"), epoch.Add(40*time.Second))
	if !ok || v.Value != 0.75 {
		t.Errorf("p50 across a reset = %+v, %v; want 0.75", v, ok)
	}
	// New bucket bounds (an engine upgrade) start the history again.
	h := id(t, "time_to_first_token_seconds")
	vals := sample{ttft: []float64{0, 5, 5, 5}}.values(t)
	vals.Hist[h].Bounds = []float64{0.2, 0.4, 2, inf}
	s.Observe(scrape.Target{Key: podKey("a")}, epoch.Add(41*time.Second), vals)
	if v, ok := s.PodValue(podKey("a"), served(t, "time_to_first_token_seconds_p50"), epoch.Add(41*time.Second)); ok {
		t.Errorf("a quantile mixing two bucket layouts: %+v", v)
	}
}

func TestAggregate(t *testing.T) {
	s := newStore(t)
	for sec := 0; sec <= 40; sec++ {
		at := epoch.Add(time.Duration(sec) * time.Second)
		n := float64(sec)
		observe(t, s, "a", at, sample{waiting: 2, prompt: 10 * n, ttft: []float64{n, n, n, n}}) // all <= 0.1s
		observe(t, s, "b", at, sample{waiting: 6, prompt: 30 * n, ttft: []float64{0, 0, n, n}}) // all in (0.5, 1]
		if sec <= 30 {                                                                          // c stops being scraped at 30s
			observe(t, s, "c", at, sample{waiting: 100, prompt: 1000 * n})
		}
	}
	now := epoch.Add(40 * time.Second)
	keys := []types.NamespacedName{podKey("a"), podKey("b"), podKey("c"), podKey("missing")}
	cases := map[string]struct {
		want float64
		n    int
	}{
		"requests_waiting":                {8, 2},
		"prompt_tokens_per_second":        {40, 2},
		"time_to_first_token_seconds_p50": {0.1, 2}, // half the pooled requests are fast
		"time_to_first_token_seconds_p90": {0.9, 2},
		"kv_cache_usage":                  {0, 0},
	}
	for name, tc := range cases {
		v, n := s.Aggregate(keys, served(t, name), now)
		if n != tc.n || math.Abs(v.Value-tc.want) > 1e-9 {
			t.Errorf("%s = %v from %d pods, want %v from %d", name, v.Value, n, tc.want, tc.n)
		}
		if n > 0 && !v.Time.Equal(now) {
			t.Errorf("%s time %s, want %s", name, v.Time, now)
		}
	}
}

func TestQuantile(t *testing.T) {
	bounds := []float64{1, 2, 4, inf}
	cases := map[string]struct {
		q      float64
		counts []float64
		want   float64
		ok     bool
	}{
		"median in the first bucket": {0.5, []float64{10, 10, 10, 10}, 0.5, true},
		"interpolated":               {0.5, []float64{0, 10, 20, 20}, 2, true},
		"upper quartile":             {0.75, []float64{0, 10, 20, 20}, 3, true},
		"in the +Inf bucket":         {0.99, []float64{0, 0, 10, 20}, 4, true},
		"no observations":            {0.5, []float64{0, 0, 0, 0}, 0, false},
		"only +Inf":                  {0.5, []float64{5}, 0, false},
		"empty bucket at the rank":   {0.5, []float64{5, 5, 10, 10}, 1, true},
	}
	for name, tc := range cases {
		b := bounds
		if len(tc.counts) == 1 {
			b = []float64{inf}
		}
		got, ok := Quantile(tc.q, b, tc.counts)
		if ok != tc.ok || math.Abs(got-tc.want) > 1e-12 {
			t.Errorf("%s: Quantile = %v, %v; want %v, %v", name, got, ok, tc.want, tc.ok)
		}
	}
}

func TestInvalidOptions(t *testing.T) {
	if _, err := New(Options{Window: 500 * time.Millisecond}); err == nil || !strings.Contains(err.Error(), "store.window") {
		t.Errorf("New with a 500ms window: %v", err)
	}
	if _, err := New(Options{MaxAge: -time.Second}); err == nil || !strings.Contains(err.Error(), "store.maxAge") {
		t.Errorf("New with a negative max age: %v", err)
	}
}

// The checkpoint ring stays bounded however long a pod is scraped.
func TestHistoryIsBounded(t *testing.T) {
	s := newStore(t)
	for sec := 0; sec <= 600; sec++ {
		observe(t, s, "a", epoch.Add(time.Duration(sec)*time.Second), sample{prompt: float64(sec), ttft: []float64{1, 1, 1, 1}})
	}
	p := s.pods[podKey("a")]
	if n := len(p.ring); n > checkpointsPerWindow+2 {
		t.Errorf("%d checkpoints kept for a %s window", n, s.window)
	}
}

// Thousands of pods of one engine version keep one layout between them,
// not a copy each.
func TestPodsWithTheSameBoundsShareALayout(t *testing.T) {
	s := newStore(t)
	for _, pod := range []string{"a", "b", "c"} {
		observe(t, s, pod, epoch, sample{prompt: 1, ttft: []float64{1, 2, 3, 4}})
	}
	h := id(t, "time_to_first_token_seconds")
	vals := sample{ttft: []float64{0, 5, 5, 5}}.values(t)
	other := []float64{0.2, 0.4, 2, inf}
	vals.Hist[h].Bounds = other
	s.Observe(scrape.Target{Key: podKey("d")}, epoch, vals)
	other[0] = 99 // the scraper reuses its buffers; the store must not see this

	a, b, c, d := s.pods[podKey("a")].layout, s.pods[podKey("b")].layout, s.pods[podKey("c")].layout, s.pods[podKey("d")].layout
	if a != b || b != c {
		t.Error("pods with the same histogram bounds have separate layouts")
	}
	if a == d {
		t.Error("pods with different histogram bounds share a layout")
	}
	if got := d.bounds[h][0]; got != 0.2 {
		t.Errorf("the layout's bounds changed with the caller's slice: first bound %v, want 0.2", got)
	}
	if len(s.layouts) != 2 {
		t.Errorf("%d layouts interned, want 2", len(s.layouts))
	}
}

func BenchmarkObserve(b *testing.B) {
	s := newStore(b)
	v := sample{prompt: 1, ttft: []float64{1, 2, 3, 4}}.values(b)
	target := scrape.Target{Key: podKey("a")}
	at := epoch
	b.ReportAllocs()
	for b.Loop() {
		at = at.Add(time.Second)
		s.Observe(target, at, v)
	}
}

// The API's selector query over 1,000 pods, for each kind of metric.
func BenchmarkAggregate1000Pods(b *testing.B) {
	s := newStore(b)
	var keys []types.NamespacedName
	for i := range 1000 {
		name := "p" + string(rune('a'+i%26)) + string(rune('a'+i/26%26)) + string(rune('a'+i/676))
		keys = append(keys, podKey(name))
		for sec := 0; sec <= 35; sec++ {
			n := float64(sec)
			observe(b, s, name, epoch.Add(time.Duration(sec)*time.Second), sample{waiting: 1, prompt: n, ttft: []float64{n, n, n, n}})
		}
	}
	now := epoch.Add(35 * time.Second)
	for _, name := range []string{"requests_waiting", "prompt_tokens_per_second", "time_to_first_token_seconds_p90"} {
		b.Run(name, func(b *testing.B) {
			sn := served(b, name)
			b.ReportAllocs()
			for b.Loop() {
				if _, n := s.Aggregate(keys, sn, now); n != 1000 {
					b.Fatalf("%d pods", n)
				}
			}
		})
	}
}

// The scraper reads histograms only every few scrapes (HistogramsSkipped in
// between): quantiles then come from the histogram reads, timed by them,
// while rates keep their one-second resolution.
func TestHistogramsReadLessOftenThanCounters(t *testing.T) {
	s := newStore(t)
	for sec := 0; sec <= 100; sec++ {
		at := epoch.Add(time.Duration(sec) * time.Second)
		fast, slow := float64(min(sec, 60)*10), float64(max(0, sec-60)*10)
		sm := sample{prompt: float64(10 * sec), ttft: []float64{fast, fast, fast + slow, fast + slow}}
		v := sm.values(t)
		if sec%5 != 2 { // histograms read at 2, 7, 12, ... 97 s
			v.HistogramsSkipped = true
			v.Has[id(t, "time_to_first_token_seconds")] = false
		}
		s.Observe(scrape.Target{Key: podKey("a")}, at, v)
	}
	end := epoch.Add(100 * time.Second)
	q, ok := s.PodValue(podKey("a"), served(t, "time_to_first_token_seconds_p50"), end)
	if !ok || q.Value != 0.75 {
		t.Fatalf("p50 = %+v, %v; want 0.75 (all requests in the window were slow)", q, ok)
	}
	if want := epoch.Add(97 * time.Second); !q.Time.Equal(want) {
		t.Errorf("quantile time %s, want the last histogram read %s", q.Time, want)
	}
	if q.Window < 30*time.Second || q.Window > 35*time.Second {
		t.Errorf("quantile window %s, want 30-35s between histogram reads", q.Window)
	}
	r, ok := s.PodValue(podKey("a"), served(t, "prompt_tokens_per_second"), end)
	if !ok || r.Value != 10 || !r.Time.Equal(end) {
		t.Errorf("rate = %+v, %v; want 10/s at the last sample", r, ok)
	}
}
