// Package catalogue holds the data that maps each inference engine's
// Prometheus metrics to the names Capstan serves: engine-neutral names such as
// requests_waiting or time_to_first_token_seconds_p90, and each engine's raw
// gauges under sanitized names. The mapping is data, not code: a built-in
// YAML document (builtin.yaml) that a user's file can extend or override, so
// an engine that renames a metric needs a line of YAML, not a release.
//
// A Catalogue is compiled once and is then read-only and safe for concurrent
// use. Extract turns one parsed metrics page into Values indexed by metric ID.
package catalogue

import (
	_ "embed"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/prometheus/common/model"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"sigs.k8s.io/yaml"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

//go:embed builtin.yaml
var builtinYAML []byte

// Names of the engine-neutral metrics every built-in engine mapping provides
// (kv_cache_usage: all but TGI, which exposes no cache usage).
const (
	RequestsRunning = "requests_running"
	RequestsWaiting = "requests_waiting"
	KVCacheUsage    = "kv_cache_usage"
)

// Names of the built-in metrics read from vLLM's vllm:lora_requests_info:
// the Adapters metrics, per LoRA adapter the pods on which it has running
// (waiting) requests (vLLM reports which adapters have requests, not how
// many), and the gauge of the adapters a batch can use at once (max_lora).
const (
	LoRAAdapterRunningPods = "lora_adapter_running_pods"
	LoRAAdapterWaitingPods = "lora_adapter_waiting_pods"
	LoRAMaxAdapters        = "lora_max_adapters"
)

// Kind says how a metric is read from an engine and served.
type Kind string

const (
	// Gauge serves the latest value of a gauge.
	Gauge Kind = "gauge"
	// Rate serves the per-second increase of a counter over the window,
	// counting through counter resets.
	Rate Kind = "rate"
	// Histogram serves quantiles of the observations made within the window,
	// from the difference of the histogram's buckets, as <name>_p50 and so on.
	Histogram Kind = "histogram"
	// Adapters reads the names of the adapters a label of a series lists,
	// comma separated, from the series with the largest value, as vLLM
	// reports its LoRA adapters: it sets a series per combination of
	// adapters to the time it saw it, and never removes one, so the newest
	// is the current one. Served per adapter (see the provider).
	Adapters Kind = "adapters"
)

// Bounds of what an Adapters metric reads from one page, which a pod
// serves: a label listing more adapters, or a name longer, gives the pod no
// value for the metric. vLLM lists the adapters with requests, a handful;
// its adapter names are model names.
const (
	MaxAdapters          = 128
	MaxAdapterNameLength = 128
)

// Aggregation combines the series of a page that match a source, such as one
// series per model or per data-parallel engine core.
type Aggregation string

const (
	Sum Aggregation = "sum"
	Avg Aggregation = "avg"
	Max Aggregation = "max"
	Min Aggregation = "min"
)

// DefaultQuantiles are served for a histogram that names none.
var DefaultQuantiles = []float64{0.5, 0.9, 0.99}

// File is the YAML form of a catalogue, built in or given by a user.
type File struct {
	// Metrics are the metrics served, each with its sources per engine.
	Metrics []Metric `json:"metrics,omitempty"`
	// Raw lists, per engine, gauges served under their own (sanitized)
	// names. Each is shorthand for a gauge Metric with one source.
	Raw map[modelserver.Engine][]RawGauge `json:"raw,omitempty"`
}

// Metric is one served metric.
type Metric struct {
	// Name is the served name: lower-case letters, digits and _. A
	// histogram is served as Name_p50 and so on, one name per quantile.
	Name string `json:"name"`
	// Kind is gauge, rate or histogram.
	Kind Kind `json:"kind,omitempty"`
	// Unit and Help document the metric.
	Unit string `json:"unit,omitempty"`
	Help string `json:"help,omitempty"`
	// Aggregation combines the matching series of one page, unless a
	// source says otherwise. Default sum. Histograms are always summed;
	// rates are summed or take the largest counter (max), for an engine that
	// counts one request in several series.
	Aggregation Aggregation `json:"aggregation,omitempty"`
	// Quantiles served for a histogram, each in (0, 1). Default
	// DefaultQuantiles.
	Quantiles []float64 `json:"quantiles,omitempty"`
	// Engines lists, per engine, where the metric comes from: the first
	// source present on a page wins.
	Engines map[modelserver.Engine][]Source `json:"engines,omitempty"`
}

// Series names series on a page: those of the family whose sample name is
// Series and whose labels include Labels. A histogram's _sum and _count can be
// named as series of their own (tgi_request_input_length_sum).
type Series struct {
	Series string            `json:"series"`
	Labels map[string]string `json:"labels,omitempty"`
}

// Source is where an engine exposes a metric.
type Source struct {
	Series `json:",inline"`
	// Scale multiplies values (for a histogram, its bucket bounds and sum):
	// 0.001 turns milliseconds into seconds. Default 1.
	Scale *float64 `json:"scale,omitempty"`
	// Minus (gauges only) subtracts another series.
	Minus *Series `json:"minus,omitempty"`
	// DivideBy (gauges only) divides by another series; a zero divisor
	// means no value.
	DivideBy *Series `json:"divideBy,omitempty"`
	// Aggregation overrides the metric's for this source.
	Aggregation Aggregation `json:"aggregation,omitempty"`
	// AdaptersLabel (Adapters metrics only, and required there) is the
	// label whose value lists the adapters, comma separated.
	AdaptersLabel string `json:"adaptersLabel,omitempty"`
	// ValueLabel (gauges only) reads the value from this label of the
	// newest series (the largest value) instead, as a number: an info
	// series carries its data in labels, as Adapters metrics read them.
	// Such a source is not aggregated and combines no other series.
	ValueLabel string `json:"valueLabel,omitempty"`
}

// RawGauge is an engine gauge served under its own name.
type RawGauge struct {
	Series `json:",inline"`
	// Name defaults to Series with every character other than letters,
	// digits and _ replaced by _.
	Name string `json:"name,omitempty"`
	// Aggregation combines the matching series; default sum.
	Aggregation Aggregation `json:"aggregation,omitempty"`
}

// ServedName is one name the adapter serves, and what it is computed from.
type ServedName struct {
	// Name is what a client asks for.
	Name string
	// Metric is the ID of the metric it is computed from.
	Metric int
	// Quantile is set for a histogram's quantiles.
	Quantile float64
}

// Catalogue is a compiled, validated catalogue.
type Catalogue struct {
	metrics []Metric
	served  []ServedName
	byName  map[string]int // served name -> index in served
	ids     map[string]int // metric name -> ID
	plans   map[modelserver.Engine][]step
}

// Builtin returns the built-in catalogue.
func Builtin() *Catalogue {
	c, err := Load(nil)
	if err != nil {
		panic(fmt.Sprintf("the built-in metric catalogue is invalid: %v", err))
	}
	return c
}

// Load compiles the built-in catalogue merged with an override document
// (YAML; nil for none). Unknown fields are errors, so a misspelt key is
// reported rather than ignored.
func Load(override []byte) (*Catalogue, error) {
	var base File
	if err := yaml.UnmarshalStrict(builtinYAML, &base); err != nil {
		return nil, fmt.Errorf("built-in catalogue: %w", err)
	}
	if len(override) > 0 {
		var user File
		if err := yaml.UnmarshalStrict(override, &user); err != nil {
			return nil, fmt.Errorf("decoding the catalogue: %w", err)
		}
		if err := Validate(field.NewPath("override"), &user, false); err != nil {
			return nil, err
		}
		base = Merge(base, user)
	}
	return Compile(&base)
}

// Merge returns base with over merged in. A metric of over whose name is
// already in base replaces the fields it sets, and for each engine it lists,
// that engine's sources (an empty list removes the engine). Other metrics are
// added. Raw gauges are added to base's, replacing one with the same served
// name.
func Merge(base, over File) File {
	out := File{Raw: map[modelserver.Engine][]RawGauge{}}
	index := map[string]int{}
	for _, m := range base.Metrics {
		m.Engines = maps.Clone(m.Engines)
		index[m.Name] = len(out.Metrics)
		out.Metrics = append(out.Metrics, m)
	}
	for _, m := range over.Metrics {
		i, ok := index[m.Name]
		if !ok {
			index[m.Name] = len(out.Metrics)
			out.Metrics = append(out.Metrics, m)
			continue
		}
		cur := &out.Metrics[i]
		if m.Kind != "" {
			cur.Kind = m.Kind
		}
		if m.Unit != "" {
			cur.Unit = m.Unit
		}
		if m.Help != "" {
			cur.Help = m.Help
		}
		if m.Aggregation != "" {
			cur.Aggregation = m.Aggregation
		}
		if m.Quantiles != nil {
			cur.Quantiles = m.Quantiles
		}
		if cur.Engines == nil {
			cur.Engines = map[modelserver.Engine][]Source{}
		}
		for e, sources := range m.Engines {
			if len(sources) == 0 {
				delete(cur.Engines, e)
			} else {
				cur.Engines[e] = sources
			}
		}
	}
	for _, f := range []File{base, over} {
		for e, raws := range f.Raw {
			for _, r := range raws {
				i := slices.IndexFunc(out.Raw[e], func(o RawGauge) bool { return o.servedName() == r.servedName() })
				if i >= 0 {
					out.Raw[e][i] = r
				} else {
					out.Raw[e] = append(out.Raw[e], r)
				}
			}
		}
	}
	return out
}

var (
	nameRE       = regexp.MustCompile(`^[a-z][a-z0-9_]*$`)
	rawNameRE    = regexp.MustCompile(`^[a-zA-Z_][a-zA-Z0-9_]*$`)
	sanitizeRE   = regexp.MustCompile(`[^a-zA-Z0-9_]`)
	kinds        = sets.New(Gauge, Rate, Histogram, Adapters)
	aggregations = sets.New(Sum, Avg, Max, Min)
)

// SanitizeName turns a Prometheus metric name into a name the adapter can
// serve: every character other than letters, digits and _ becomes _.
func SanitizeName(series string) string { return sanitizeRE.ReplaceAllString(series, "_") }

func (r RawGauge) servedName() string {
	if r.Name != "" {
		return r.Name
	}
	return SanitizeName(r.Series.Series)
}

// Validate checks a catalogue document. complete is false for an override,
// whose metrics may leave out what the built-in catalogue already says.
func Validate(path *field.Path, f *File, complete bool) error {
	var errs field.ErrorList
	seen := sets.New[string]()
	for i, m := range f.Metrics {
		p := path.Child("metrics").Index(i)
		if !nameRE.MatchString(m.Name) {
			errs = append(errs, field.Invalid(p.Child("name"), m.Name, "must be lower-case letters, digits and _, starting with a letter"))
		} else if seen.Has(m.Name) {
			errs = append(errs, field.Duplicate(p.Child("name"), m.Name))
		}
		seen.Insert(m.Name)
		switch {
		case m.Kind == "" && complete:
			errs = append(errs, field.Required(p.Child("kind"), "one of gauge, rate, histogram, adapters"))
		case m.Kind != "" && !kinds.Has(m.Kind):
			errs = append(errs, field.NotSupported(p.Child("kind"), m.Kind, sets.List(kinds)))
		}
		errs = append(errs, validateAggregation(p.Child("aggregation"), m.Kind, m.Aggregation)...)
		if len(m.Quantiles) > 0 && m.Kind != Histogram && m.Kind != "" {
			errs = append(errs, field.Forbidden(p.Child("quantiles"), "only histograms have quantiles"))
		}
		qs := sets.New[string]()
		for j, q := range m.Quantiles {
			if !(q > 0 && q < 1) {
				errs = append(errs, field.Invalid(p.Child("quantiles").Index(j), q, "must be between 0 and 1, exclusive"))
			} else if qs.Has(quantileSuffix(q)) {
				errs = append(errs, field.Duplicate(p.Child("quantiles").Index(j), q))
			}
			qs.Insert(quantileSuffix(q))
		}
		if complete && len(m.Engines) == 0 {
			errs = append(errs, field.Required(p.Child("engines"), "at least one engine's sources"))
		}
		for _, e := range slices.Sorted(maps.Keys(m.Engines)) {
			ep := p.Child("engines").Key(string(e))
			errs = append(errs, validateEngine(ep, e)...)
			for j, s := range m.Engines[e] {
				errs = append(errs, validateSource(ep.Index(j), m.Kind, s)...)
			}
		}
	}
	for _, e := range slices.Sorted(maps.Keys(f.Raw)) {
		ep := path.Child("raw").Key(string(e))
		errs = append(errs, validateEngine(ep, e)...)
		for j, r := range f.Raw[e] {
			p := ep.Index(j)
			errs = append(errs, validateSeries(p, r.Series)...)
			if !rawNameRE.MatchString(r.servedName()) {
				errs = append(errs, field.Invalid(p.Child("name"), r.servedName(), "must be letters, digits and _, not starting with a digit"))
			}
			errs = append(errs, validateAggregation(p.Child("aggregation"), Gauge, r.Aggregation)...)
		}
	}
	return errs.ToAggregate()
}

func validateEngine(p *field.Path, e modelserver.Engine) field.ErrorList {
	if !slices.Contains(modelserver.Engines, e) {
		return field.ErrorList{field.NotSupported(p, e, modelserver.Engines)}
	}
	return nil
}

func validateAggregation(p *field.Path, kind Kind, agg Aggregation) field.ErrorList {
	switch {
	case agg == "":
		return nil
	case !aggregations.Has(agg):
		return field.ErrorList{field.NotSupported(p, agg, sets.List(aggregations))}
	case kind == Histogram && agg != Sum || kind == Rate && agg != Sum && agg != Max:
		return field.ErrorList{field.Invalid(p, agg, "histograms are summed over series; rates are summed or take the largest")}
	case kind == Adapters:
		return field.ErrorList{field.Forbidden(p, "adapters are read from the newest series, not aggregated")}
	}
	return nil
}

func validateSource(p *field.Path, kind Kind, s Source) field.ErrorList {
	errs := validateSeries(p, s.Series)
	errs = append(errs, validateAggregation(p.Child("aggregation"), kind, s.Aggregation)...)
	if s.Scale != nil && !(*s.Scale > 0) {
		errs = append(errs, field.Invalid(p.Child("scale"), *s.Scale, "must be positive"))
	}
	for name, ref := range map[string]*Series{"minus": s.Minus, "divideBy": s.DivideBy} {
		if ref == nil {
			continue
		}
		if kind != Gauge && kind != "" {
			errs = append(errs, field.Forbidden(p.Child(name), "only gauges combine series"))
		}
		errs = append(errs, validateSeries(p.Child(name), *ref)...)
	}
	if s.Minus != nil && s.DivideBy != nil {
		errs = append(errs, field.Forbidden(p.Child("divideBy"), "a source has minus or divideBy, not both"))
	}
	switch {
	case kind == Adapters && s.AdaptersLabel == "":
		errs = append(errs, field.Required(p.Child("adaptersLabel"), "the label that lists the adapters"))
	case kind == Adapters && !model.LegacyValidation.IsValidLabelName(s.AdaptersLabel):
		errs = append(errs, field.Invalid(p.Child("adaptersLabel"), s.AdaptersLabel, "not a valid Prometheus label name"))
	case kind != Adapters && kind != "" && s.AdaptersLabel != "":
		errs = append(errs, field.Forbidden(p.Child("adaptersLabel"), "only adapters metrics list adapters"))
	}
	switch {
	case s.ValueLabel == "":
	case kind != Gauge && kind != "":
		errs = append(errs, field.Forbidden(p.Child("valueLabel"), "only gauges read a value from a label"))
	case !model.LegacyValidation.IsValidLabelName(s.ValueLabel):
		errs = append(errs, field.Invalid(p.Child("valueLabel"), s.ValueLabel, "not a valid Prometheus label name"))
	case s.Aggregation != "" || s.Minus != nil || s.DivideBy != nil:
		errs = append(errs, field.Forbidden(p.Child("valueLabel"), "a value read from the newest series is not aggregated or combined"))
	}
	if kind == Adapters && s.Scale != nil {
		errs = append(errs, field.Forbidden(p.Child("scale"), "adapters metrics have no values to scale"))
	}
	return errs
}

func validateSeries(p *field.Path, s Series) field.ErrorList {
	var errs field.ErrorList
	if s.Series == "" {
		errs = append(errs, field.Required(p.Child("series"), "a Prometheus metric name"))
	} else if !model.LegacyValidation.IsValidMetricName(s.Series) {
		errs = append(errs, field.Invalid(p.Child("series"), s.Series, "not a valid Prometheus metric name"))
	}
	for _, k := range slices.Sorted(maps.Keys(s.Labels)) {
		if !model.LegacyValidation.IsValidLabelName(k) {
			errs = append(errs, field.Invalid(p.Child("labels").Key(k), k, "not a valid Prometheus label name"))
		}
	}
	return errs
}

// Compile validates a complete catalogue document and compiles it.
func Compile(f *File) (*Catalogue, error) {
	if err := Validate(field.NewPath("catalogue"), f, true); err != nil {
		return nil, err
	}
	c := &Catalogue{byName: map[string]int{}, ids: map[string]int{}, plans: map[modelserver.Engine][]step{}}
	for _, m := range f.Metrics {
		if m.Aggregation == "" {
			m.Aggregation = Sum
		}
		if m.Kind == Histogram && len(m.Quantiles) == 0 {
			m.Quantiles = DefaultQuantiles
		}
		c.ids[m.Name] = len(c.metrics)
		c.metrics = append(c.metrics, m)
	}
	for _, e := range slices.Sorted(maps.Keys(f.Raw)) {
		for _, r := range f.Raw[e] {
			name := r.servedName()
			src := Source{Series: r.Series, Aggregation: r.Aggregation}
			if id, ok := c.ids[name]; ok {
				m := &c.metrics[id]
				if m.Kind != Gauge {
					return nil, fmt.Errorf("raw gauge %s of %s: the name is taken by a %s", name, e, m.Kind)
				}
				if len(m.Engines[e]) == 0 {
					m.Engines = maps.Clone(m.Engines)
					m.Engines[e] = []Source{src}
				}
				continue
			}
			c.ids[name] = len(c.metrics)
			c.metrics = append(c.metrics, Metric{Name: name, Kind: Gauge, Aggregation: Sum,
				Help:    fmt.Sprintf("The %s gauge %s, as the engine reports it.", e, r.Series.Series),
				Engines: map[modelserver.Engine][]Source{e: {src}}})
		}
	}
	for id, m := range c.metrics {
		switch m.Kind {
		case Histogram:
			for _, q := range m.Quantiles {
				c.served = append(c.served, ServedName{Name: m.Name + "_p" + quantileSuffix(q), Metric: id, Quantile: q})
			}
		default:
			c.served = append(c.served, ServedName{Name: m.Name, Metric: id})
		}
		for e, sources := range m.Engines {
			c.plans[e] = append(c.plans[e], step{metric: id, kind: m.Kind, sources: compileSources(sources, m.Aggregation)})
		}
	}
	slices.SortFunc(c.served, func(a, b ServedName) int { return strings.Compare(a.Name, b.Name) })
	for i, s := range c.served {
		if _, dup := c.byName[s.Name]; dup {
			return nil, fmt.Errorf("two metrics are served as %s", s.Name)
		}
		c.byName[s.Name] = i
	}
	for _, s := range c.served {
		if _, clash := c.byName[s.Name+AvgSuffix]; clash {
			return nil, fmt.Errorf("%s%s is both a metric and the average variant of %s", s.Name, AvgSuffix, s.Name)
		}
	}
	return c, nil
}

// AvgSuffix names the average variant of a metric served for an object
// (Deployment, StatefulSet, Service): the sum over its pods divided by the
// number of pods that have a value.
const AvgSuffix = "_avg"

// quantileSuffix spells a quantile the way served names do: 0.5 is 50, 0.9
// is 90, 0.99 is 99, 0.999 is 999.
func quantileSuffix(q float64) string {
	digits := strings.TrimPrefix(strconv.FormatFloat(q, 'f', -1, 64), "0.")
	if len(digits) == 1 {
		digits += "0"
	}
	return digits
}

// Metrics returns every metric, indexed by ID. The slice must not be
// modified.
func (c *Catalogue) Metrics() []Metric { return c.metrics }

// Served returns every served name, sorted. The slice must not be modified.
func (c *Catalogue) Served() []ServedName { return c.served }

// Lookup finds a served name.
func (c *Catalogue) Lookup(name string) (ServedName, bool) {
	i, ok := c.byName[name]
	if !ok {
		return ServedName{}, false
	}
	return c.served[i], true
}

// ID returns the ID of the metric with this (catalogue) name.
func (c *Catalogue) ID(name string) (int, bool) {
	id, ok := c.ids[name]
	return id, ok
}

// Engines returns the engines with at least one source for the metric.
func (c *Catalogue) Engines(id int) []modelserver.Engine {
	return slices.Sorted(maps.Keys(c.metrics[id].Engines))
}
