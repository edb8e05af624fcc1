// Package scrape fetches inference engines' Prometheus metrics and hands
// each good sample, in engine-neutral terms, to an Observer. The metrics
// adapter drives it from a pod informer (package targets) and its store
// observes it; another program can drive and observe it the same way.
//
//	s, err := scrape.New(scrape.Options{Interval: time.Second, Observer: o})
//	if err != nil { ... }
//	go s.Run(ctx)                      // scrapes until ctx ends
//	s.Upsert(scrape.Target{Key: podKey, URL: "http://10.0.0.7:8000/metrics", Engine: modelserver.VLLM})
//	...
//	s.Remove(podKey)                   // or s.SetTargets(all) to replace the set
//
// TargetForPod builds a Target from a pod the way DESIGN.md says (the
// capstan.dev/engine label, the metrics port and path annotations). Every
// method is safe for concurrent use.
//
// What a scrape does: every target is fetched once per Interval with a
// deadline of Timeout, by at most Concurrency fetches at once, asking for the
// text format (OpenMetrics and gzip are read too), through Options.Transport
// (by default one kept-alive connection per target). Only the families of the
// catalogue metrics the observer wants are parsed (with expfmt): every gauge
// and counter on each scrape, the histograms, which are most of a page,
// every HistogramInterval. A page is bounded in bytes (MaxPageBytes), in
// series per family (MaxSeriesPerFamily; a family read only for its newest
// series, such as vllm:lora_requests_info, is cut down to it first) and in
// buckets per histogram (MaxBucketsPerHistogram), counted before anything
// of it is parsed. A
// failing target (refused, timed out, an HTTP error, a page over a bound,
// that does not parse or holds none of its engine's metrics) is
// retried with exponential backoff and jitter; the observer sees nothing of
// it until it recovers, and decides itself how old a sample may be.
package scrape

import (
	"bytes"
	"compress/flate"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/util/flowcontrol"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/exposition"
	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

// Target is one metrics endpoint to scrape.
type Target struct {
	// Key identifies the target, normally the pod's namespace and name.
	Key types.NamespacedName
	// URL is the full metrics URL, e.g. http://10.0.0.7:8000/metrics.
	URL string
	// Engine picks the metric mapping.
	Engine modelserver.Engine
}

// TargetForPod returns the target of a model-server pod: its pod IP, the
// metrics port and path per modelserver.MetricsEndpoint, and its engine. It
// does not check that the pod may be scraped (see modelserver.Scrapable).
func TargetForPod(pod *corev1.Pod) (Target, error) {
	engine, err := modelserver.EngineOf(pod)
	if err != nil {
		return Target{}, err
	}
	port, path, err := modelserver.MetricsEndpoint(pod)
	if err != nil {
		return Target{}, err
	}
	if pod.Status.PodIP == "" {
		return Target{}, fmt.Errorf("pod %s/%s has no IP", pod.Namespace, pod.Name)
	}
	return Target{
		Key:    types.NamespacedName{Namespace: pod.Namespace, Name: pod.Name},
		URL:    "http://" + net.JoinHostPort(pod.Status.PodIP, strconv.Itoa(int(port))) + path,
		Engine: engine,
	}, nil
}

// Observer receives every good sample, in the goroutine that scraped it.
// Observe must be quick and must not keep v, which is reused. After Forget
// for a key, Observe is not called for it again unless it is added anew.
type Observer interface {
	Observe(t Target, at time.Time, v *catalogue.Values)
	Forget(key types.NamespacedName)
}

// Options configure a Scraper. The zero value of each field means its
// default.
type Options struct {
	// Interval between scrapes of a target. Default 1s.
	Interval time.Duration
	// Timeout bounds one scrape, connecting included; it must be shorter
	// than Interval. Default 3/4 of Interval.
	Timeout time.Duration
	// Concurrency is how many scrapes may run at once. Default 64.
	Concurrency int
	// BackoffInitial and BackoffMax bound the delay before a failing
	// target is scraped again: it doubles from BackoffInitial (default
	// Interval) up to BackoffMax (default 30s), with up to 20% jitter, and
	// resets on success.
	BackoffInitial, BackoffMax time.Duration
	// HistogramInterval is how often a target's histogram families are
	// read, when the observer wants any: they are most of a page's lines
	// and of its parsing cost, and a store keeping a window of them needs
	// them no more often than it keeps them. Gauges and counters are read
	// on every scrape. At least Interval; default 5s.
	HistogramInterval time.Duration
	// MaxPageBytes caps a metrics page after decompression. Default 4 MiB.
	MaxPageBytes int64
	// MaxSeriesPerFamily caps the series of one family among those parsed
	// (see exposition.Limits); a page over it fails the scrape as
	// TooManySeries before the family is built. A family the catalogue
	// reads only for its newest series is one series, whatever the page
	// holds of it. Default 4096: an honest
	// engine's families have one series per model (and version, engine
	// core, finish reason), a few hundred at most even for vLLM running
	// data-parallel or a Triton with a large model repository.
	MaxSeriesPerFamily int
	// MaxBucketsPerHistogram caps the buckets of one histogram series;
	// a page over it fails as TooManyBuckets. Default 200: engines' own
	// histograms have 10 to 40.
	MaxBucketsPerHistogram int
	// Catalogue maps engine metrics to engine-neutral ones. Default
	// catalogue.Builtin().
	Catalogue *catalogue.Catalogue
	// Observer receives every good sample. Required.
	Observer Observer
	// Wants picks the catalogue metrics the observer needs; only their
	// families are parsed. Default: every metric.
	Wants func(catalogue.Metric) bool
	// Transport fetches the pages. Default: the scraper's own, which keeps
	// one idle connection per target and no goroutine for it. A transport
	// that decompresses on its own must be told not to (the scraper reads
	// gzip itself).
	Transport http.RoundTripper
	// Registerer, if set, gets the scraper's Prometheus metrics (see
	// metrics.go).
	Registerer prometheus.Registerer
	// UserAgent is sent with every scrape. Default "capstan-scraper".
	UserAgent string
}

// SetDefaults fills the unset fields of o.
func SetDefaults(o *Options) {
	if o.Interval == 0 {
		o.Interval = time.Second
	}
	if o.Timeout == 0 {
		o.Timeout = o.Interval * 3 / 4
	}
	if o.Concurrency == 0 {
		o.Concurrency = 64
	}
	if o.BackoffInitial == 0 {
		o.BackoffInitial = o.Interval
	}
	if o.BackoffMax == 0 {
		o.BackoffMax = max(30*time.Second, o.BackoffInitial)
	}
	if o.HistogramInterval == 0 {
		o.HistogramInterval = max(5*time.Second, o.Interval)
	}
	if o.MaxPageBytes == 0 {
		o.MaxPageBytes = 4 << 20
	}
	if o.MaxSeriesPerFamily == 0 {
		o.MaxSeriesPerFamily = 4096
	}
	if o.MaxBucketsPerHistogram == 0 {
		o.MaxBucketsPerHistogram = 200
	}
	if o.Catalogue == nil {
		o.Catalogue = catalogue.Builtin()
	}
	if o.UserAgent == "" {
		o.UserAgent = "capstan-scraper"
	}
}

// Validate checks defaulted options.
func Validate(path *field.Path, o *Options) error {
	var errs field.ErrorList
	positive := func(name string, d time.Duration) {
		if d <= 0 {
			errs = append(errs, field.Invalid(path.Child(name), d.String(), "must be positive"))
		}
	}
	positive("interval", o.Interval)
	positive("timeout", o.Timeout)
	positive("backoffInitial", o.BackoffInitial)
	if o.Timeout >= o.Interval {
		errs = append(errs, field.Invalid(path.Child("timeout"), o.Timeout.String(),
			fmt.Sprintf("must be shorter than the interval (%s), so a hanging target cannot delay its next scrape", o.Interval)))
	}
	if o.BackoffMax < o.BackoffInitial {
		errs = append(errs, field.Invalid(path.Child("backoffMax"), o.BackoffMax.String(),
			fmt.Sprintf("must be at least the initial backoff (%s)", o.BackoffInitial)))
	}
	if o.HistogramInterval < o.Interval {
		errs = append(errs, field.Invalid(path.Child("histogramInterval"), o.HistogramInterval.String(),
			fmt.Sprintf("must be at least the interval (%s)", o.Interval)))
	}
	if o.Concurrency < 1 {
		errs = append(errs, field.Invalid(path.Child("concurrency"), o.Concurrency, "must be at least 1"))
	}
	if o.Observer == nil {
		errs = append(errs, field.Required(path.Child("observer"), "a scraper without an observer scrapes for nobody"))
	}
	if o.MaxPageBytes < 1 {
		errs = append(errs, field.Invalid(path.Child("maxPageBytes"), o.MaxPageBytes, "must be at least 1"))
	}
	if o.MaxSeriesPerFamily < 1 {
		errs = append(errs, field.Invalid(path.Child("maxSeriesPerFamily"), o.MaxSeriesPerFamily, "must be at least 1"))
	}
	if o.MaxBucketsPerHistogram < 1 {
		errs = append(errs, field.Invalid(path.Child("maxBucketsPerHistogram"), o.MaxBucketsPerHistogram, "must be at least 1"))
	}
	return errs.ToAggregate()
}

// Scraper scrapes a changing set of targets. Create it with New, start it
// with Run; targets may be set before or while it runs.
type Scraper struct {
	opts    Options
	backoff *flowcontrol.Backoff
	filters map[modelserver.Engine]filters
	metrics *metrics
	logger  klog.Logger
	// idle is the default transport, whose idle connections Run closes
	// once they outlive their target; nil with Options.Transport.
	idle *keepAlive

	mu      sync.RWMutex
	targets map[types.NamespacedName]*state
	queue   workqueue.TypedDelayingInterface[types.NamespacedName] // nil unless running
	started bool
}

// filters are an engine's page filters: what a scrape parses of the
// metrics the observer wants.
type filters struct {
	scalars *exposition.Filter // the gauges and counters
	all     *exposition.Filter // and the histograms
}

// state is one target's scraping state. Its target never changes: a target
// whose URL or engine changes gets a new state.
type state struct {
	target Target
	// req is the scrape request, built once; each scrape gives it its
	// context.
	req *http.Request
	// sampledAt is when the last good sample was taken (unix
	// nanoseconds, 0 before the first).
	sampledAt atomic.Int64
	// Operations data, for metrics and logs.
	scrapes  [numResults]atomic.Int64
	lastNano atomic.Int64 // duration of the last scrape
	up       atomic.Bool
	failing  atomic.Int64 // consecutive failures
	// histogramsAt is when the target's histograms were last read (unix
	// nanoseconds). Only the one worker scraping the target uses it.
	histogramsAt atomic.Int64
}

// New returns a scraper with opts, defaulted and validated.
func New(opts Options) (*Scraper, error) {
	SetDefaults(&opts)
	if err := Validate(field.NewPath("scrape"), &opts); err != nil {
		return nil, err
	}
	s := &Scraper{
		opts:    opts,
		backoff: flowcontrol.NewBackOffWithJitter(opts.BackoffInitial, opts.BackoffMax, 0.2),
		filters: map[modelserver.Engine]filters{},
		targets: map[types.NamespacedName]*state{},
		logger:  klog.Background(),
	}
	if s.opts.Transport == nil {
		s.idle = newKeepAlive()
		s.opts.Transport = s.idle
	}
	c := opts.Catalogue
	wants := opts.Wants
	if wants == nil {
		wants = func(catalogue.Metric) bool { return true }
	}
	scalars := func(m catalogue.Metric) bool { return m.Kind != catalogue.Histogram && wants(m) }
	for _, e := range modelserver.Engines {
		s.filters[e] = filters{scalars: c.Filter(e, scalars), all: c.Filter(e, wants)}
	}
	if opts.Registerer != nil {
		m, err := newMetrics(s, opts.Registerer)
		if err != nil {
			return nil, err
		}
		s.metrics = m
	}
	return s, nil
}

// SetTargets replaces the whole set of targets: targets not in ts are
// removed, new ones added, changed ones (URL or engine) restarted.
func (s *Scraper) SetTargets(ts []Target) {
	keep := make(map[types.NamespacedName]bool, len(ts))
	for _, t := range ts {
		keep[t.Key] = true
		s.Upsert(t)
	}
	s.mu.RLock()
	var gone []types.NamespacedName
	for key := range s.targets {
		if !keep[key] {
			gone = append(gone, key)
		}
	}
	s.mu.RUnlock()
	for _, key := range gone {
		s.Remove(key)
	}
}

// Upsert adds a target, or replaces the one with the same key if its URL or
// engine changed (its samples are then dropped: they describe another
// endpoint). An unchanged target is left alone.
func (s *Scraper) Upsert(t Target) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if old, ok := s.targets[t.Key]; ok {
		if old.target == t {
			return
		}
		s.forgetLocked(t.Key)
	}
	st := &state{target: t, req: s.request(t)}
	s.targets[t.Key] = st
	if s.queue != nil {
		// Spread new targets over an interval rather than scraping a
		// whole fleet in the same instant.
		s.queue.AddAfter(t.Key, rand.N(s.opts.Interval))
	}
}

// Remove stops scraping a target and forgets its samples at once.
func (s *Scraper) Remove(key types.NamespacedName) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.targets[key]; ok {
		s.forgetLocked(key)
	}
}

func (s *Scraper) forgetLocked(key types.NamespacedName) {
	delete(s.targets, key)
	s.backoff.DeleteEntry(key.String())
	s.opts.Observer.Forget(key)
}

// request returns the request that scrapes t, or nil when its URL is not
// one (every scrape of it then fails, saying why).
func (s *Scraper) request(t Target) *http.Request {
	req, err := http.NewRequest(http.MethodGet, t.URL, nil)
	if err != nil {
		return nil
	}
	req.Header.Set("Accept", exposition.Accept)
	req.Header.Set("User-Agent", s.opts.UserAgent)
	return req
}

// Run scrapes until ctx ends, then waits for scrapes in flight to stop. It
// may be called once.
func (s *Scraper) Run(ctx context.Context) error {
	s.logger = klog.FromContext(ctx).WithValues("component", "scraper")
	queue := workqueue.NewTypedDelayingQueueWithConfig(workqueue.TypedDelayingQueueConfig[types.NamespacedName]{Logger: &s.logger})
	s.mu.Lock()
	if s.started {
		s.mu.Unlock()
		queue.ShutDown()
		return errors.New("scrape: Run called twice")
	}
	s.started, s.queue = true, queue
	for key := range s.targets {
		queue.AddAfter(key, rand.N(s.opts.Interval))
	}
	s.mu.Unlock()

	var wg sync.WaitGroup
	for range s.opts.Concurrency {
		wg.Go(func() { s.work(ctx, queue) })
	}
	if s.idle != nil {
		// Long enough to be reused by the next scrape, short enough
		// that a gone pod's connection does not linger.
		wg.Go(func() {
			wait.UntilWithContext(ctx, func(context.Context) { s.idle.closeIdle(3 * s.opts.Interval) }, s.opts.Interval)
			s.idle.closeIdle(0)
		})
	}
	// Forget the backoff of targets that recovered long ago.
	wg.Go(func() { wait.UntilWithContext(ctx, func(context.Context) { s.backoff.GC() }, time.Minute) })
	<-ctx.Done()
	queue.ShutDown()
	s.mu.Lock()
	s.queue = nil
	s.mu.Unlock()
	wg.Wait()
	return nil
}

// worker holds what one scraping goroutine reuses from page to page.
type worker struct {
	body   bytes.Buffer
	gzip   *gzip.Reader
	parser exposition.Parser
	values *catalogue.Values
}

// keepPageBytes is the largest page buffer a worker keeps between scrapes:
// one grown for an unusually large page is dropped after it, so that one
// such page does not pin MaxPageBytes per worker for ever. Engines' pages
// are tens of KiB.
const keepPageBytes = 256 << 10

func (s *Scraper) newWorker() *worker {
	w := &worker{values: s.opts.Catalogue.NewValues()}
	w.parser.Limits = exposition.Limits{
		MaxSeriesPerFamily:     s.opts.MaxSeriesPerFamily,
		MaxBucketsPerHistogram: s.opts.MaxBucketsPerHistogram,
	}
	return w
}

func (s *Scraper) work(ctx context.Context, queue workqueue.TypedDelayingInterface[types.NamespacedName]) {
	w := s.newWorker()
	for {
		key, shutdown := queue.Get()
		if shutdown {
			return
		}
		s.mu.RLock()
		st := s.targets[key]
		s.mu.RUnlock()
		if st != nil {
			next := s.scrape(ctx, w, st)
			s.mu.RLock()
			// Rescheduled only while the target is still the same one:
			// a removed target's key may have been queued again by a
			// new Upsert.
			if s.targets[key] == st && s.queue != nil {
				s.queue.AddAfter(key, next)
			}
			s.mu.RUnlock()
		}
		queue.Done(key)
	}
}

// scrape fetches, parses and records one page, and returns when the target
// is due next.
func (s *Scraper) scrape(ctx context.Context, w *worker, st *state) time.Duration {
	start := time.Now()
	f := s.filters[st.target.Engine]
	filter, skipped := f.scalars, true
	if start.Sub(time.Unix(0, st.histogramsAt.Load())) >= s.opts.HistogramInterval {
		filter, skipped = f.all, false
	}
	at, result, err := s.fetch(ctx, w, st, filter)
	if w.body.Cap() > keepPageBytes {
		w.body = bytes.Buffer{}
	}
	w.values.HistogramsSkipped = skipped
	elapsed := time.Since(start)
	st.lastNano.Store(int64(elapsed))
	st.scrapes[result].Add(1)
	if s.metrics != nil {
		s.metrics.observe(result, elapsed)
	}
	logger := s.logger.WithValues("pod", st.target.Key, "url", st.target.URL)
	id := st.target.Key.String()
	if result != Success {
		if ctx.Err() != nil {
			return 0 // shutting down
		}
		s.backoff.Next(id, start)
		delay := max(s.backoff.Get(id), s.opts.Interval)
		if n := st.failing.Add(1); n == 1 {
			logger.Info("Scrape failing; keeping the last good sample until it is too old", "reason", result, "err", err, "retryIn", delay)
		} else {
			logger.V(4).Info("Scrape failed", "reason", result, "err", err, "failures", n, "retryIn", delay)
		}
		st.up.Store(false)
		return delay
	}
	if n := st.failing.Swap(0); n > 0 {
		logger.Info("Scrape recovered", "failures", n)
		s.backoff.Reset(id)
	}
	if !skipped {
		st.histogramsAt.Store(at.UnixNano())
	}
	st.up.Store(true)
	s.mu.RLock()
	// Observed only while the target is current, so that nothing is
	// observed for a key after Remove has forgotten it.
	if s.targets[st.target.Key] == st {
		st.sampledAt.Store(at.UnixNano())
		s.opts.Observer.Observe(st.target, at, w.values)
	}
	s.mu.RUnlock()
	return max(0, s.opts.Interval-elapsed)
}

// Result is the outcome of one scrape.
type Result int

const (
	// Success: the page parsed and held some of the engine's metrics.
	Success Result = iota
	// Refused: the connection was refused.
	Refused
	// Timeout: the scrape did not finish within Options.Timeout.
	Timeout
	// NetworkError: any other transport failure.
	NetworkError
	// HTTPError: a status other than 200.
	HTTPError
	// TooLarge: the page exceeded Options.MaxPageBytes.
	TooLarge
	// ParseError: the page is not a Prometheus text or OpenMetrics page.
	ParseError
	// Unmapped: the page parsed but held none of the engine's metrics
	// (a wrong capstan.dev/engine label, or an engine renamed them all).
	Unmapped
	// TooManySeries: a family the scraper reads had more than
	// Options.MaxSeriesPerFamily series.
	TooManySeries
	// TooManyBuckets: a histogram the scraper reads had a series of more
	// than Options.MaxBucketsPerHistogram buckets.
	TooManyBuckets
	numResults
)

var resultNames = [numResults]string{"success", "refused", "timeout", "network_error", "http_error", "too_large", "parse_error", "unmapped",
	"too_many_series", "too_many_buckets"}

func (r Result) String() string { return resultNames[r] }

// fetch gets and parses one page into w.values and returns when it was read.
// Pages are fetched without asking for compression: a page crosses the
// cluster network in microseconds, and compressing it every second costs the
// engine and the scraper more CPU than it saves (a gzip-encoded page is read
// all the same).
func (s *Scraper) fetch(ctx context.Context, w *worker, st *state, filter *exposition.Filter) (time.Time, Result, error) {
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	if st.req == nil {
		return time.Time{}, NetworkError, fmt.Errorf("%q is not a URL", st.target.URL)
	}
	if st.req.URL.Scheme != "http" {
		return time.Time{}, NetworkError, fmt.Errorf("URL scheme %q: metrics are scraped over plain HTTP", st.req.URL.Scheme)
	}
	resp, err := s.opts.Transport.RoundTrip(st.req.WithContext(ctx))
	if err != nil {
		return time.Time{}, transportResult(ctx, err), err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return time.Time{}, HTTPError, fmt.Errorf("HTTP status %s", resp.Status)
	}
	format, err := exposition.FormatOf(resp.Header.Get("Content-Type"))
	if err != nil {
		return time.Time{}, ParseError, err
	}
	body := io.Reader(resp.Body)
	if resp.Header.Get("Content-Encoding") == "gzip" {
		// Not asked for, but some servers compress anyway.
		if w.gzip == nil {
			w.gzip = new(gzip.Reader)
		}
		if err := w.gzip.Reset(resp.Body); err != nil {
			return time.Time{}, readResult(ctx, err), fmt.Errorf("reading the gzip page: %w", err)
		}
		body = w.gzip
	}
	w.body.Reset()
	n, err := w.body.ReadFrom(io.LimitReader(body, s.opts.MaxPageBytes+1))
	if err != nil {
		return time.Time{}, readResult(ctx, err), fmt.Errorf("reading the page: %w", err)
	}
	if n > s.opts.MaxPageBytes {
		return time.Time{}, TooLarge, fmt.Errorf("page larger than %d bytes", s.opts.MaxPageBytes)
	}
	at := time.Now()
	if result, err := w.read(s.opts.Catalogue, st.target.Engine, format, w.body.Bytes(), filter); result != Success {
		return time.Time{}, result, err
	}
	return at, Success, nil
}

// read parses what the filter keeps of a page and maps it into w.values.
func (w *worker) read(c *catalogue.Catalogue, engine modelserver.Engine, format exposition.Format, page []byte, filter *exposition.Filter) (Result, error) {
	families, err := w.parser.Parse(format, page, filter)
	switch {
	case errors.Is(err, exposition.ErrTooManySeries):
		return TooManySeries, err
	case errors.Is(err, exposition.ErrTooManyBuckets):
		return TooManyBuckets, err
	case err != nil:
		return ParseError, err
	}
	c.Extract(engine, families, w.values)
	for _, has := range w.values.Has {
		if has {
			return Success, nil
		}
	}
	return Unmapped, fmt.Errorf("the page has none of the %s metrics the catalogue maps", engine)
}

// readResult classifies an error reading a body: a corrupt gzip stream is a
// bad page, anything else a transport failure.
func readResult(ctx context.Context, err error) Result {
	var corrupt flate.CorruptInputError
	if errors.Is(err, gzip.ErrHeader) || errors.Is(err, gzip.ErrChecksum) || errors.As(err, &corrupt) {
		return ParseError
	}
	return transportResult(ctx, err)
}

func transportResult(ctx context.Context, err error) Result {
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded), errors.Is(err, context.DeadlineExceeded):
		return Timeout
	case errors.Is(err, syscall.ECONNREFUSED):
		return Refused
	}
	var netErr net.Error
	if errors.As(err, &netErr) && netErr.Timeout() {
		return Timeout
	}
	return NetworkError
}
