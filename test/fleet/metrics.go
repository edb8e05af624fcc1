package fleet

import (
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/test/fleet/paged"
)

// load is what a simulated engine's gauges read.
type load interface {
	Running() int
	Waiting() int
	MaxRunning() int
	KVCacheUsage() float64
}

// cacheStats is the load of an engine that models its KV and prefix cache
// (package paged).
type cacheStats interface {
	Stats() paged.Stats
}

// finished describes one completed request, for the engine's counters and
// histograms.
type finished struct {
	// queued is the wait for the engine, prefill from then to the first
	// token, ttft and e2e from the arrival.
	queued, prefill, ttft, e2e time.Duration
	promptTokens, outputTokens int
	finishReason               string // "stop" or "length"
}

// exporter keeps one pod's metrics under one engine's real names and labels.
type exporter interface {
	prefilled(promptTokens int)
	generated(tokens int)
	done(f finished)
	failed()
}

// Engine histogram buckets, as the engines declare them.
var (
	vllmTTFTBuckets = []float64{0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
		2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0}
	vllmLatencyBuckets = []float64{0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
		50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0}
	tokenBuckets = prometheus.ExponentialBuckets(1, 2, 14)
)

// newExporter registers the engine's metric families in reg. legacy selects
// the names an older release of the engine used (vLLM's
// gpu_cache_usage_perc before it became kv_cache_usage_perc).
func newExporter(engine modelserver.Engine, legacy bool, model string, st load, reg prometheus.Registerer) exporter {
	switch engine {
	case modelserver.SGLang:
		return newSGLang(model, st, reg)
	case modelserver.TGI:
		return newTGI(st, reg)
	case modelserver.Triton:
		return newTriton(model, st, reg)
	default:
		return newVLLM(model, legacy, st, reg)
	}
}

func gaugeFunc(reg prometheus.Registerer, name, help string, labels prometheus.Labels, f func() float64) {
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help, ConstLabels: labels}, f))
}

func counter(reg prometheus.Registerer, name, help string, labels prometheus.Labels) prometheus.Counter {
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help, ConstLabels: labels})
	reg.MustRegister(c)
	return c
}

func histogram(reg prometheus.Registerer, name, help string, labels prometheus.Labels, buckets []float64) prometheus.Histogram {
	h := prometheus.NewHistogram(prometheus.HistogramOpts{Name: name, Help: help, ConstLabels: labels, Buckets: buckets})
	reg.MustRegister(h)
	return h
}

// vLLM (v1 engine): colon-separated names, labelled with model_name and engine.
type vllm struct {
	promptTokens, generationTokens prometheus.Counter
	success                        *prometheus.CounterVec
	ttft, e2e, queue, prefill, itl prometheus.Histogram
}

func newVLLM(model string, legacy bool, st load, reg prometheus.Registerer) *vllm {
	l := prometheus.Labels{"model_name": model, "engine": "0"}
	kvName := "vllm:kv_cache_usage_perc"
	itlName := "vllm:inter_token_latency_seconds"
	if legacy {
		kvName = "vllm:gpu_cache_usage_perc"
		itlName = "vllm:time_per_output_token_seconds"
	}
	gaugeFunc(reg, "vllm:num_requests_running", "Number of requests in model execution batches.", l, func() float64 { return float64(st.Running()) })
	gaugeFunc(reg, "vllm:num_requests_waiting", "Number of requests waiting to be processed.", l, func() float64 { return float64(st.Waiting()) })
	gaugeFunc(reg, kvName, "KV-cache usage. 1 means 100 percent usage.", l, st.KVCacheUsage)
	v := &vllm{
		promptTokens:     counter(reg, "vllm:prompt_tokens_total", "Number of prefill tokens processed.", l),
		generationTokens: counter(reg, "vllm:generation_tokens_total", "Number of generation tokens processed.", l),
		success: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vllm:request_success_total",
			Help: "Count of successfully processed requests.", ConstLabels: l}, []string{"finished_reason"}),
		ttft:    histogram(reg, "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", l, vllmTTFTBuckets),
		e2e:     histogram(reg, "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", l, vllmLatencyBuckets),
		queue:   histogram(reg, "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", l, vllmLatencyBuckets),
		prefill: histogram(reg, "vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.", l, vllmLatencyBuckets),
		itl:     histogram(reg, itlName, "Histogram of inter-token latency in seconds.", l, vllmTTFTBuckets),
	}
	reg.MustRegister(v.success)
	stats := func() paged.Stats { return paged.Stats{} }
	if cs, ok := st.(cacheStats); ok {
		stats = cs.Stats
	}
	counterFunc := func(name, help string, f func(paged.Stats) int64) {
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help, ConstLabels: l},
			func() float64 { return float64(f(stats())) }))
	}
	counterFunc("vllm:num_preemptions_total", "Cumulative number of preemption from the engine.", func(s paged.Stats) int64 { return s.Preemptions })
	counterFunc("vllm:prefix_cache_queries_total", "Prefix cache queries, in terms of number of queried tokens.", func(s paged.Stats) int64 { return s.PrefixQueries })
	counterFunc("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens.", func(s paged.Stats) int64 { return s.PrefixHits })
	if _, ok := st.(cacheStats); ok {
		reg.MustRegister(loraInfo{model: model, stats: stats})
		// Not vLLM's: the simulator's count of adapters brought into a
		// GPU slot, the slot swaps that make bench-routing compares.
		counterFunc(SimLoRASlotLoads, "Simulator only: LoRA adapters loaded into a GPU slot.", func(s paged.Stats) int64 { return s.LoRALoads })
	}
	return v
}

// SimLoRASlotLoads is the simulated vLLM engine's count of LoRA adapters
// loaded into a GPU slot (paged.Stats.LoRALoads). The sim: prefix says that
// no real engine exports it.
const SimLoRASlotLoads = "sim:lora_slot_loads_total"

// loraInfo is vLLM's vllm:lora_requests_info: one series whose labels name
// the running and waiting adapters and the slots, valued with the time.
type loraInfo struct {
	model string
	stats func() paged.Stats
}

var loraInfoDesc = prometheus.NewDesc("vllm:lora_requests_info", "Running stats on lora requests.",
	[]string{"max_lora", "running_lora_adapters", "waiting_lora_adapters"}, nil)

func (l loraInfo) Describe(ch chan<- *prometheus.Desc) { ch <- loraInfoDesc }

func (l loraInfo) Collect(ch chan<- prometheus.Metric) {
	st := l.stats()
	ch <- prometheus.MustNewConstMetric(loraInfoDesc, prometheus.GaugeValue, float64(time.Now().Unix()),
		strconv.Itoa(st.MaxLoRAs), strings.Join(st.RunningAdapters, ","), strings.Join(st.WaitingAdapters, ","))
}

func (v *vllm) prefilled(n int) { v.promptTokens.Add(float64(n)) }
func (v *vllm) generated(n int) { v.generationTokens.Add(float64(n)) }
func (v *vllm) failed()         {}
func (v *vllm) done(f finished) {
	v.success.WithLabelValues(f.finishReason).Inc()
	v.ttft.Observe(f.ttft.Seconds())
	v.e2e.Observe(f.e2e.Seconds())
	v.queue.Observe(f.queued.Seconds())
	v.prefill.Observe(f.prefill.Seconds())
	if f.outputTokens > 1 {
		v.itl.Observe((f.e2e - f.ttft).Seconds() / float64(f.outputTokens-1))
	}
}

// SGLang: colon-separated names, labelled with model_name.
type sglang struct {
	promptTokens, generationTokens, requests prometheus.Counter
	ttft, e2e, itl                           prometheus.Histogram
}

func newSGLang(model string, st load, reg prometheus.Registerer) *sglang {
	l := prometheus.Labels{"model_name": model}
	gaugeFunc(reg, "sglang:num_running_reqs", "The number of running requests.", l, func() float64 { return float64(st.Running()) })
	gaugeFunc(reg, "sglang:num_queue_reqs", "The number of requests in the waiting queue.", l, func() float64 { return float64(st.Waiting()) })
	gaugeFunc(reg, "sglang:token_usage", "The token usage.", l, st.KVCacheUsage)
	gaugeFunc(reg, "sglang:cache_hit_rate", "The prefix cache hit rate.", l, func() float64 {
		if cs, ok := st.(cacheStats); ok {
			if s := cs.Stats(); s.PrefixQueries > 0 {
				return float64(s.PrefixHits) / float64(s.PrefixQueries)
			}
		}
		return 0
	})
	return &sglang{
		promptTokens:     counter(reg, "sglang:prompt_tokens_total", "Number of prefill tokens processed.", l),
		generationTokens: counter(reg, "sglang:generation_tokens_total", "Number of generation tokens processed.", l),
		requests:         counter(reg, "sglang:num_requests_total", "Number of requests processed.", l),
		ttft:             histogram(reg, "sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.", l, vllmTTFTBuckets),
		e2e:              histogram(reg, "sglang:e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds", l, vllmLatencyBuckets),
		itl:              histogram(reg, "sglang:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", l, vllmTTFTBuckets),
	}
}

func (s *sglang) prefilled(n int) { s.promptTokens.Add(float64(n)) }
func (s *sglang) generated(n int) { s.generationTokens.Add(float64(n)) }
func (s *sglang) failed()         {}
func (s *sglang) done(f finished) {
	s.requests.Inc()
	s.ttft.Observe(f.ttft.Seconds())
	s.e2e.Observe(f.e2e.Seconds())
	if f.outputTokens > 1 {
		s.itl.Observe((f.e2e - f.ttft).Seconds() / float64(f.outputTokens-1))
	}
}

// TGI (text-generation-inference): underscore names, no model label, request
// sizes as histograms of tokens.
type tgi struct {
	count, success, failure              prometheus.Counter
	duration, queue, inference, perToken prometheus.Histogram
	inputLength, generatedTokens         prometheus.Histogram
}

func newTGI(st load, reg prometheus.Registerer) *tgi {
	gaugeFunc(reg, "tgi_queue_size", "Current queue size", nil, func() float64 { return float64(st.Waiting()) })
	gaugeFunc(reg, "tgi_batch_current_size", "Current batch size", nil, func() float64 { return float64(st.Running()) })
	gaugeFunc(reg, "tgi_batch_current_max_tokens", "Maximum tokens for the current batch", nil,
		func() float64 { return st.KVCacheUsage() * float64(st.MaxRunning()) * 1024 })
	secs := prometheus.ExponentialBuckets(0.001, 2, 16)
	return &tgi{
		count:           counter(reg, "tgi_request_count", "Total number of requests", nil),
		success:         counter(reg, "tgi_request_success", "Number of successful requests", nil),
		failure:         counter(reg, "tgi_request_failure", "Number of failed requests", nil),
		duration:        histogram(reg, "tgi_request_duration", "Request duration", nil, secs),
		queue:           histogram(reg, "tgi_request_queue_duration", "Request queue duration", nil, secs),
		inference:       histogram(reg, "tgi_request_inference_duration", "Request inference duration", nil, secs),
		perToken:        histogram(reg, "tgi_request_mean_time_per_token_duration", "Mean time per token per request", nil, secs),
		inputLength:     histogram(reg, "tgi_request_input_length", "Input token length per request", nil, tokenBuckets),
		generatedTokens: histogram(reg, "tgi_request_generated_tokens", "Generated tokens per request", nil, tokenBuckets),
	}
}

func (t *tgi) prefilled(int) {}
func (t *tgi) generated(int) {}
func (t *tgi) failed()       { t.count.Inc(); t.failure.Inc() }
func (t *tgi) done(f finished) {
	t.count.Inc()
	t.success.Inc()
	t.duration.Observe(f.e2e.Seconds())
	t.queue.Observe(f.queued.Seconds())
	t.inference.Observe((f.e2e - f.queued).Seconds())
	if f.outputTokens > 0 {
		t.perToken.Observe((f.e2e - f.queued).Seconds() / float64(f.outputTokens))
	}
	t.inputLength.Observe(float64(f.promptTokens))
	t.generatedTokens.Observe(float64(f.outputTokens))
}

// Triton with the TensorRT-LLM backend: nv_ names labelled model and version,
// request state and KV-cache blocks as labelled gauges, durations in
// microsecond counters and a first-response histogram in milliseconds.
type triton struct {
	success, failure, count, requestUS, queueUS prometheus.Counter
	firstResponseMS, inputTokens, outputTokens  prometheus.Histogram
}

// tritonKVBlocks is the simulated KV-cache size in blocks.
const tritonKVBlocks = 4096

func newTriton(model string, st load, reg prometheus.Registerer) *triton {
	l := prometheus.Labels{"model": model, "version": "1"}
	with := func(k, v string) prometheus.Labels {
		out := prometheus.Labels{k: v}
		for lk, lv := range l {
			out[lk] = lv
		}
		return out
	}
	req := func(kind string, f func() float64) {
		gaugeFunc(reg, "nv_trt_llm_request_metrics", "TRT LLM request metrics", with("request_type", kind), f)
	}
	req("active", func() float64 { return float64(st.Running() + st.Waiting()) })
	req("max", func() float64 { return float64(st.MaxRunning()) })
	req("scheduled", func() float64 { return float64(st.Running()) })
	req("context", func() float64 { return 0 })
	req("waiting", func() float64 { return float64(st.Waiting()) })
	kv := func(kind string, f func() float64) {
		gaugeFunc(reg, "nv_trt_llm_kv_cache_block_metrics", "TRT LLM KV cache block metrics", with("kv_cache_block_type", kind), f)
	}
	used := func() float64 { return float64(int(st.KVCacheUsage() * tritonKVBlocks)) }
	kv("max", func() float64 { return tritonKVBlocks })
	kv("used", used)
	kv("free", func() float64 { return tritonKVBlocks - used() })
	kv("tokens_per", func() float64 { return 64 })
	return &triton{
		success:         counter(reg, "nv_inference_request_success", "Number of successful inference requests, all batch sizes", l),
		failure:         counter(reg, "nv_inference_request_failure", "Number of failed inference requests, all batch sizes", l),
		count:           counter(reg, "nv_inference_count", "Number of inferences performed (does not include cached requests)", l),
		requestUS:       counter(reg, "nv_inference_request_duration_us", "Cumulative inference request duration in microseconds (includes cached requests)", l),
		queueUS:         counter(reg, "nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds (includes cached requests)", l),
		firstResponseMS: histogram(reg, "nv_inference_first_response_histogram_ms", "Duration from request to first response in milliseconds", l, []float64{1, 5, 10, 20, 40, 60, 80, 100, 250, 500, 1000, 2500, 5000, 10000}),
		inputTokens:     histogram(reg, "nv_llm_input_token_len", "TRT LLM response metrics", with("response_metric_type", "total_input_tokens"), tokenBuckets),
		outputTokens:    histogram(reg, "nv_llm_output_token_len", "TRT LLM response metrics", with("response_metric_type", "total_output_tokens"), tokenBuckets),
	}
}

func (t *triton) prefilled(int) {}
func (t *triton) generated(int) {}
func (t *triton) failed()       { t.failure.Inc() }
func (t *triton) done(f finished) {
	t.success.Inc()
	t.count.Inc()
	t.requestUS.Add(float64(f.e2e.Microseconds()))
	t.queueUS.Add(float64(f.queued.Microseconds()))
	t.firstResponseMS.Observe(float64(f.ttft.Microseconds()) / 1000)
	t.inputTokens.Observe(float64(f.promptTokens))
	t.outputTokens.Observe(float64(f.outputTokens))
}
