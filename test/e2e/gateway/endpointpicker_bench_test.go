package gateway

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/capstan-dev/capstan/test/cluster"
)

// Environment of TestEndpointPickerOverhead (hack/bench-picker.sh sets
// pickerBenchEnv): pickerBenchRequestsEnv is how many measured requests
// each arm gets per prompt size and client count (default 2,000).
const (
	pickerBenchEnv         = "CAPSTAN_BENCH_PICKER"
	pickerBenchRequestsEnv = "CAPSTAN_BENCH_PICKER_REQUESTS"
)

// pickerBenchBlocks is how many blocks each arm's requests of a cell are
// sent in, the arms alternating ABBA so that a drift of the shared
// machine's speed falls on both alike.
const pickerBenchBlocks = 10

// TestEndpointPickerOverhead is make bench-picker: what asking an endpoint
// picker costs per request. One router and one set of four simulated model
// servers with a small fixed latency (time to first token 5 ms, then 4
// tokens 1 ms apart, streamed, no queueing) serve two InferencePools of the
// same pods: one whose endpointPickerRef is the extension's own lwepp
// v1.6.0 (FailClose, so that a failed pick is an error, not a silent
// fallback; TLS, the router's default), one without a picker, balanced by
// the router's default policy. For 1 KiB and 220 KiB prompts, at 1 and 20
// concurrent clients (closed loop, keep-alive), each arm gets the same
// fixed number of requests in alternating blocks; the client measures the
// time to the first byte of the streamed body and to its end. It writes a
// Markdown report to $CAPSTAN_BENCH_OUT: p50 and p99 of each arm, the
// latency the picker adds (picker arm minus the other) and the ratio, each
// arm's throughput while its blocks ran, the router's and lwepp's CPU time
// per request, and the picker round trip as
// the router measures it. Every request must succeed, and every one of the
// picker arm must have been picked by lwepp.
func TestEndpointPickerOverhead(t *testing.T) {
	if os.Getenv(pickerBenchEnv) == "" {
		t.Skipf("set %s=1 to run the endpoint-picker overhead benchmark (make bench-picker)", pickerBenchEnv)
	}
	requests := 2000
	if v := os.Getenv(pickerBenchRequestsEnv); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < pickerBenchBlocks {
			t.Fatalf("%s=%q: want a number of requests of at least %d", pickerBenchRequestsEnv, v, pickerBenchBlocks)
		}
		requests = n
	}
	ctx := testContext(t, 30*time.Minute)
	bin := lweppBinary(t)
	installInferencePools(t, ctx)
	ns := namespace(t, ctx, "picker-bench")
	simulate(t, ctx, ns, nil)
	const pods = 4
	if err := testCluster.Deploy(ctx, cluster.ModelServer{Namespace: ns, Name: "llama", Model: "llama-3-8b", Replicas: pods,
		Annotations: map[string]string{"sim.capstan.dev/ttft": "5ms", "sim.capstan.dev/tpot": "1ms",
			"sim.capstan.dev/output-tokens": "4", "sim.capstan.dev/max-running": "100000"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := testCluster.WaitForReadyPods(ctx, ns, "app=llama", pods, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	apply(t, ctx, ns, httpGateway(ns, "inference")+"\n"+llamaPool("llama-epp", "{name: epp, port: {number: 9002}, failureMode: FailClose}")+llamaPool("llama", "")+poolRoute("picker", "picker.example.com", "llama-epp")+poolRoute("builtin", "builtin.example.com", "llama"))
	epp := startLWEPP(t, ctx, bin, ns, "llama-epp")
	apply(t, ctx, ns, pickerService("registry.k8s.io/gateway-api-inference-extension/lwepp:v1.6.0", epp.grpcPort))
	if _, err := testCluster.WaitForReadyPods(ctx, ns, "app=epp", 1, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	r := startRouter(t, ctx, "router-picker-bench", "--namespaces="+ns, "--access-log=false", "--v=0")
	addr := gatewayAddress(t, ctx, ns, "inference")

	arms := [2]pickerArm{
		{name: "built-in balancer", host: "builtin.example.com"},
		{name: "lwepp", host: "picker.example.com", picked: true},
	}
	// The picker arm is ready once lwepp picks (it must have seen the
	// pool's pods), the other once the router has the pool's endpoints.
	for _, a := range arms {
		var last string
		err := testCluster.WaitFor(ctx, 30*time.Second, "the "+a.name+" arm to answer", func(ctx context.Context) (bool, error) {
			s := a.send(ctx, addr, pickerPrompt(1<<10, 0))
			last = s.err
			return s.err == "", nil
		})
		if err != nil {
			t.Fatalf("%v; last: %s\nlwepp:\n%s", err, last, epp.proc.LogTail(20))
		}
	}
	pids := map[string]int{}
	for _, name := range []string{"capstan-router", "lwepp"} {
		path, err := cluster.Binary(name)
		if err != nil {
			t.Fatal(err)
		}
		if pids[name], err = cluster.PidOf(path); err != nil {
			t.Fatal(err)
		}
	}

	var report strings.Builder
	fmt.Fprintf(&report, "%s, %d CPUs, load average at the start %s. %d simulated pods (TTFT 5 ms, 4 tokens 1 ms apart, streamed); "+
		"%d measured requests per arm and cell, in %d alternating blocks per arm, after a warm-up; router balancer: its default.\n\n",
		time.Now().UTC().Format("2006-01-02 15:04 MST"), runtime.NumCPU(), loadAverage(), pods, requests, pickerBenchBlocks)
	fmt.Fprintf(&report, "| prompt | clients | arm | TTFB p50 | TTFB p99 | total p50 | total p99 | req/s | router CPU/req | lwepp CPU/req |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n")
	var added strings.Builder
	fmt.Fprintf(&added, "| prompt | clients | TTFB p50 added | TTFB p99 added | total p50 added | total p99 added | TTFB p50 ratio | TTFB p99 ratio | picker round trip (router's mean) | router CPU added/req |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	var failed []string
	seq := 0
	for _, size := range []int{1 << 10, 220 << 10} {
		for _, clients := range []int{1, 20} {
			cell := fmt.Sprintf("%d KiB, %d clients", size>>10, clients)
			// Warm-up: connections from the clients to the router, from
			// the router to every pod and to lwepp.
			for i := range arms {
				arms[i].run(ctx, addr, size, clients, 4*clients, &seq, nil)
			}
			var res [2]pickerArmResult
			pickSum, pickCount := r.histogram(t, "capstan_router_endpoint_picker_duration_seconds")
			for b := range 2 * pickerBenchBlocks {
				i := (b + 1) / 2 % 2 // A B B A A B B A …
				n := requests / pickerBenchBlocks
				cpu, start := cpuTimes(t, pids), time.Now()
				arms[i].run(ctx, addr, size, clients, n, &seq, &res[i])
				res[i].wall += time.Since(start)
				after := cpuTimes(t, pids)
				res[i].routerCPU += after["capstan-router"] - cpu["capstan-router"]
				res[i].lweppCPU += after["lwepp"] - cpu["lwepp"]
			}
			pickSum2, pickCount2 := r.histogram(t, "capstan_router_endpoint_picker_duration_seconds")
			for i, a := range arms {
				s := &res[i]
				if len(s.errors) > 0 {
					failed = append(failed, fmt.Sprintf("%s, %s: %d errors, first: %s", cell, a.name, len(s.errors), s.errors[0]))
				}
				fmt.Fprintf(&report, "| %d KiB | %d | %s | %s | %s | %s | %s | %.0f | %s | %s |\n", size>>10, clients, a.name,
					ms(percentile(s.ttfb, 50)), ms(percentile(s.ttfb, 99)), ms(percentile(s.total, 50)), ms(percentile(s.total, 99)),
					float64(len(s.ttfb))/s.wall.Seconds(), us(s.perRequest(s.routerCPU)), us(s.perRequest(s.lweppCPU)))
			}
			base, picked := &res[0], &res[1]
			diff := func(p float64, of func(*pickerArmResult) []time.Duration) string {
				return ms(percentile(of(picked), p) - percentile(of(base), p))
			}
			ratio := func(p float64) string {
				return fmt.Sprintf("%.2f", float64(percentile(picked.ttfb, p))/float64(max(percentile(base.ttfb, p), 1)))
			}
			ttfb := func(s *pickerArmResult) []time.Duration { return s.ttfb }
			total := func(s *pickerArmResult) []time.Duration { return s.total }
			roundTrip := "–"
			if c := pickCount2 - pickCount; c > 0 {
				roundTrip = ms(time.Duration((pickSum2 - pickSum) / c * float64(time.Second)))
			}
			fmt.Fprintf(&added, "| %d KiB | %d | %s | %s | %s | %s | %s | %s | %s | %s |\n", size>>10, clients,
				diff(50, ttfb), diff(99, ttfb), diff(50, total), diff(99, total), ratio(50), ratio(99), roundTrip, us(picked.perRequest(picked.routerCPU)-base.perRequest(base.routerCPU)))
			t.Logf("%s: built-in TTFB p50 %s p99 %s; lwepp TTFB p50 %s p99 %s", cell,
				ms(percentile(base.ttfb, 50)), ms(percentile(base.ttfb, 99)), ms(percentile(picked.ttfb, 50)), ms(percentile(picked.ttfb, 99)))
		}
	}
	fmt.Fprintf(&report, "\nAdded by asking lwepp (lwepp arm minus built-in arm; ratio lwepp / built-in):\n\n%s", added.String())
	fmt.Fprintf(&report, "\nLoad average at the end: %s.\n", loadAverage())
	t.Log("\n" + report.String())
	if out := os.Getenv("CAPSTAN_BENCH_OUT"); out != "" {
		if err := os.WriteFile(out, []byte(report.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range failed {
		t.Error(f)
	}
}

// pickerArm is one side of the benchmark: the route to one of the pools.
type pickerArm struct {
	name, host string
	// picked: lwepp must have picked every request (it reports the served
	// endpoint in x-conformance-test-served-endpoint).
	picked bool
}

// pickerArmResult is what one arm measured in one cell.
type pickerArmResult struct {
	mu                  sync.Mutex
	ttfb, total         []time.Duration
	errors              []string
	routerCPU, lweppCPU time.Duration
	// wall is the time its blocks took.
	wall time.Duration
}

// perRequest divides a CPU time by the requests measured.
func (s *pickerArmResult) perRequest(cpu time.Duration) time.Duration {
	return cpu / time.Duration(max(len(s.ttfb), 1))
}

// pickerSample is one request as the client saw it.
type pickerSample struct {
	ttfb, total time.Duration
	err         string
}

// run sends n requests with prompts of size bytes from clients concurrent
// clients, recording them into res unless it is nil.
func (a pickerArm) run(ctx context.Context, addr string, size, clients, n int, seq *int, res *pickerArmResult) {
	bodies := make([][]byte, n)
	for i := range bodies {
		*seq++
		bodies[i] = pickerPrompt(size, *seq)
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n || ctx.Err() != nil {
					return
				}
				s := a.send(ctx, addr, bodies[i])
				if res == nil {
					continue
				}
				res.mu.Lock()
				if s.err != "" {
					res.errors = append(res.errors, s.err)
				} else {
					res.ttfb, res.total = append(res.ttfb, s.ttfb), append(res.total, s.total)
				}
				res.mu.Unlock()
			}
		})
	}
	wg.Wait()
}

// send makes one streamed completion request and reads its answer to the
// end.
func (a pickerArm) send(ctx context.Context, addr string, body []byte) pickerSample {
	req, err := http.NewRequestWithContext(ctx, "POST", "http://"+addr+"/v1/completions", bytes.NewReader(body))
	if err != nil {
		return pickerSample{err: err.Error()}
	}
	req.Host = a.host
	req.Header.Set("Content-Type", "application/json")
	start := time.Now()
	resp, err := httpClient.Do(req)
	if err != nil {
		return pickerSample{err: err.Error()}
	}
	defer resp.Body.Close()
	var first [1]byte
	if _, err := io.ReadFull(resp.Body, first[:]); err != nil {
		return pickerSample{err: fmt.Sprintf("%d, reading the first byte: %v", resp.StatusCode, err)}
	}
	ttfb := time.Since(start)
	rest, err := io.ReadAll(resp.Body)
	total := time.Since(start)
	switch {
	case err != nil:
		return pickerSample{err: err.Error()}
	case resp.StatusCode != http.StatusOK:
		return pickerSample{err: fmt.Sprintf("%d %s%s", resp.StatusCode, first[:], rest)}
	case !bytes.HasSuffix(rest, []byte("data: [DONE]\n\n")):
		return pickerSample{err: "the stream did not end with data: [DONE]"}
	case a.picked && resp.Header.Get(servedHeader) == "":
		return pickerSample{err: "no " + servedHeader + ": lwepp did not pick"}
	case !a.picked && resp.Header.Get(servedHeader) != "":
		return pickerSample{err: "a request of the arm without a picker was picked"}
	}
	return pickerSample{ttfb: ttfb, total: total}
}

// pickerPrompt is a streamed completion request whose prompt is size
// bytes, starting with its sequence number, so that no two are alike.
func pickerPrompt(size, seq int) []byte {
	const filler = "The quick brown fox jumps over the lazy dog. "
	prompt := strconv.Itoa(seq) + ": " + strings.Repeat(filler, size/len(filler)+1)
	return fmt.Appendf(nil, `{"model":"llama-3-8b","prompt":%q,"max_tokens":4,"stream":true}`, prompt[:size])
}

// percentile is the nearest-rank percentile p of ds (sorted in place).
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	i := int(math.Ceil(p/100*float64(len(ds)))) - 1
	return ds[max(i, 0)]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond)) }

func us(d time.Duration) string { return fmt.Sprintf("%.0f µs", float64(d)/float64(time.Microsecond)) }

// cpuTimes reads the user plus system CPU time of processes by name from
// /proc/<pid>/stat (clock ticks of 10 ms: a block of requests is long
// enough for that resolution).
func cpuTimes(t *testing.T, pids map[string]int) map[string]time.Duration {
	t.Helper()
	out := map[string]time.Duration{}
	for name, pid := range pids {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		// After "(comm) ", utime and stime are the 12th and 13th fields.
		f := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+2:]))
		u, _ := strconv.ParseInt(f[11], 10, 64)
		s, _ := strconv.ParseInt(f[12], 10, 64)
		const clockTicks = 100 // USER_HZ on Linux
		out[name] = time.Duration(u+s) * time.Second / clockTicks
	}
	return out
}

// loadAverage is the machine's 1-, 5- and 15-minute load average.
func loadAverage() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	return strings.Join(strings.Fields(string(data))[:3], " ")
}

// histogram returns a histogram's sample sum and count, over all its
// series, from the router's metrics.
func (r *router) histogram(t *testing.T, name string) (sum, count float64) {
	t.Helper()
	resp, err := http.Get(r.admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range families[name].GetMetric() {
		sum += m.GetHistogram().GetSampleSum()
		count += float64(m.GetHistogram().GetSampleCount())
	}
	return sum, count
}
