package router

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/fleet"
)

// routingBenchEnv makes TestRoutingQuality the benchmark
// (hack/bench-routing.sh sets it): "quick" for two rates of 8 s, anything
// else for four rates of 12 s. Unset, as in make test, the test runs a
// smoke version: round-robin and prefix-cache, one workload, one rate.
const routingBenchEnv = "CAPSTAN_BENCH_ROUTING"

// The simulated fleet of the routing benchmark: 8 pods of the vLLM engine
// model with a KV cache of 600 blocks (9,600 tokens), which holds the
// long prefixes of a few prompt groups but not of all eight.
const (
	benchPods      = 8
	benchKVBlocks  = "600"
	benchMaxTokens = 32
	// benchTimeScale runs the modelled GPUs four times slower than real
	// time, so that the rates that saturate them stay within what one
	// small machine's router, pods and clients can send; the report gives
	// modelled times and rates.
	benchTimeScale = 4
)

// TestRoutingQuality is make bench-routing: open-loop Poisson load at
// rising rates through capstan-router with each balancer, for four
// workloads, measuring what clients see (TTFT, inter-token latency,
// throughput, errors) and what the pods' own metrics say (prefix-cache hit
// rate, preemptions). It writes a Markdown report and one SVG per workload
// to $CAPSTAN_BENCH_OUT. Whatever the mode, it fails if prefix-cache does
// not find more of the shared prefixes cached than round-robin does.
func TestRoutingQuality(t *testing.T) {
	out := os.Getenv("CAPSTAN_BENCH_OUT")
	balancers := []string{"round-robin", "random", "least-requests", "load-aware", "prefix-affinity", "prefix-cache"}
	workloads := []benchWorkload{sharedPrefix("shared prefix, group text first", 0), sharedPrefix("shared prefix, common instructions first", 1536),
		multiTurn(), noSharedPrefix()}
	rates, window := []float64{40, 100, 160, 220}, 12*time.Second
	switch os.Getenv(routingBenchEnv) {
	case "":
		balancers, workloads, rates, window = []string{"round-robin", "prefix-cache"}, workloads[:1], []float64{80}, 3*time.Second
	case "quick":
		rates, window = []float64{80, 200}, 8*time.Second
	}
	ctx := testContext(t, 80*time.Minute)
	ns := namespace(t, ctx, "routing")
	simulate(t, ctx, ns, nil)
	pods := deploy(t, ctx, cluster.ModelServer{Namespace: ns, Name: "bench", Model: "bench", Replicas: benchPods,
		Annotations: map[string]string{fleet.SchedulerAnnotation: "vllm", fleet.KVCacheBlocksAnnotation: benchKVBlocks,
			fleet.OutputTokensAnnotation: fmt.Sprint(benchMaxTokens), fleet.TimeScaleAnnotation: fmt.Sprint(benchTimeScale)}})
	var podURLs []string
	for _, p := range pods {
		podURLs = append(podURLs, fmt.Sprintf("http://%s:%d", p.Status.PodIP, modelserver.DefaultPort))
	}

	var report strings.Builder
	fmt.Fprintf(&report, "Machine: %s; %d simulated vLLM pods (KV cache %s blocks each, time scale %d), %d output tokens per request, %s of wall time per rate. Rates, times and throughput are the modelled GPUs'.\n\n",
		machine(), benchPods, benchKVBlocks, benchTimeScale, benchMaxTokens, window)
	run := 0
	results := map[string]map[string][]benchPoint{} // workload → balancer → by rate
	for _, b := range balancers {
		r := startRouter(t, ctx, "router-"+b, "--namespaces="+ns, "--balancer="+b, "--access-log=false", "--v=0")
		r.waitReady(t, ctx, "bench", benchPods)
		for _, w := range workloads {
			for _, rate := range rates {
				run++
				p := measure(t, ctx, []string{r.url}, podURLs, w, run, rate, window)
				if results[w.name] == nil {
					results[w.name] = map[string][]benchPoint{}
				}
				results[w.name][b] = append(results[w.name][b], p)
				t.Logf("%s / %s / %.0f req/s: %s", w.name, b, rate, p)
			}
		}
		r.proc.Stop(10 * time.Second)
	}
	// Two router replicas of the cache-aware balancer, each given half the
	// clients, on the first workload at its middle rate.
	var replicas [2]*router
	for i := range replicas {
		replicas[i] = startRouter(t, ctx, fmt.Sprintf("router-prefix-cache-%d", i), "--namespaces="+ns, "--balancer=prefix-cache", "--access-log=false", "--v=0")
		replicas[i].waitReady(t, ctx, "bench", benchPods)
	}
	mid := rates[len(rates)/2]
	run++
	two := measure(t, ctx, []string{replicas[0].url, replicas[1].url}, podURLs, workloads[0], run, mid, window)

	for _, w := range workloads {
		fmt.Fprintf(&report, "### %s\n\n| balancer | rate (req/s) | TTFT p50 | TTFT p90 | ITL p90 | output tok/s | req/s | prefix-cache hit rate | preemptions | errors |\n|---|---|---|---|---|---|---|---|---|---|\n", w.name)
		for _, b := range balancers {
			for i, p := range results[w.name][b] {
				fmt.Fprintf(&report, "| %s | %.0f | %s | %s | %s | %.0f | %.1f | %.1f %% | %d | %d |\n", b, rates[i],
					ms(p.ttft50), ms(p.ttft90), ms(p.itl90), p.tokensPerSec, p.reqPerSec, 100*p.hitRate, p.preemptions, p.errors)
			}
		}
		report.WriteString("\n")
		if out != "" {
			name := strings.NewReplacer(" ", "-", ",", "").Replace(w.name) + ".svg"
			if err := os.WriteFile(strings.TrimSuffix(out, ".md")+"-"+name, []byte(plot(w.name, rates, balancers, results[w.name])), 0o644); err != nil {
				t.Error(err)
			}
		}
	}
	first := results[workloads[0].name]
	if rr, pc := first["round-robin"][0].hitRate, first["prefix-cache"][0].hitRate; pc <= rr {
		t.Errorf("%s at %.0f req/s: prefix-cache hit rate %.1f %%, round-robin %.1f %%: want prefix-cache higher", workloads[0].name, rates[0], 100*pc, 100*rr)
	}
	one := first["prefix-cache"][len(rates)/2]
	fmt.Fprintf(&report, "### Two router replicas (prefix-cache, %s, %.0f req/s)\n\nhit rate %.1f %% with two replicas, %.1f %% with one; TTFT p90 %s and %s.\n",
		workloads[0].name, mid, 100*two.hitRate, 100*one.hitRate, ms(two.ttft90), ms(one.ttft90))
	t.Log("\n" + report.String())
	if out != "" {
		if err := os.WriteFile(out, []byte(report.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// benchWorkload makes the requests of one workload. next returns a chat
// request's messages; done is told the answer, for conversations.
type benchWorkload struct {
	name string
	gen  func(run int) benchGen
}

type benchGen interface {
	next(rng *rand.Rand) (messages []map[string]string, done func(answer string))
}

// words makes n bytes of text that differ with seed.
func words(seed string, n int) string {
	var b strings.Builder
	rng := rand.New(rand.NewPCG(uint64(len(seed)), hashString(seed)))
	for b.Len() < n {
		fmt.Fprintf(&b, "%s%d ", seed[:min(len(seed), 6)], rng.IntN(1000))
	}
	return b.String()[:n]
}

func hashString(s string) uint64 {
	var h uint64 = 14695981039346656037
	for i := range len(s) {
		h = (h ^ uint64(s[i])) * 1099511628211
	}
	return h
}

type groups struct {
	run, common int
	system      []string
	q           int
	mu          sync.Mutex
}

// sharedPrefix is eight groups of ~6 KB system prompts, each with many
// distinct questions (the llm-d shape, scaled down); with common > 0 every
// system prompt starts with the same common bytes of instructions and the
// groups differ only after them.
func sharedPrefix(name string, common int) benchWorkload {
	return benchWorkload{name: name, gen: func(run int) benchGen {
		g := &groups{run: run, common: common}
		instructions := words(fmt.Sprintf("run%d-instructions", run), common)
		for i := range 8 {
			g.system = append(g.system, instructions+words(fmt.Sprintf("run%d-group%d", run, i), 6000-common))
		}
		return g
	}}
}

func (g *groups) next(rng *rand.Rand) ([]map[string]string, func(string)) {
	g.mu.Lock()
	g.q++
	q := g.q
	g.mu.Unlock()
	return []map[string]string{{"role": "system", "content": g.system[rng.IntN(len(g.system))]},
		{"role": "user", "content": words(fmt.Sprintf("run%d-question%d", g.run, q), 200)}}, nil
}

type unique struct {
	run int
	n   int
	mu  sync.Mutex
}

// noSharedPrefix is ~6 KB prompts that share nothing.
func noSharedPrefix() benchWorkload {
	return benchWorkload{name: "no shared prefix", gen: func(run int) benchGen { return &unique{run: run} }}
}

func (u *unique) next(*rand.Rand) ([]map[string]string, func(string)) {
	u.mu.Lock()
	u.n++
	n := u.n
	u.mu.Unlock()
	return []map[string]string{{"role": "user", "content": words(fmt.Sprintf("run%d-unique%d", u.run, n), 6200)}}, nil
}

// conversations is multi-turn chat: a conversation's next turn is sent
// with the whole history once its previous answer is in; a conversation
// ends after eight turns and a new one starts.
type conversations struct {
	run  int
	mu   sync.Mutex
	idle []*conversation
	n    int
}

type conversation struct {
	messages []map[string]string
	turns    int
}

func multiTurn() benchWorkload {
	return benchWorkload{name: "multi-turn chat", gen: func(run int) benchGen { return &conversations{run: run} }}
}

func (c *conversations) next(rng *rand.Rand) ([]map[string]string, func(string)) {
	c.mu.Lock()
	var conv *conversation
	if len(c.idle) > 0 && rng.IntN(4) > 0 {
		i := rng.IntN(len(c.idle))
		conv = c.idle[i]
		c.idle = slices.Delete(c.idle, i, i+1)
	} else {
		c.n++
		conv = &conversation{messages: []map[string]string{
			{"role": "system", "content": words(fmt.Sprintf("run%d-assistant", c.run), 1024)},
			{"role": "user", "content": words(fmt.Sprintf("run%d-conversation%d", c.run, c.n), 2000)}}}
	}
	c.mu.Unlock()
	msgs := slices.Clone(conv.messages)
	return msgs, func(answer string) {
		conv.turns++
		if answer == "" || conv.turns >= 8 {
			return
		}
		conv.messages = append(conv.messages, map[string]string{"role": "assistant", "content": answer},
			map[string]string{"role": "user", "content": words(fmt.Sprintf("run%d-turn%d-%d", c.run, conv.turns, rng.IntN(1<<30)), 600)})
		c.mu.Lock()
		c.idle = append(c.idle, conv)
		c.mu.Unlock()
	}
}

// benchPoint is one measurement.
type benchPoint struct {
	ttft50, ttft90, itl90   time.Duration
	tokensPerSec, reqPerSec float64
	hitRate                 float64
	preemptions, errors     int
}

func (p benchPoint) String() string {
	return fmt.Sprintf("TTFT p50 %s p90 %s, ITL p90 %s, %.0f tok/s, %.1f req/s, hit %.1f%%, %d preemptions, %d errors",
		ms(p.ttft50), ms(p.ttft90), ms(p.itl90), p.tokensPerSec, p.reqPerSec, 100*p.hitRate, p.preemptions, p.errors)
}

func ms(d time.Duration) string { return fmt.Sprintf("%.0f ms", float64(d)/float64(time.Millisecond)) }

// measure sends a Poisson stream at rate for window through the routers in
// turn, waits for the answers (at most a minute more), and reads the pods'
// prefix-cache and preemption counters before and after.
func measure(t *testing.T, ctx context.Context, routers, pods []string, w benchWorkload, run int, rate float64, window time.Duration) benchPoint {
	t.Helper()
	gen := w.gen(run)
	before := podCounters(ctx, t, pods)
	rng := rand.New(rand.NewPCG(uint64(run), 7))
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1024}, Timeout: 2 * time.Minute}
	defer client.CloseIdleConnections()
	var (
		mu          sync.Mutex
		ttfts, itls []time.Duration
		tokens      int
		errs        int
		last        time.Time
		wg          sync.WaitGroup
	)
	start := time.Now()
	wallRate := rate / benchTimeScale
	for at, i := time.Duration(0), 0; at < window; i++ {
		at += time.Duration(rng.ExpFloat64() / wallRate * float64(time.Second))
		time.Sleep(time.Until(start.Add(at)))
		msgs, done := gen.next(rng)
		url := routers[i%len(routers)]
		wg.Go(func() {
			ttft, itl, n, answer, err := chatStream(ctx, client, url, msgs)
			if done != nil {
				done(answer)
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs++
				return
			}
			ttfts, tokens, last = append(ttfts, ttft), tokens+n, time.Now()
			if n > 1 {
				itls = append(itls, itl)
			}
		})
	}
	wg.Wait()
	after := podCounters(ctx, t, pods)
	span := last.Sub(start).Seconds()
	p := benchPoint{ttft50: percentile(ttfts, 0.5) / benchTimeScale, ttft90: percentile(ttfts, 0.9) / benchTimeScale,
		itl90: percentile(itls, 0.9) / benchTimeScale, errors: errs, preemptions: int(after.preemptions - before.preemptions)}
	if span > 0 {
		p.tokensPerSec, p.reqPerSec = benchTimeScale*float64(tokens)/span, benchTimeScale*float64(len(ttfts))/span
	}
	if q := after.queries - before.queries; q > 0 {
		p.hitRate = (after.hits - before.hits) / q
	}
	return p
}

// chatStream sends one streamed chat completion and returns its time to
// first token, mean inter-token latency, token count and text.
func chatStream(ctx context.Context, client *http.Client, url string, msgs []map[string]string) (ttft, itl time.Duration, n int, text string, err error) {
	body, _ := json.Marshal(map[string]any{"model": "bench", "messages": msgs, "stream": true, "max_tokens": benchMaxTokens})
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url+"/v1/chat/completions", strings.NewReader(string(body)))
	req.Header.Set("Content-Type", "application/json")
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return 0, 0, 0, "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, 0, 0, "", fmt.Errorf("status %d", resp.StatusCode)
	}
	var first, lastAt time.Time
	var b strings.Builder
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok || line == "[DONE]" {
			continue
		}
		var chunk struct {
			Choices []struct {
				Delta struct {
					Content string `json:"content"`
				} `json:"delta"`
			} `json:"choices"`
		}
		if json.Unmarshal([]byte(line), &chunk) != nil || len(chunk.Choices) == 0 || chunk.Choices[0].Delta.Content == "" {
			continue
		}
		now := time.Now()
		if first.IsZero() {
			first = now
		}
		lastAt = now
		n++
		b.WriteString(chunk.Choices[0].Delta.Content)
	}
	if err := sc.Err(); err != nil || n == 0 {
		return 0, 0, 0, "", fmt.Errorf("stream ended after %d tokens: %v", n, err)
	}
	if n > 1 {
		itl = lastAt.Sub(first) / time.Duration(n-1)
	}
	return first.Sub(start), itl, n, b.String(), nil
}

func percentile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, int(math.Ceil(q*float64(len(s))))-1)]
}

type counters struct{ hits, queries, preemptions float64 }

// podCounters sums the pods' prefix-cache and preemption counters.
func podCounters(ctx context.Context, t *testing.T, pods []string) counters {
	t.Helper()
	var c counters
	for _, u := range pods {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, u+"/metrics", nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		parser := expfmt.NewTextParser(model.UTF8Validation)
		families, err := parser.TextToMetricFamilies(resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		sum := func(name string) float64 {
			v := 0.0
			for _, m := range families[name].GetMetric() {
				v += m.GetCounter().GetValue()
			}
			return v
		}
		c.hits += sum("vllm:prefix_cache_hits_total")
		c.queries += sum("vllm:prefix_cache_queries_total")
		c.preemptions += sum("vllm:num_preemptions_total")
	}
	return c
}

// plot draws TTFT p90 and output tokens/s against the rate, one line per
// balancer, as an SVG.
func plot(title string, rates []float64, balancers []string, points map[string][]benchPoint) string {
	const w, h, pad = 420, 260, 50
	colors := []string{"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="11">`, 2*w, h+60)
	fmt.Fprintf(&b, `<text x="10" y="16" font-size="13">%s</text>`, title)
	panel := func(x0 int, label string, value func(benchPoint) float64) {
		top := 0.0
		for _, ps := range points {
			for _, p := range ps {
				top = max(top, value(p))
			}
		}
		top = max(top, 1) * 1.1
		maxRate := rates[len(rates)-1]
		px := func(r float64) float64 { return float64(x0+pad) + r/maxRate*float64(w-2*pad) }
		py := func(v float64) float64 { return float64(h) - v/top*float64(h-2*pad) }
		fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="black"/>`, x0+pad, h, x0+w-pad, h)
		fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="black"/>`, x0+pad, h, x0+pad, 2*pad)
		fmt.Fprintf(&b, `<text x="%d" y="%d">%s (max %.0f)</text>`, x0+pad, 2*pad-8, label, top/1.1)
		fmt.Fprintf(&b, `<text x="%d" y="%d">rate (req/s), up to %.0f</text>`, x0+pad, h+16, maxRate)
		for i, name := range balancers {
			var pts []string
			for j, p := range points[name] {
				pts = append(pts, fmt.Sprintf("%.1f,%.1f", px(rates[j]), py(value(p))))
			}
			fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>`, colors[i%len(colors)], strings.Join(pts, " "))
		}
	}
	panel(0, "TTFT p90 (ms)", func(p benchPoint) float64 { return float64(p.ttft90) / float64(time.Millisecond) })
	panel(w, "output tokens/s", func(p benchPoint) float64 { return p.tokensPerSec })
	for i, name := range balancers {
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="10" height="10" fill="%s"/><text x="%d" y="%d">%s</text>`,
			pad+i*130, h+30, colors[i%len(colors)], pad+i*130+14, h+39, name)
	}
	b.WriteString(`</svg>`)
	return b.String()
}

// machine describes the host for the report.
func machine() string {
	return fmt.Sprintf("%s, %d CPUs", time.Now().UTC().Format("2006-01-02"), runtime.NumCPU())
}
