// Package store keeps each pod's recent samples, as the scraper delivers
// them, and answers what the metrics API serves: a gauge's last value, a
// counter's per-second rate over a window and a histogram's quantiles over a
// window, for one pod or pooled over several; and, for an Adapters metric
// (vLLM's LoRA adapters), how many pods list each adapter.
//
// Only samples younger than MaxAge are served, each with its real timestamp
// and the real span of its window. Counters and histograms are kept
// reset-corrected (a restarted engine's counters start again from zero, and
// the store adds what they had before), so a rate or quantile over a window
// that spans a restart is still right. To bound memory, the history is a
// checkpoint every Window/6, and a rate is taken from the newest checkpoint at
// least a window old: its span is between Window and Window + Window/6.
package store

import (
	"encoding/binary"
	"math"
	"slices"
	"strings"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation/field"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/scrape"
)

// checkpointsPerWindow is how finely the history of a window is kept.
const checkpointsPerWindow = 6

// Options configure a Store.
type Options struct {
	// Window is the span rates and quantiles are computed over. Default
	// 30s.
	Window time.Duration
	// MaxAge is how old a pod's last sample may be and still be served.
	// Default 5s.
	MaxAge time.Duration
	// Catalogue is the one the scraper maps pages with. Default
	// catalogue.Builtin().
	Catalogue *catalogue.Catalogue
}

// SetDefaults fills the unset fields of o.
func SetDefaults(o *Options) {
	if o.Window == 0 {
		o.Window = 30 * time.Second
	}
	if o.MaxAge == 0 {
		o.MaxAge = 5 * time.Second
	}
	if o.Catalogue == nil {
		o.Catalogue = catalogue.Builtin()
	}
}

// Validate checks defaulted options.
func Validate(path *field.Path, o *Options) error {
	var errs field.ErrorList
	if o.Window < time.Second {
		errs = append(errs, field.Invalid(path.Child("window"), o.Window.String(), "must be at least 1s"))
	}
	if o.MaxAge <= 0 {
		errs = append(errs, field.Invalid(path.Child("maxAge"), o.MaxAge.String(), "must be positive"))
	}
	return errs.ToAggregate()
}

// Store is a scrape.Observer that keeps the samples of every pod.
type Store struct {
	cat    *catalogue.Catalogue
	window time.Duration
	step   time.Duration
	maxAge time.Duration

	mu   sync.RWMutex // guards pods (the map); each pod has its own lock
	pods map[types.NamespacedName]*pod

	layoutsMu sync.Mutex
	layouts   map[string]*layout // shared by pods, keyed by their bounds (see intern)
}

// maxLayouts bounds the interned layouts; a fleet has a handful (one per
// engine version), so more means bounds that keep changing, and the cache
// starts afresh rather than grow.
const maxLayouts = 256

var _ scrape.Observer = &Store{}

// New returns an empty store.
func New(opts Options) (*Store, error) {
	SetDefaults(&opts)
	if err := Validate(field.NewPath("store"), &opts); err != nil {
		return nil, err
	}
	return &Store{cat: opts.Catalogue, window: opts.Window, step: opts.Window / checkpointsPerWindow,
		maxAge: opts.MaxAge, pods: map[types.NamespacedName]*pod{}, layouts: map[string]*layout{}}, nil
}

// pod is one pod's samples.
type pod struct {
	mu sync.Mutex

	// gauges and has hold the latest sample's gauge values by metric ID,
	// adapters its Adapters metrics' names.
	gauges   []float64
	adapters [][]string
	has      []bool

	// Cumulative series (counters and histograms), laid out in one vector
	// by layout.
	layout *layout
	raw    []float64 // latest raw values, for reset detection
	cur    latest
	ring   []checkpoint // oldest first, at least step apart
	// since is what each series grew by from the newest checkpoint to the
	// latest sample; it becomes the next checkpoint's growth.
	since []float32
}

// layout is where each cumulative series is in a pod's vectors: a counter
// takes one slot, a histogram one per bucket (its count is the +Inf
// bucket's, and its sum is not served). It depends only on the histogram
// bounds the pod's engine reports, so pods with the same bounds share one
// (see Store.intern): with thousands of pods, per-pod copies of the maps and
// bounds were a tenth of the store.
type layout struct {
	slots  map[int]slot
	bounds map[int][]float64 // histogram bucket bounds by metric ID
	size   int
}

// slot is where a series is in a checkpoint: v[off:off+n], present[idx].
type slot struct{ off, n, idx int }

// latest is when the latest sample was taken, when its histograms were read
// (they are not read on every scrape, see scrape.Options.HistogramInterval)
// and which series it had.
type latest struct {
	t, histAt time.Time
	present   []bool // by slot
}

// checkpoint is the history at one time: when it was taken, when its
// histograms were read, which series it had, and how much each
// reset-corrected series grew since the checkpoint before it (for the
// oldest, since nothing: unused). The growth over one step fits a float32
// (counts are exact up to 2^24 per step, anything else within a relative
// 6e-8), half the size of a cumulative value; with thousands of pods the
// history is most of the store's memory.
type checkpoint struct {
	t, histAt time.Time
	grew      []float32
	present   []bool // by slot
}

// Observe implements scrape.Observer.
func (s *Store) Observe(t scrape.Target, at time.Time, v *catalogue.Values) {
	s.mu.RLock()
	p := s.pods[t.Key]
	s.mu.RUnlock()
	if p == nil {
		s.mu.Lock()
		if p = s.pods[t.Key]; p == nil {
			n := len(s.cat.Metrics())
			p = &pod{gauges: make([]float64, n), adapters: make([][]string, n), has: make([]bool, n)}
			s.pods[t.Key] = p
		}
		s.mu.Unlock()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	s.record(p, at, v)
}

// Forget implements scrape.Observer.
func (s *Store) Forget(key types.NamespacedName) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.pods, key)
}

// Len returns how many pods the store holds.
func (s *Store) Len() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.pods)
}

func (s *Store) record(p *pod, at time.Time, v *catalogue.Values) {
	metrics := s.cat.Metrics()
	for id, m := range metrics {
		p.has[id] = v.Has[id] && (m.Kind == catalogue.Gauge || m.Kind == catalogue.Adapters)
		switch {
		case !p.has[id]:
			continue
		case m.Kind == catalogue.Gauge:
			p.gauges[id] = v.Scalar[id]
		case !slices.Equal(p.adapters[id], v.Adapters[id]):
			// Copied, so that the pod does not keep the page's labels;
			// a set that did not change costs nothing.
			p.adapters[id] = p.adapters[id][:0]
			for _, a := range v.Adapters[id] {
				p.adapters[id] = append(p.adapters[id], strings.Clone(a))
			}
		}
	}
	// A pod silent for longer than MaxAge starts a new history: a rate
	// across the gap would describe a time no sample saw.
	if !p.cur.t.IsZero() && at.Sub(p.cur.t) > s.maxAge || !s.sameLayout(p, v) {
		s.relayout(p, v)
	}
	cur := &p.cur
	cur.t = at
	if !v.HistogramsSkipped {
		cur.histAt = at
	}
	for id, sl := range p.layout.slots {
		kind := metrics[id].Kind
		if kind == catalogue.Histogram && v.HistogramsSkipped {
			continue // not read this time: the last values stand
		}
		if !v.Has[id] {
			cur.present[sl.idx] = false
			continue
		}
		// A series grows by its raw value's increase, or, after a reset
		// (the engine restarted and counts from zero again), by the whole
		// new raw value.
		raw := p.raw[sl.off : sl.off+sl.n]
		since := p.since[sl.off : sl.off+sl.n]
		if kind == catalogue.Rate {
			x := v.Scalar[id]
			since[0] += float32(increase(x, raw[0], x < raw[0]))
			raw[0] = x
		} else {
			counts := v.Hist[id].Counts
			reset := false
			for i, c := range counts {
				reset = reset || c < raw[i]
			}
			for i, c := range counts {
				since[i] += float32(increase(c, raw[i], reset))
			}
			copy(raw, counts)
		}
		cur.present[sl.idx] = true
	}
	if len(p.ring) == 0 || at.Sub(p.ring[len(p.ring)-1].t) >= s.step {
		// Drop the checkpoints no query needs (all but the newest one at
		// least a window old), recycling one's vectors: the new
		// checkpoint takes the growth so far, and growth starts again
		// from zero.
		var c checkpoint
		for len(p.ring) >= 2 && at.Sub(p.ring[1].t) >= s.window {
			c = p.ring[0]
			p.ring = append(p.ring[:0], p.ring[1:]...)
		}
		if len(c.grew) != p.layout.size || len(c.present) != len(p.layout.slots) {
			c = checkpoint{grew: make([]float32, p.layout.size), present: make([]bool, len(p.layout.slots))}
		}
		clear(c.grew)
		c.grew, p.since = p.since, c.grew
		c.t, c.histAt = at, cur.histAt
		copy(c.present, cur.present)
		p.ring = append(p.ring, c)
	}
}

// sameLayout reports whether v's histograms have the bounds p laid out for.
func (s *Store) sameLayout(p *pod, v *catalogue.Values) bool {
	if p.layout == nil {
		return false
	}
	if v.HistogramsSkipped {
		return true
	}
	for id, b := range p.layout.bounds {
		if v.Has[id] && !slices.Equal(b, v.Hist[id].Bounds) {
			return false
		}
	}
	for id, m := range s.cat.Metrics() {
		if m.Kind == catalogue.Histogram && v.Has[id] && p.layout.bounds[id] == nil {
			return false
		}
	}
	return true
}

// increase is how much a cumulative series grew from prev to x: all of x
// after a reset.
func increase(x, prev float64, reset bool) float64 {
	if reset {
		return x
	}
	return x - prev
}

// relayout starts p's cumulative history afresh, for v's histogram bounds
// (or, when v did not read histograms, the bounds p had).
func (s *Store) relayout(p *pod, v *catalogue.Values) {
	bounds := map[int][]float64{}
	for id, m := range s.cat.Metrics() {
		if m.Kind != catalogue.Histogram {
			continue
		}
		switch {
		case !v.HistogramsSkipped && v.Has[id]:
			bounds[id] = v.Hist[id].Bounds
		case v.HistogramsSkipped && p.layout != nil && p.layout.bounds[id] != nil:
			bounds[id] = p.layout.bounds[id]
		}
	}
	p.layout = s.intern(bounds)
	size := p.layout.size
	p.raw = make([]float64, size)
	p.cur = latest{present: make([]bool, len(p.layout.slots))}
	p.since = make([]float32, size)
	p.ring = p.ring[:0]
}

// intern returns the shared layout for these histogram bounds (which it
// does not keep: it copies them).
func (s *Store) intern(bounds map[int][]float64) *layout {
	metrics := s.cat.Metrics()
	// The key lists every laid-out metric in ID order with its bounds.
	var key []byte
	for id, m := range metrics {
		if b, ok := bounds[id]; ok || m.Kind == catalogue.Rate {
			key = binary.AppendUvarint(key, uint64(id))
			key = binary.AppendUvarint(key, uint64(len(b)))
			for _, x := range b {
				key = binary.LittleEndian.AppendUint64(key, math.Float64bits(x))
			}
		}
	}
	s.layoutsMu.Lock()
	defer s.layoutsMu.Unlock()
	if l, ok := s.layouts[string(key)]; ok {
		return l
	}
	l := &layout{slots: map[int]slot{}, bounds: map[int][]float64{}}
	for id, m := range metrics {
		n := 1
		if m.Kind == catalogue.Histogram {
			b, ok := bounds[id]
			if !ok {
				continue
			}
			l.bounds[id] = slices.Clone(b)
			n = len(b)
		} else if m.Kind != catalogue.Rate {
			continue
		}
		l.slots[id] = slot{l.size, n, len(l.slots)}
		l.size += n
	}
	if len(s.layouts) >= maxLayouts {
		clear(s.layouts)
	}
	s.layouts[string(key)] = l
	return l
}

// Value is a served value with its timestamp and window.
type Value struct {
	Value float64
	// Time is when the (latest) sample behind the value was taken.
	Time time.Time
	// Window is the span of samples a rate or quantile covers; 0 for a
	// gauge.
	Window time.Duration
}

// PodValue returns a pod's value of a served name, if the pod has a fresh
// sample that yields one.
func (s *Store) PodValue(key types.NamespacedName, name catalogue.ServedName, now time.Time) (Value, bool) {
	var buf []float64
	return s.podValue(key, name, now, &buf)
}

// podValue is PodValue with a scratch buffer for window deltas.
func (s *Store) podValue(key types.NamespacedName, name catalogue.ServedName, now time.Time, buf *[]float64) (Value, bool) {
	s.mu.RLock()
	p := s.pods[key]
	s.mu.RUnlock()
	if p == nil {
		return Value{}, false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if now.Sub(p.cur.t) > s.maxAge {
		return Value{}, false
	}
	m := s.cat.Metrics()[name.Metric]
	switch m.Kind {
	case catalogue.Adapters:
		return Value{}, false // per adapter: see AdapterPods
	case catalogue.Gauge:
		if !p.has[name.Metric] {
			return Value{}, false
		}
		return Value{Value: p.gauges[name.Metric], Time: p.cur.t}, true
	case catalogue.Rate:
		d, w, ok := s.delta(p, name.Metric, false, buf)
		if !ok {
			return Value{}, false
		}
		return Value{Value: d[0] / w.Seconds(), Time: p.cur.t, Window: w}, true
	default:
		d, w, ok := s.delta(p, name.Metric, true, buf)
		if !ok {
			return Value{}, false
		}
		q, ok := Quantile(name.Quantile, p.layout.bounds[name.Metric], d)
		if !ok {
			return Value{}, false
		}
		return Value{Value: q, Time: p.cur.histAt, Window: w}, true
	}
}

// delta returns the increase of a cumulative series from the newest
// checkpoint at least a window before the latest sample (or the oldest one
// there is) to the latest sample, and the span between them. Histograms
// are timed by when they were read. The increase is written to *buf, grown
// as needed.
func (s *Store) delta(p *pod, id int, histogram bool, buf *[]float64) ([]float64, time.Duration, bool) {
	sl, ok := p.layout.slots[id]
	if !ok || !p.cur.present[sl.idx] {
		return nil, 0, false
	}
	when := func(c *checkpoint) time.Time { return c.t }
	end := p.cur.t
	if histogram {
		when = func(c *checkpoint) time.Time { return c.histAt }
		end = p.cur.histAt
	}
	base := -1
	for i := len(p.ring) - 1; i >= 0; i-- {
		c := &p.ring[i]
		if !when(c).Before(end) || !c.present[sl.idx] {
			continue
		}
		base = i
		if end.Sub(when(c)) >= s.window {
			break
		}
	}
	if base < 0 {
		return nil, 0, false
	}
	// What the checkpoints after the base grew by, and the growth since
	// the newest one.
	d := slices.Grow((*buf)[:0], sl.n)[:sl.n]
	*buf = d
	for i, g := range p.since[sl.off : sl.off+sl.n] {
		d[i] = float64(g)
	}
	for _, c := range p.ring[base+1:] {
		for i, g := range c.grew[sl.off : sl.off+sl.n] {
			d[i] += float64(g)
		}
	}
	return d, end.Sub(when(&p.ring[base])), true
}

// Aggregate pools a served name over pods: gauges and rates are summed over
// the pods that have a value; a histogram's quantile is taken from the
// pooled bucket increases of the pods whose buckets match the first one's.
// It returns the pooled value (timestamped with the oldest sample used and
// the shortest window), and how many pods contributed.
func (s *Store) Aggregate(keys []types.NamespacedName, name catalogue.ServedName, now time.Time) (Value, int) {
	m := s.cat.Metrics()[name.Metric]
	var out Value
	n := 0
	add := func(v Value) {
		if n == 0 || v.Time.Before(out.Time) {
			out.Time = v.Time
		}
		if n == 0 || v.Window < out.Window {
			out.Window = v.Window
		}
		n++
	}
	var buf []float64
	if m.Kind != catalogue.Histogram {
		for _, k := range keys {
			if v, ok := s.podValue(k, name, now, &buf); ok {
				out.Value += v.Value
				add(v)
			}
		}
		return out, n
	}
	var bounds, pooled []float64
	for _, k := range keys {
		s.mu.RLock()
		p := s.pods[k]
		s.mu.RUnlock()
		if p == nil {
			continue
		}
		p.mu.Lock()
		if now.Sub(p.cur.t) <= s.maxAge {
			if d, w, ok := s.delta(p, name.Metric, true, &buf); ok {
				b := p.layout.bounds[name.Metric]
				switch {
				case bounds == nil:
					bounds, pooled = b, slices.Clone(d)
					add(Value{Time: p.cur.histAt, Window: w})
				case slices.Equal(bounds, b):
					for i := range pooled {
						pooled[i] += d[i]
					}
					add(Value{Time: p.cur.histAt, Window: w})
				}
			}
		}
		p.mu.Unlock()
	}
	if n == 0 {
		return Value{}, 0
	}
	q, ok := Quantile(name.Quantile, bounds, pooled)
	if !ok {
		return Value{}, 0
	}
	out.Value = q
	return out, n
}

// AdapterPods is what an Adapters metric says about a set of pods.
type AdapterPods struct {
	// Pods counts, by adapter, the pods whose latest sample lists it.
	Pods map[string]int
	// Reporting is how many pods have a fresh sample of the metric; an
	// adapter listed by none of them has 0 pods.
	Reporting int
	// Time is the time of the oldest sample used.
	Time time.Time
}

// AdapterPods counts, for an Adapters metric, the pods among keys with a
// fresh sample that list each adapter.
func (s *Store) AdapterPods(keys []types.NamespacedName, id int, now time.Time) AdapterPods {
	out := AdapterPods{Pods: map[string]int{}}
	for _, k := range keys {
		s.mu.RLock()
		p := s.pods[k]
		s.mu.RUnlock()
		if p == nil {
			continue
		}
		p.mu.Lock()
		if now.Sub(p.cur.t) <= s.maxAge && p.has[id] {
			for _, a := range p.adapters[id] {
				out.Pods[a]++
			}
			if out.Reporting == 0 || p.cur.t.Before(out.Time) {
				out.Time = p.cur.t
			}
			out.Reporting++
		}
		p.mu.Unlock()
	}
	return out
}

// Quantile estimates the q-quantile of the observations counted in a
// classic histogram's cumulative buckets (the last bound +Inf), interpolating
// linearly within the bucket it falls in, the way Prometheus's
// histogram_quantile does. A quantile in the +Inf bucket is the highest
// finite bound. It is false when there are no observations.
func Quantile(q float64, bounds, counts []float64) (float64, bool) {
	n := len(counts)
	if n < 2 || len(bounds) != n || counts[n-1] <= 0 || math.IsNaN(q) {
		return 0, false
	}
	total := counts[n-1]
	rank := q * total
	b := 0
	for b < n-1 && counts[b] < rank {
		b++
	}
	if b == n-1 {
		return bounds[n-2], true
	}
	lower, below := 0.0, 0.0
	if b > 0 {
		lower, below = bounds[b-1], counts[b-1]
	} else if bounds[0] <= 0 {
		return bounds[0], true
	}
	inBucket := counts[b] - below
	if inBucket <= 0 {
		return bounds[b], true
	}
	return lower + (bounds[b]-lower)*((rank-below)/inBucket), true
}
