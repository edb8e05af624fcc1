package catalogue

import (
	"math"
	"slices"
	"strconv"
	"strings"

	dto "github.com/prometheus/client_model/go"

	"github.com/capstan-dev/capstan/metricsadapter/exposition"
	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

// Values is what one metrics page yields, indexed by metric ID. Make one
// with NewValues and reuse it: Extract overwrites it without allocating once
// its histogram slices have grown.
type Values struct {
	// HistogramsSkipped is set when the page was read without its histogram
	// families (see Catalogue.Filter): the histograms' absence then says
	// nothing about the page.
	HistogramsSkipped bool
	// Has says whether the page had the metric.
	Has []bool
	// Scalar is a gauge's value or a counter's (for Rate metrics).
	Scalar []float64
	// Hist is a histogram metric's cumulative buckets.
	Hist []HistogramValue
	// Adapters is an Adapters metric's adapter names: distinct, none
	// empty, in the order the page lists them. They share memory with the
	// parsed page.
	Adapters [][]string
}

// HistogramValue is a classic Prometheus histogram: cumulative counts per
// upper bound, ascending, the last bound +Inf.
type HistogramValue struct {
	Bounds []float64
	Counts []float64
	Count  float64
	Sum    float64
}

// NewValues returns Values sized for the catalogue.
func (c *Catalogue) NewValues() *Values {
	n := len(c.metrics)
	return &Values{Has: make([]bool, n), Scalar: make([]float64, n), Hist: make([]HistogramValue, n), Adapters: make([][]string, n)}
}

// step reads one metric for one engine.
type step struct {
	metric  int
	kind    Kind
	sources []source
}

type source struct {
	sel             selector
	agg             Aggregation
	scale           float64
	minus, divideBy *selector
	adaptersLabel   string
	valueLabel      string
}

// selector finds series on a page. A name ending in _sum or _count also
// matches the sum or count of a histogram or summary family of the base
// name, which is how the text format folds them into one family.
type selector struct {
	name   string
	base   string // name without _sum/_count, or ""
	field  valueField
	labels []*dto.LabelPair
}

type valueField int

const (
	fieldValue valueField = iota
	fieldSum
	fieldCount
)

func compileSources(sources []Source, agg Aggregation) []source {
	out := make([]source, 0, len(sources))
	for _, s := range sources {
		cs := source{sel: compileSelector(s.Series), agg: agg, scale: 1, adaptersLabel: s.AdaptersLabel, valueLabel: s.ValueLabel}
		if s.Aggregation != "" {
			cs.agg = s.Aggregation
		}
		if s.Scale != nil {
			cs.scale = *s.Scale
		}
		if s.Minus != nil {
			sel := compileSelector(*s.Minus)
			cs.minus = &sel
		}
		if s.DivideBy != nil {
			sel := compileSelector(*s.DivideBy)
			cs.divideBy = &sel
		}
		out = append(out, cs)
	}
	return out
}

func compileSelector(s Series) selector {
	sel := selector{name: s.Series}
	if base, ok := strings.CutSuffix(s.Series, "_sum"); ok {
		sel.base, sel.field = base, fieldSum
	} else if base, ok := strings.CutSuffix(s.Series, "_count"); ok {
		sel.base, sel.field = base, fieldCount
	}
	for k, v := range s.Labels {
		sel.labels = append(sel.labels, &dto.LabelPair{Name: &k, Value: &v})
	}
	slices.SortFunc(sel.labels, func(a, b *dto.LabelPair) int { return strings.Compare(a.GetName(), b.GetName()) })
	return sel
}

// Filter returns the exposition filter that keeps what the engine's sources
// of the metrics include accepts read (every metric when include is nil):
// pages are filtered with it before parsing, which skips the many families
// nothing reads. A family read only for its newest series (by Adapters
// metrics and ValueLabel sources that select no labels) is one of the
// filter's Newest: only that series is parsed.
func (c *Catalogue) Filter(engine modelserver.Engine, include func(Metric) bool) *exposition.Filter {
	f := &exposition.Filter{Samples: map[string]bool{}, Histograms: map[string]bool{}, Newest: map[string]bool{}}
	for _, m := range c.metrics {
		if include != nil && !include(m) {
			continue
		}
		for _, s := range m.Engines[engine] {
			switch {
			case m.Kind == Histogram:
				f.Histograms[s.Series.Series] = true
				continue
			case (m.Kind == Adapters || s.ValueLabel != "") && len(s.Labels) == 0:
				f.Newest[s.Series.Series] = true
			default:
				f.Samples[s.Series.Series] = true
			}
			for _, ref := range []*Series{s.Minus, s.DivideBy} {
				if ref != nil {
					f.Samples[ref.Series] = true
				}
			}
		}
	}
	// A family another source reads whole is parsed whole.
	for name := range f.Newest {
		if f.Samples[name] {
			delete(f.Newest, name)
		}
	}
	return f
}

// Extract reads every metric the engine has sources for from a parsed page
// (as expfmt's TextParser returns it) into v, which must come from this
// catalogue's NewValues.
func (c *Catalogue) Extract(engine modelserver.Engine, families map[string]*dto.MetricFamily, v *Values) {
	clear(v.Has)
	for _, st := range c.plans[engine] {
		switch st.kind {
		case Histogram:
			v.Has[st.metric] = extractHistogram(st.sources, families, &v.Hist[st.metric])
		case Adapters:
			v.Adapters[st.metric], v.Has[st.metric] = extractAdapters(st.sources, families, v.Adapters[st.metric][:0])
		default:
			v.Scalar[st.metric], v.Has[st.metric] = extractScalar(st.sources, families)
		}
	}
}

func extractScalar(sources []source, families map[string]*dto.MetricFamily) (float64, bool) {
	for _, s := range sources {
		if s.valueLabel != "" {
			if val, ok := s.sel.newestLabelValue(families, s.valueLabel); ok {
				return val * s.scale, true
			}
			continue
		}
		val, ok := s.sel.aggregate(families, s.agg)
		if !ok {
			continue
		}
		if s.minus != nil {
			m, ok := s.minus.aggregate(families, s.agg)
			if !ok {
				continue
			}
			val -= m
		}
		if s.divideBy != nil {
			d, ok := s.divideBy.aggregate(families, s.agg)
			if !ok || d == 0 {
				continue
			}
			val /= d
		}
		return val * s.scale, true
	}
	return 0, false
}

// aggregate combines the finite values of the matching series.
func (sel *selector) aggregate(families map[string]*dto.MetricFamily, agg Aggregation) (float64, bool) {
	fam, field := families[sel.name], fieldValue
	if fam == nil && sel.base != "" {
		fam, field = families[sel.base], sel.field
	}
	if fam == nil {
		return 0, false
	}
	var acc float64
	n := 0
	for _, m := range fam.Metric {
		if !matches(m, sel.labels) {
			continue
		}
		x, ok := scalar(fam.GetType(), field, m)
		if !ok {
			continue
		}
		switch {
		case n == 0:
			acc = x
		case agg == Max:
			acc = max(acc, x)
		case agg == Min:
			acc = min(acc, x)
		default: // sum, avg
			acc += x
		}
		n++
	}
	if n == 0 {
		return 0, false
	}
	if agg == Avg {
		acc /= float64(n)
	}
	return acc, true
}

// newest returns the matching series with the largest finite value (the
// first of equals), or nil.
func (sel *selector) newest(families map[string]*dto.MetricFamily) *dto.Metric {
	fam := families[sel.name]
	if fam == nil {
		return nil
	}
	var newest *dto.Metric
	var at float64
	for _, m := range fam.Metric {
		if !matches(m, sel.labels) {
			continue
		}
		if x, ok := scalar(fam.GetType(), fieldValue, m); ok && (newest == nil || x > at) {
			newest, at = m, x
		}
	}
	return newest
}

// newestLabel returns the value of a label of the newest series.
func (sel *selector) newestLabel(families map[string]*dto.MetricFamily, label string) (string, bool) {
	newest := sel.newest(families)
	if newest == nil {
		return "", false
	}
	i := slices.IndexFunc(newest.Label, func(l *dto.LabelPair) bool { return l.GetName() == label })
	if i < 0 {
		return "", false
	}
	return newest.Label[i].GetValue(), true
}

// newestLabelValue reads a label of the newest series as a finite number.
func (sel *selector) newestLabelValue(families map[string]*dto.MetricFamily, label string) (float64, bool) {
	s, ok := sel.newestLabel(families, label)
	if !ok {
		return 0, false
	}
	x, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
	if err != nil || math.IsNaN(x) || math.IsInf(x, 0) {
		return 0, false
	}
	return x, true
}

// extractAdapters reads the adapters the first source present lists, from
// its newest series, into names. More than MaxAdapters names, or one longer
// than MaxAdapterNameLength, give no value.
func extractAdapters(sources []source, families map[string]*dto.MetricFamily, names []string) ([]string, bool) {
	for _, s := range sources {
		list, ok := s.sel.newestLabel(families, s.adaptersLabel)
		if !ok {
			continue
		}
		// Repeats count against the bound, which keeps the work on a
		// hostile label linear in its length.
		listed := 0
		for name := range strings.SplitSeq(list, ",") {
			if name = strings.TrimSpace(name); name == "" {
				continue
			}
			if listed++; listed > MaxAdapters || len(name) > MaxAdapterNameLength {
				return names[:0], false
			}
			if !slices.Contains(names, name) {
				names = append(names, name)
			}
		}
		return names, true
	}
	return names, false
}

func scalar(t dto.MetricType, field valueField, m *dto.Metric) (float64, bool) {
	var x float64
	switch {
	case field == fieldValue && t == dto.MetricType_COUNTER:
		x = m.GetCounter().GetValue()
	case field == fieldValue && t == dto.MetricType_GAUGE:
		x = m.GetGauge().GetValue()
	case field == fieldValue && t == dto.MetricType_UNTYPED:
		x = m.GetUntyped().GetValue()
	case (t == dto.MetricType_HISTOGRAM || t == dto.MetricType_GAUGE_HISTOGRAM) && field == fieldSum:
		x = m.GetHistogram().GetSampleSum()
	case (t == dto.MetricType_HISTOGRAM || t == dto.MetricType_GAUGE_HISTOGRAM) && field == fieldCount:
		x = histogramCount(m.GetHistogram())
	case t == dto.MetricType_SUMMARY && field == fieldSum:
		x = m.GetSummary().GetSampleSum()
	case t == dto.MetricType_SUMMARY && field == fieldCount:
		x = float64(m.GetSummary().GetSampleCount())
	default:
		return 0, false
	}
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return 0, false
	}
	return x, true
}

func histogramCount(h *dto.Histogram) float64 {
	if h.SampleCountFloat != nil {
		return h.GetSampleCountFloat()
	}
	return float64(h.GetSampleCount())
}

func matches(m *dto.Metric, want []*dto.LabelPair) bool {
	for _, w := range want {
		found := false
		for _, l := range m.Label {
			if l.GetName() == w.GetName() {
				found = l.GetValue() == w.GetValue()
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// extractHistogram sums the matching histograms that share the first one's
// bucket bounds into out, scaled by the source's scale.
func extractHistogram(sources []source, families map[string]*dto.MetricFamily, out *HistogramValue) bool {
	for _, s := range sources {
		fam := families[s.sel.name]
		if fam == nil || (fam.GetType() != dto.MetricType_HISTOGRAM && fam.GetType() != dto.MetricType_GAUGE_HISTOGRAM) {
			continue
		}
		n := 0
		for _, m := range fam.Metric {
			h := m.GetHistogram()
			if h == nil || !matches(m, s.sel.labels) || len(h.Bucket) == 0 {
				continue
			}
			if n == 0 {
				readHistogram(h, s.scale, out)
			} else if !addHistogram(h, s.scale, out) {
				continue
			}
			n++
		}
		if n > 0 && validHistogram(out) {
			return true
		}
	}
	return false
}

func bucketCount(b *dto.Bucket) float64 {
	if b.CumulativeCountFloat != nil {
		return b.GetCumulativeCountFloat()
	}
	return float64(b.GetCumulativeCount())
}

func readHistogram(h *dto.Histogram, scale float64, out *HistogramValue) {
	out.Bounds, out.Counts = out.Bounds[:0], out.Counts[:0]
	for _, b := range h.Bucket {
		out.Bounds = append(out.Bounds, b.GetUpperBound()*scale)
		out.Counts = append(out.Counts, bucketCount(b))
	}
	out.Count, out.Sum = histogramCount(h), h.GetSampleSum()*scale
	// The text format's +Inf bucket is the count; encoders may leave it out.
	if !math.IsInf(out.Bounds[len(out.Bounds)-1], 1) {
		out.Bounds = append(out.Bounds, math.Inf(1))
		out.Counts = append(out.Counts, out.Count)
	}
}

func addHistogram(h *dto.Histogram, scale float64, out *HistogramValue) bool {
	n := len(h.Bucket)
	withInf := math.IsInf(h.Bucket[n-1].GetUpperBound(), 1)
	if withInf && n != len(out.Bounds) || !withInf && n+1 != len(out.Bounds) {
		return false
	}
	for i, b := range h.Bucket {
		if b.GetUpperBound()*scale != out.Bounds[i] {
			return false
		}
	}
	for i, b := range h.Bucket {
		out.Counts[i] += bucketCount(b)
	}
	out.Count += histogramCount(h)
	out.Sum += h.GetSampleSum() * scale
	if !withInf {
		out.Counts[n] += histogramCount(h)
	}
	return true
}

// validHistogram rejects what no quantile can be computed from: bounds that
// do not ascend, counts that are not finite or that fall.
func validHistogram(h *HistogramValue) bool {
	for i := range h.Bounds {
		if math.IsNaN(h.Bounds[i]) || math.IsNaN(h.Counts[i]) || math.IsInf(h.Counts[i], 0) || h.Counts[i] < 0 {
			return false
		}
		if i > 0 && (h.Bounds[i] <= h.Bounds[i-1] || h.Counts[i] < h.Counts[i-1]) {
			return false
		}
	}
	return !math.IsNaN(h.Count) && !math.IsInf(h.Count, 0)
}
