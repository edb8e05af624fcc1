package fleet

import (
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
)

// Annotations a test puts on a model pod to shape how its simulated engine
// behaves. They are read on every request, so changing one takes effect at
// once. (Readiness annotations are kwok's business: see test/cluster.)
const (
	// MaxRunningAnnotation is the batch size: requests beyond it wait.
	MaxRunningAnnotation = "sim.capstan.dev/max-running"
	// TTFTAnnotation is the time to first token, excluding queueing.
	TTFTAnnotation = "sim.capstan.dev/ttft"
	// TPOTAnnotation is the time per output token after the first.
	TPOTAnnotation = "sim.capstan.dev/tpot"
	// OutputTokensAnnotation is how many tokens a response has unless the
	// request's max_tokens is smaller.
	OutputTokensAnnotation = "sim.capstan.dev/output-tokens"
	// FaultAnnotation injects faults, comma-separated: see the Fault values.
	FaultAnnotation = "sim.capstan.dev/fault"
	// FaultDelayAnnotation is the delay of the "slow" fault (default 2s).
	FaultDelayAnnotation = "sim.capstan.dev/fault-delay"
	// EngineVersionAnnotation "legacy" serves the metric names an engine's
	// older releases used (vLLM: gpu_cache_usage_perc).
	EngineVersionAnnotation = "sim.capstan.dev/engine-version"
)

// Fault is a failure a simulated pod can be told to show.
type Fault string

const (
	// FaultRefuse closes the pod's ports: connections are refused.
	FaultRefuse Fault = "refuse"
	// FaultHangMetrics makes the metrics endpoint accept and never answer.
	FaultHangMetrics Fault = "hang-metrics"
	// FaultGarbageMetrics serves a metrics page that is not Prometheus text.
	FaultGarbageMetrics Fault = "garbage-metrics"
	// FaultHTTP500 answers every API request with 500.
	FaultHTTP500 Fault = "http-500"
	// FaultSlow delays every answer, metrics included, by the fault delay.
	FaultSlow Fault = "slow"
	// FaultBlackHole makes the pod's ports drop what is sent to them, as a
	// pod behind a partitioned network does: a new connection's SYNs go
	// unanswered, so connecting times out (it is neither refused nor
	// accepted), and a request on a connection opened before gets no
	// answer until the client gives up. Refuse wins when both are set.
	FaultBlackHole Fault = "black-hole"
	// FaultEndlessMetrics serves a 200 text/plain metrics page that never
	// ends: well-formed lines, streamed as fast as the client reads, until
	// it hangs up.
	FaultEndlessMetrics Fault = "endless-metrics"
	// FaultSeriesFlood serves a metrics page whose vllm:num_requests_waiting
	// family has FaultSeriesAnnotation series (default 1,000,000), streamed
	// line by line rather than built in memory.
	FaultSeriesFlood Fault = "series-flood"
	// FaultBucketFlood serves a metrics page whose
	// vllm:time_to_first_token_seconds histogram has FaultBucketsAnnotation
	// buckets (default 10,000), streamed.
	FaultBucketFlood Fault = "bucket-flood"
)

// Sizes of the flood faults.
const (
	// FaultSeriesAnnotation is how many series the series-flood fault
	// serves in its family (default 1,000,000).
	FaultSeriesAnnotation = "sim.capstan.dev/fault-series"
	// FaultBucketsAnnotation is how many buckets the bucket-flood fault
	// serves in its histogram (default 10,000).
	FaultBucketsAnnotation = "sim.capstan.dev/fault-buckets"
)

// params is one pod's simulation settings, from its annotations over the
// fleet's defaults.
type params struct {
	maxRunning   int
	ttft, tpot   time.Duration
	outputTokens int
	faults       map[Fault]bool
	faultDelay   time.Duration
	faultSeries  int
	faultBuckets int
	loraLoadTime time.Duration
}

func paramsFor(pod *corev1.Pod, d Options) params {
	a := pod.Annotations
	p := params{
		maxRunning:   intOr(a[MaxRunningAnnotation], d.MaxRunning),
		ttft:         durationOr(a[TTFTAnnotation], d.TTFT),
		tpot:         durationOr(a[TPOTAnnotation], d.TPOT),
		outputTokens: intOr(a[OutputTokensAnnotation], d.OutputTokens),
		faultDelay:   durationOr(a[FaultDelayAnnotation], 2*time.Second),
		faultSeries:  intOr(a[FaultSeriesAnnotation], 1_000_000),
		faultBuckets: intOr(a[FaultBucketsAnnotation], 10_000),
		loraLoadTime: durationOr(a[LoRALoadTimeAnnotation], 0),
	}
	for _, f := range strings.Split(a[FaultAnnotation], ",") {
		if f = strings.TrimSpace(f); f != "" {
			if p.faults == nil {
				p.faults = map[Fault]bool{}
			}
			p.faults[Fault(f)] = true
		}
	}
	return p
}

// hasFault reports whether the pod's annotations inject fault, without
// reading the rest of its parameters (it is checked on every request).
func hasFault(pod *corev1.Pod, fault Fault) bool {
	v := pod.Annotations[FaultAnnotation]
	if v == "" {
		return false
	}
	for f := range strings.SplitSeq(v, ",") {
		if Fault(strings.TrimSpace(f)) == fault {
			return true
		}
	}
	return false
}

func intOr(s string, def int) int {
	if n, err := strconv.Atoi(s); err == nil && n > 0 {
		return n
	}
	return def
}

func durationOr(s string, def time.Duration) time.Duration {
	if d, err := time.ParseDuration(s); err == nil && d >= 0 {
		return d
	}
	return def
}
