// Package metrics defines the router's Prometheus metrics. Counters and
// histograms are updated on the request path; per-endpoint in-flight counts
// and per-model endpoint counts are read from the routing table when
// Prometheus scrapes, so they cost nothing per request.
package metrics

import (
	"strconv"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/capstan-dev/capstan/router/route"
)

const namespace = "capstan_router"

// Metrics holds the router's collectors.
type Metrics struct {
	requests  *prometheus.CounterVec
	duration  *prometheus.HistogramVec
	ttfb      *prometheus.HistogramVec
	retries   *prometheus.CounterVec
	ejections *prometheus.CounterVec
	gateway   *prometheus.CounterVec
	held      *prometheus.HistogramVec
	// picker* are the endpoint-picker protocol's, by InferencePool.
	pickerDuration *prometheus.HistogramVec
	pickerFailures *prometheus.CounterVec
	pickerFailOpen *prometheus.CounterVec
	codeLabels     [600]string
	// perModel holds each model's most used series (*modelSeries), so that
	// a request does not hash its labels to find them.
	perModel sync.Map
}

// modelSeries are the series a successful request of one model updates.
type modelSeries struct {
	balancer            string
	ok                  prometheus.Counter
	duration, firstByte prometheus.Observer
}

func (m *Metrics) series(model, balancer string) *modelSeries {
	if v, ok := m.perModel.Load(model); ok {
		if s := v.(*modelSeries); s.balancer == balancer {
			return s
		}
	}
	s := &modelSeries{balancer: balancer, ok: m.requests.WithLabelValues(model, m.code(200), balancer),
		duration: m.duration.WithLabelValues(model), firstByte: m.ttfb.WithLabelValues(model)}
	m.perModel.Store(model, s)
	return s
}

// Held records a request that was held for seconds, and how that ended.
func (m *Metrics) Held(model string, seconds float64, outcome string) {
	m.held.WithLabelValues(model, outcome).Observe(seconds)
}

// Retry reasons.
const (
	ReasonConnect   = "connect"
	ReasonTimeout   = "first_byte_timeout"
	ReasonTransport = "transport"
)

// Hold outcomes.
const (
	HoldReleased  = "released"
	HoldTimeout   = "timeout"
	HoldFull      = "queue_full"
	HoldCancelled = "client_gone"
)

// New creates the metrics and registers them, with a collector that reads the
// routing table from table, and how many requests are held for a model from
// held (nil: none), at scrape time, into reg.
func New(reg prometheus.Registerer, table func() *route.Table, held func(model string) int) *Metrics {
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "requests_total",
			Help: "Requests handled, by model (empty when the request named no known model), HTTP status code and balancer.",
		}, []string{"model", "code", "balancer"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "request_duration_seconds",
			Help:    "Time from receiving a request to sending the last byte of its response, by model.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600},
		}, []string{"model"}),
		ttfb: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "time_to_first_byte_seconds",
			Help:    "Time from receiving a request to receiving the response headers from the model server, by model; for a streamed completion this is close to the time to first token.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120},
		}, []string{"model"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "retries_total",
			Help: "Requests retried on another endpoint after an attempt failed before any response byte, by model and reason (connect, first_byte_timeout, transport).",
		}, []string{"model", "reason"}),
		ejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "ejections_total",
			Help: "Endpoints ejected after a failed attempt, by model.",
		}, []string{"model"}),
		gateway: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "gateway_requests_total",
			Help: "Requests received on Gateway listeners, by Gateway, HTTPRoute (empty when none matched) and HTTP status code.",
		}, []string{"gateway", "route", "code"}),
		held: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "hold_duration_seconds",
			Help:    "Time requests were held for a model with no ready endpoint, by model and outcome (released, timeout, queue_full, client_gone).",
			Buckets: []float64{.01, .1, .5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600},
		}, []string{"model", "outcome"}),
		pickerDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "endpoint_picker_duration_seconds",
			Help:    "Time from opening the ext_proc stream to an InferencePool's endpoint picker to having its answer to the request, by pool, whether it succeeded or not.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"pool"}),
		pickerFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "endpoint_picker_failures_total",
			Help: "Failed exchanges with an InferencePool's endpoint picker, by pool and kind (unreachable, timeout, protocol, not_ready: none of the picked endpoints is a Ready endpoint of the pool).",
		}, []string{"pool", "kind"}),
		pickerFailOpen: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "endpoint_picker_fail_open_total",
			Help: "Requests of a FailOpen InferencePool balanced by the router because its endpoint picker failed, by pool.",
		}, []string{"pool"}),
	}
	for i := range m.codeLabels {
		m.codeLabels[i] = strconv.Itoa(i)
	}
	reg.MustRegister(m.requests, m.duration, m.ttfb, m.retries, m.ejections, m.gateway, m.held, m.pickerDuration, m.pickerFailures, m.pickerFailOpen, &tableCollector{table: table, held: held})
	return m
}

// Request records a finished request. model is "" for requests that named
// no known model, so clients cannot grow the label set.
func (m *Metrics) Request(model string, code int, balancer string, seconds float64) {
	if model == "" {
		m.requests.WithLabelValues(model, m.code(code), balancer).Inc()
		return
	}
	s := m.series(model, balancer)
	if code == 200 {
		s.ok.Inc()
	} else {
		m.requests.WithLabelValues(model, m.code(code), balancer).Inc()
	}
	s.duration.Observe(seconds)
}

// GatewayRequest records a finished request received on a Gateway
// listener; route is "" when none matched.
func (m *Metrics) GatewayRequest(gateway, route string, code int) {
	m.gateway.WithLabelValues(gateway, route, m.code(code)).Inc()
}

func (m *Metrics) code(code int) string {
	if code >= 0 && code < len(m.codeLabels) {
		return m.codeLabels[code]
	}
	return strconv.Itoa(code)
}

// FirstByte records the time to the model server's response headers.
func (m *Metrics) FirstByte(model string, seconds float64) {
	if v, ok := m.perModel.Load(model); ok {
		v.(*modelSeries).firstByte.Observe(seconds)
		return
	}
	m.ttfb.WithLabelValues(model).Observe(seconds)
}

// Retry records a retry.
func (m *Metrics) Retry(model, reason string) { m.retries.WithLabelValues(model, reason).Inc() }

// Ejection records an ejection.
func (m *Metrics) Ejection(model string) { m.ejections.WithLabelValues(model).Inc() }

// EndpointPicker records how long a pool's endpoint picker took to answer a
// request (or to fail).
func (m *Metrics) EndpointPicker(pool string, seconds float64) {
	m.pickerDuration.WithLabelValues(pool).Observe(seconds)
}

// EndpointPickerFailure records a failed exchange with a pool's endpoint
// picker, by kind (a picker.Kind).
func (m *Metrics) EndpointPickerFailure(pool, kind string) {
	m.pickerFailures.WithLabelValues(pool, kind).Inc()
}

// FailOpen records a request the router balanced itself because the
// pool's endpoint picker failed.
func (m *Metrics) FailOpen(pool string) { m.pickerFailOpen.WithLabelValues(pool).Inc() }

// tableCollector reports endpoint counts per model and in-flight requests
// per endpoint from the current routing table.
type tableCollector struct {
	table func() *route.Table
	held  func(model string) int
}

var (
	endpointsDesc = prometheus.NewDesc(namespace+"_endpoints",
		"Endpoints of each model's Services by state: ready (routable), not_ready, terminating.",
		[]string{"model", "state"}, nil)
	totalDesc = prometheus.NewDesc(namespace+"_endpoints_total",
		"Endpoints of each model's Services, in any state.",
		[]string{"model"}, nil)
	inflightDesc = prometheus.NewDesc(namespace+"_endpoint_in_flight_requests",
		"Requests this router has in flight to each Ready endpoint.",
		[]string{"model", "pod", "endpoint"}, nil)
	modelInflightDesc = prometheus.NewDesc(namespace+"_model_in_flight_requests",
		"Requests this router has in flight to each model.",
		[]string{"model"}, nil)
	heldDesc = prometheus.NewDesc(namespace+"_model_held_requests",
		"Requests this router holds for each model, or one of its declared LoRA adapters, while it has no ready endpoint with room.",
		[]string{"model"}, nil)
	demandDesc = prometheus.NewDesc(namespace+"_model_demand",
		"Requests of each model this router holds or has in flight: what the metrics adapter serves as requests_demand, summed over router replicas.",
		[]string{"model"}, nil)
	refusedDesc = prometheus.NewDesc(namespace+"_model_refused_claims",
		"Services of a namespace that claim a model another namespace owns and does not share with it; they get no traffic.",
		[]string{"model", "namespace"}, nil)
	ejectedDesc = prometheus.NewDesc(namespace+"_endpoint_ejected",
		"1 for a Ready endpoint that is ejected after failing, else 0.",
		[]string{"model", "pod", "endpoint"}, nil)
)

func (c *tableCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{endpointsDesc, totalDesc, inflightDesc, modelInflightDesc, heldDesc, demandDesc, ejectedDesc, refusedDesc} {
		ch <- d
	}
}

func (c *tableCollector) Collect(ch chan<- prometheus.Metric) {
	for _, m := range c.table().Models() {
		ch <- prometheus.MustNewConstMetric(endpointsDesc, prometheus.GaugeValue, float64(m.Ready), m.Name, "ready")
		ch <- prometheus.MustNewConstMetric(endpointsDesc, prometheus.GaugeValue, float64(m.NotReady), m.Name, "not_ready")
		ch <- prometheus.MustNewConstMetric(endpointsDesc, prometheus.GaugeValue, float64(m.Terminating), m.Name, "terminating")
		ch <- prometheus.MustNewConstMetric(totalDesc, prometheus.GaugeValue, float64(m.Total), m.Name)
		ch <- prometheus.MustNewConstMetric(modelInflightDesc, prometheus.GaugeValue, float64(m.Pool.InFlight()), m.Name)
		held := 0
		if c.held != nil {
			// Requests held for the model's declared adapters are its
			// demand too: they wait for its pods.
			held = c.held(m.Name)
			for _, a := range m.Adapters {
				held += c.held(a.Name)
			}
		}
		ch <- prometheus.MustNewConstMetric(heldDesc, prometheus.GaugeValue, float64(held), m.Name)
		ch <- prometheus.MustNewConstMetric(demandDesc, prometheus.GaugeValue, float64(held)+float64(m.Pool.InFlight()), m.Name)
		refused := map[string]int{}
		for _, c := range m.Refused {
			refused[c.Service.Namespace]++
		}
		for ns, n := range refused {
			ch <- prometheus.MustNewConstMetric(refusedDesc, prometheus.GaugeValue, float64(n), m.Name, ns)
		}
		for _, e := range m.Pool.Endpoints() {
			ch <- prometheus.MustNewConstMetric(inflightDesc, prometheus.GaugeValue, float64(e.Host.InFlight()), m.Name, e.Pod, e.Address)
			ejected := 0.0
			if e.Host.Ejected() {
				ejected = 1
			}
			ch <- prometheus.MustNewConstMetric(ejectedDesc, prometheus.GaugeValue, ejected, m.Name, e.Pod, e.Address)
		}
	}
}
