package fleet

import (
	"context"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/capstan-dev/capstan/test/fleet/paged"
)

// Annotations of the vLLM-like engine model (SchedulerAnnotation "vllm"),
// read when the fleet starts serving the pod. docs/simulator.md describes
// the model.
const (
	// SchedulerAnnotation "vllm" simulates vLLM's scheduler, KV cache,
	// prefix cache and LoRA slots (package paged) instead of the fixed
	// TTFT and TPOT of the default.
	SchedulerAnnotation = "sim.capstan.dev/scheduler"
	// KVCacheBlocksAnnotation is the KV cache's size in 16-token blocks.
	KVCacheBlocksAnnotation = "sim.capstan.dev/kv-cache-blocks"
	// MaxNumSeqsAnnotation caps the running sequences.
	MaxNumSeqsAnnotation = "sim.capstan.dev/max-num-seqs"
	// MaxBatchedTokensAnnotation is the per-step token budget.
	MaxBatchedTokensAnnotation = "sim.capstan.dev/max-batched-tokens"
	// PrefixCachingAnnotation "false" turns prefix caching off.
	PrefixCachingAnnotation = "sim.capstan.dev/prefix-caching"
	// LoRAAdaptersAnnotation lists the adapters the pod serves, comma
	// separated; a request names one as its model.
	LoRAAdaptersAnnotation = "sim.capstan.dev/lora-adapters"
	// MaxLoRAsAnnotation is the number of adapter slots.
	MaxLoRAsAnnotation = "sim.capstan.dev/max-loras"
	// TimeScaleAnnotation runs the engine faster (below 1) or slower than
	// the modelled GPU; metrics report the modelled time.
	TimeScaleAnnotation = "sim.capstan.dev/time-scale"
)

// generation yields one response's tokens as its engine produces them.
type generation interface {
	// token waits for the i-th token, i counting from 0 and each called in
	// turn, and returns its text; false if ctx ended first.
	token(ctx context.Context, i int) (string, bool)
	// queued is how long the request waited for the engine to take it,
	// and prefill how long it then took to its first token; valid once
	// token 0 is in.
	queued() (queued, prefill time.Duration)
	// close lets go of the engine's resources.
	close()
}

// fixedGeneration is the default engine's: a slot in a bounded batch, a
// fixed time to the first token and per token after it.
type fixedGeneration struct {
	engine            *engine
	ttft, tpot        time.Duration
	start, admittedAt time.Time // admittedAt is zero until it has a slot
	firstAt           time.Time
}

func (g *fixedGeneration) token(ctx context.Context, i int) (string, bool) {
	if i == 0 {
		g.start = time.Now()
		if g.engine.admit(ctx) != nil {
			return "", false
		}
		g.admittedAt = time.Now()
		if !sleep(ctx, g.ttft) {
			return "", false
		}
		g.firstAt = time.Now()
	} else if g.tpot > 0 && !sleep(ctx, g.tpot) {
		return "", false
	}
	return word(i), true
}

func (g *fixedGeneration) queued() (time.Duration, time.Duration) {
	return g.admittedAt.Sub(g.start), g.firstAt.Sub(g.admittedAt)
}

func (g *fixedGeneration) close() {
	if !g.admittedAt.IsZero() {
		g.engine.release()
	}
}

// pagedEngine runs a paged.Engine in real time: while it has work, one
// goroutine steps it and sleeps each step's duration, then hands the
// step's tokens to their requests.
type pagedEngine struct {
	scale float64

	mu      sync.Mutex
	e       *paged.Engine
	seqs    map[*paged.Seq]*pagedGeneration
	running bool // the stepping goroutine is on
}

func newPagedEngine(cfg paged.Config, scale float64) *pagedEngine {
	return &pagedEngine{scale: scale, e: paged.New(cfg), seqs: map[*paged.Seq]*pagedGeneration{}}
}

// pagedConfig reads a pod's engine-model annotations.
func pagedConfig(pod *corev1.Pod) (cfg paged.Config, scale float64, adapters []string) {
	a := pod.Annotations
	cfg.NumBlocks = intOr(a[KVCacheBlocksAnnotation], 0)
	cfg.MaxNumSeqs = intOr(a[MaxNumSeqsAnnotation], 0)
	cfg.MaxBatchedTokens = intOr(a[MaxBatchedTokensAnnotation], 0)
	cfg.MaxLoRAs = intOr(a[MaxLoRAsAnnotation], 0)
	cfg.NoPrefixCaching = a[PrefixCachingAnnotation] == "false"
	scale = 1
	if f, err := strconv.ParseFloat(a[TimeScaleAnnotation], 64); err == nil && f > 0 && !math.IsInf(f, 0) {
		scale = f
	}
	for name := range strings.SplitSeq(a[LoRAAdaptersAnnotation], ",") {
		if name = strings.TrimSpace(name); name != "" && !slices.Contains(adapters, name) {
			adapters = append(adapters, name)
		}
	}
	return cfg, scale, adapters
}

// start queues a request for text's tokens.
func (p *pagedEngine) start(text string, maxTokens int, adapter string) *pagedGeneration {
	g := &pagedGeneration{p: p, start: time.Now(), tokens: make(chan string, maxTokens)}
	p.mu.Lock()
	defer p.mu.Unlock()
	g.seq = p.e.Add(paged.Request{Prompt: paged.Tokenize(text), MaxTokens: maxTokens, Adapter: adapter, Next: paged.WordToken})
	p.seqs[g.seq] = g
	if !p.running {
		p.running = true
		go p.run()
	}
	return g
}

func (p *pagedEngine) run() {
	for {
		p.mu.Lock()
		if p.e.Idle() {
			p.running = false
			p.mu.Unlock()
			return
		}
		begun := time.Now()
		d, out := p.e.Step()
		for s, g := range p.seqs {
			if g.admittedAt.IsZero() && s.Admitted() {
				g.admittedAt = begun
			}
		}
		p.mu.Unlock()
		time.Sleep(time.Duration(float64(d) * p.scale))
		p.mu.Lock()
		for _, o := range out {
			if g, ok := p.seqs[o.Seq]; ok {
				g.tokens <- paged.Word(o.Seq.Generated() - 1)
				if o.Seq.Done() {
					delete(p.seqs, o.Seq)
				}
			}
		}
		p.mu.Unlock()
	}
}

// Running, Waiting, MaxRunning and KVCacheUsage are the load the metrics
// read; Stats the rest.
func (p *pagedEngine) Running() int    { return p.Stats().Running }
func (p *pagedEngine) Waiting() int    { return p.Stats().Waiting }
func (p *pagedEngine) MaxRunning() int { return p.e.Config().MaxNumSeqs }
func (p *pagedEngine) KVCacheUsage() float64 {
	return p.Stats().KVCacheUsage
}

func (p *pagedEngine) Stats() paged.Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.e.Stats()
}

// pagedGeneration is one request in a pagedEngine.
type pagedGeneration struct {
	p          *pagedEngine
	seq        *paged.Seq
	tokens     chan string // buffered for every token: the engine never waits
	start      time.Time
	admittedAt time.Time // guarded by p.mu
	firstAt    time.Time
}

func (g *pagedGeneration) token(ctx context.Context, i int) (string, bool) {
	select {
	case t := <-g.tokens:
		if i == 0 {
			g.firstAt = time.Now()
		}
		return t, true
	case <-ctx.Done():
		return "", false
	}
}

func (g *pagedGeneration) queued() (time.Duration, time.Duration) {
	g.p.mu.Lock()
	defer g.p.mu.Unlock()
	return g.admittedAt.Sub(g.start), g.firstAt.Sub(g.admittedAt)
}

// close aborts the request if it is not done: its blocks are freed.
func (g *pagedGeneration) close() {
	g.p.mu.Lock()
	defer g.p.mu.Unlock()
	g.p.e.Abort(g.seq)
	delete(g.p.seqs, g.seq)
}
