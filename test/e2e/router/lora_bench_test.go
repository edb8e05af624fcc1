package router

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/fleet"
	"github.com/capstan-dev/capstan/test/fleet/paged"
)

// The LoRA benchmark's fleet: one base model on 4 simulated vLLM pods with
// 2 adapter slots each, every pod having all 8 adapters loaded, so that
// where a request goes decides only whether its adapter must be swapped
// into a slot.
const (
	loraBenchPods     = 4
	loraBenchSlots    = 2
	loraBenchAdapters = 8
)

// loraBenchOutEnv names the file TestLoRAAffinity writes its Markdown
// report to (hack/bench-routing.sh sets it); like TestRoutingQuality it is
// the benchmark when routingBenchEnv is set, a smoke test otherwise.
const loraBenchOutEnv = "CAPSTAN_BENCH_LORA_OUT"

// TestLoRAAffinity is the LoRA part of make bench-routing: open-loop
// Poisson load of requests for eight adapters of one base model, whose
// popularity falls as 1/rank (Zipf, s = 1: the first takes 37 % of the
// requests, the last 5 %), through round-robin and through the default
// balancer, which prefers pods where a request's adapter is active. It
// reports the slot loads the pods counted per 1,000 requests and TTFT, and
// fails unless the balancers with LoRA affinity load fewer adapters than
// round-robin.
// Unset, as in make test, it runs one short rate.
func TestLoRAAffinity(t *testing.T) {
	out := os.Getenv(loraBenchOutEnv)
	// least-requests balances as evenly without LoRA affinity; load-aware
	// has it without prefix-cache's prompt index.
	balancers := []string{"round-robin", "least-requests", "load-aware", "prefix-cache"}
	rates, window := []float64{40, 80}, 12*time.Second
	if os.Getenv(routingBenchEnv) == "" {
		balancers, rates, window = []string{"round-robin", "prefix-cache"}, []float64{40}, 4*time.Second
	}
	if only := os.Getenv(routingBenchBalancersEnv); only != "" {
		balancers = strings.Split(only, ",")
	}
	ctx := testContext(t, 20*time.Minute)
	ns := namespace(t, ctx, "lora-bench")
	simulate(t, ctx, ns, nil)
	var adapters []string
	for i := range loraBenchAdapters {
		adapters = append(adapters, fmt.Sprintf("adapter-%d", i))
	}
	pods := deploy(t, ctx, cluster.ModelServer{Namespace: ns, Name: "base", Model: "base", Replicas: loraBenchPods,
		Annotations: map[string]string{fleet.SchedulerAnnotation: "vllm", fleet.KVCacheBlocksAnnotation: benchKVBlocks,
			fleet.OutputTokensAnnotation: fmt.Sprint(benchMaxTokens), fleet.TimeScaleAnnotation: fmt.Sprint(benchTimeScale),
			fleet.LoRAAdaptersAnnotation: strings.Join(adapters, ","), fleet.MaxLoRAsAnnotation: fmt.Sprint(loraBenchSlots)}})
	var podURLs []string
	for _, p := range pods {
		podURLs = append(podURLs, fmt.Sprintf("http://%s:%d", p.Status.PodIP, modelserver.DefaultPort))
	}
	w := zipfAdapters(adapters)

	results := map[string][]benchPoint{}
	run := 0
	for _, b := range balancers {
		r := startRouter(t, ctx, "router-"+b, "--namespaces="+ns, "--balancer="+b, "--access-log=false", "--v=0")
		r.waitReady(t, ctx, "base", loraBenchPods)
		for _, a := range adapters {
			r.waitAdapterOn(t, ctx, a, loraBenchPods)
		}
		for ri, rate := range rates {
			// Every run has prompts of its own, so that none is found in
			// the prefix cache an earlier run left; the same arrivals and
			// adapters at the same rate.
			run++
			p := measure(t, ctx, []string{r.url}, podURLs, w, run, seed(9, ri), rate, window)
			results[b] = append(results[b], p)
			t.Logf("%s / %.0f req/s: %s, %d requests, %d slot loads", b, rate, p, p.sent, p.loraLoads)
		}
		r.proc.Stop(10 * time.Second)
	}

	var report strings.Builder
	fmt.Fprintf(&report, "Machine: %s; %d simulated vLLM pods of one base model (KV cache %s blocks each, time scale %d), each with all %d adapters loaded and %d adapter slots (max-loras), a slot load costing a step %s; adapters requested with Zipf popularity (s = 1); prompts of about 1 KB of their own, %d output tokens; %s of wall time per rate. Rates and times are the modelled GPUs'.\n\n",
		machine(), loraBenchPods, benchKVBlocks, benchTimeScale, loraBenchAdapters, loraBenchSlots, paged.Defaults.LoRALoad, benchMaxTokens, window)
	report.WriteString("| balancer | rate (req/s) | slot loads per 1000 requests | TTFT p50 | TTFT p90 | ITL p90 | req/s | prefix-cache hit rate | errors |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, b := range balancers {
		for i, p := range results[b] {
			fmt.Fprintf(&report, "| %s | %.0f | %.0f | %s | %s | %s | %.1f | %.1f %% | %d |\n", b, rates[i], perThousand(p),
				ms(p.ttft50), ms(p.ttft90), ms(p.itl90), p.reqPerSec, 100*p.hitRate, p.errors)
		}
	}
	t.Log("\n" + report.String())
	if out != "" {
		if err := os.WriteFile(out, []byte(report.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	rr := results["round-robin"]
	for _, b := range []string{"load-aware", "prefix-cache"} {
		for i := range min(len(rr), len(results[b])) {
			if p := results[b][i]; perThousand(p) >= perThousand(rr[i]) {
				t.Errorf("at %.0f req/s: %s made %.0f slot loads per 1000 requests, round-robin %.0f: want fewer with LoRA affinity",
					rates[i], b, perThousand(p), perThousand(rr[i]))
			}
		}
	}
}

func perThousand(p benchPoint) float64 {
	if p.sent == 0 {
		return 0
	}
	return 1000 * float64(p.loraLoads) / float64(p.sent)
}

// zipfAdapters asks for adapter k (from 0) with probability proportional
// to 1/(k+1), each request a prompt of its own.
func zipfAdapters(adapters []string) benchWorkload {
	cum := make([]float64, len(adapters))
	total := 0.0
	for k := range adapters {
		total += 1 / float64(k+1)
		cum[k] = total
	}
	return benchWorkload{name: "LoRA adapters, Zipf popularity",
		gen: func(run int) benchGen { return &loraPrompts{run: run} },
		model: func(rng *rand.Rand) string {
			x := rng.Float64() * total
			for k, c := range cum {
				if x < c {
					return adapters[k]
				}
			}
			return adapters[len(adapters)-1]
		}}
}

type loraPrompts struct {
	run int
	n   atomic.Int64
}

func (l *loraPrompts) next(*rand.Rand) ([]map[string]string, func(string)) {
	return []map[string]string{{"role": "user", "content": words(fmt.Sprintf("lora%d-prompt%d", l.run, l.n.Add(1)), 1000)}}, nil
}

// waitAdapterOn waits until the router serves an adapter from n endpoints.
func (r *router) waitAdapterOn(t *testing.T, ctx context.Context, adapter string, n int) {
	t.Helper()
	err := testCluster.WaitFor(ctx, 30*time.Second, fmt.Sprintf("the router to serve %s from %d pods", adapter, n), func(ctx context.Context) (bool, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, r.url+"/v1/models/"+adapter, nil)
		resp, err := client.Do(req)
		if err != nil {
			return false, err
		}
		defer resp.Body.Close()
		var m struct {
			LoadedOn []string `json:"loaded_on"`
		}
		return resp.StatusCode == http.StatusOK && json.NewDecoder(resp.Body).Decode(&m) == nil && len(m.LoadedOn) == n, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
