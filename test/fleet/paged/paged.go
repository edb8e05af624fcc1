// Package paged models the scheduler and KV cache of a vLLM (v1) engine, step
// by step and without a clock: continuous batching under a per-step token
// budget (chunked prefill) and a cap on running sequences, a KV cache of
// fixed-size blocks that running sequences hold, preemption by recompute
// when it is full, automatic prefix caching over chained block hashes with
// least-recently-freed eviction, and LoRA adapters in a bounded number of
// slots. Each Step returns how long the step takes on the modelled GPU, so a
// caller can run it in real time (test/fleet) or add the durations up (its
// tests). docs/simulator.md gives the constants' sources.
package paged

import (
	"container/list"
	"hash/maphash"
	"slices"
	"time"
)

// Config is an engine's size and speed. The zero value of a field takes the
// default of Defaults.
type Config struct {
	// BlockSize is the number of tokens per KV-cache block.
	BlockSize int
	// NumBlocks is the KV cache's capacity in blocks.
	NumBlocks int
	// MaxNumSeqs caps the running sequences.
	MaxNumSeqs int
	// MaxBatchedTokens is the per-step token budget.
	MaxBatchedTokens int
	// NoPrefixCaching turns automatic prefix caching off.
	NoPrefixCaching bool
	// MaxLoRAs is how many distinct adapters a step may use, and so how
	// many adapter slots the GPU has.
	MaxLoRAs int

	// A step is bound by memory or by compute, whichever takes longer (a
	// roofline): memory is StepBase (reading the weights) plus
	// KVReadPerToken for each token of context the scheduled sequences
	// attend to; compute is ComputePerToken for each token the step
	// computes, prompt or decode. To that come PerSeq for each scheduled
	// sequence (scheduling, sampling) and LoRALoad for each adapter the
	// step has to load into a slot. Decode steps are memory-bound and grow
	// with the batch's context; prefill chunks are compute-bound, and far
	// cheaper per token.
	StepBase, KVReadPerToken, ComputePerToken, PerSeq, LoRALoad time.Duration
}

// Defaults model Llama-3.1-8B-Instruct in bf16 on one H100 SXM 80GB with
// vLLM's default engine arguments (see docs/simulator.md).
var Defaults = Config{
	BlockSize:        16,
	NumBlocks:        24800,
	MaxNumSeqs:       256,
	MaxBatchedTokens: 8192,
	MaxLoRAs:         1,
	StepBase:         6 * time.Millisecond,
	KVReadPerToken:   49 * time.Nanosecond,
	ComputePerToken:  32 * time.Microsecond,
	PerSeq:           20 * time.Microsecond,
	LoRALoad:         30 * time.Millisecond,
}

func (c Config) withDefaults() Config {
	d := Defaults
	for _, f := range []struct{ v, def *int }{
		{&c.BlockSize, &d.BlockSize}, {&c.NumBlocks, &d.NumBlocks}, {&c.MaxNumSeqs, &d.MaxNumSeqs},
		{&c.MaxBatchedTokens, &d.MaxBatchedTokens}, {&c.MaxLoRAs, &d.MaxLoRAs},
	} {
		if *f.v <= 0 {
			*f.v = *f.def
		}
	}
	for _, f := range []struct{ v, def *time.Duration }{
		{&c.StepBase, &d.StepBase}, {&c.KVReadPerToken, &d.KVReadPerToken}, {&c.ComputePerToken, &d.ComputePerToken},
		{&c.PerSeq, &d.PerSeq}, {&c.LoRALoad, &d.LoRALoad},
	} {
		if *f.v == 0 {
			*f.v = *f.def
		}
	}
	return c
}

// Request is what a sequence starts from.
type Request struct {
	Prompt []uint32
	// MaxTokens is how many tokens it generates (at least one).
	MaxTokens int
	// Adapter is the LoRA adapter it uses, "" for the base model.
	Adapter string
	// Next returns the i-th generated token (from 0); nil generates 0s.
	Next func(i int) uint32
}

// Seq is one request in the engine.
type Seq struct {
	req    Request
	tokens []uint32 // prompt, then generated
	// computed tokens have their KV in blocks.
	computed int
	blocks   []int
	// hashes are the chained hashes of the full blocks of tokens.
	hashes []uint64
	// scheduled is this step's token count.
	scheduled int
	done      bool
	// Preempted counts how often the sequence lost its blocks.
	Preempted int
	// CachedTokens is how many prompt tokens its first admission found in
	// the prefix cache.
	CachedTokens int
	admitted     bool
}

// Generated is how many tokens the sequence has generated.
func (s *Seq) Generated() int { return len(s.tokens) - len(s.req.Prompt) }

// Done reports whether the sequence has all its tokens.
func (s *Seq) Done() bool { return s.done }

// Admitted reports whether the sequence has been scheduled.
func (s *Seq) Admitted() bool { return s.admitted }

// Output is a step's result for one sequence: it generated a token.
type Output struct {
	Seq   *Seq
	Token uint32
	// First is set on the sequence's first token.
	First bool
}

// Stats are the engine's gauges and counters, under vLLM's meanings.
type Stats struct {
	Running, Waiting int
	// KVCacheUsage is the share of blocks not free (cached blocks no
	// sequence holds count as free).
	KVCacheUsage float64
	// PrefixQueries and PrefixHits count prompt tokens looked up in and
	// found in the prefix cache.
	PrefixQueries, PrefixHits int64
	Preemptions               int64
	// PromptTokens counts the prompt tokens of admitted requests, cached or
	// not; GenerationTokens the tokens generated.
	PromptTokens, GenerationTokens int64
	// RunningAdapters and WaitingAdapters are the adapters of running and
	// waiting sequences, sorted; MaxLoRAs the slots.
	RunningAdapters, WaitingAdapters []string
	MaxLoRAs                         int
	// LoRALoads counts adapters brought into a slot (each costing a step
	// LoRALoad): the slot swaps that LoRA affinity saves. vLLM exports no
	// such counter.
	LoRALoads int64
}

type block struct {
	ref    int
	hash   uint64
	hashed bool
	free   *list.Element // in the free queue when ref is 0
}

// Engine is one engine's state. It is not safe for concurrent use.
type Engine struct {
	cfg     Config
	seed    maphash.Seed
	blocks  []block
	free    *list.List     // block ids, the next to evict first
	cached  map[uint64]int // block hash → block id
	running []*Seq         // in admission order
	waiting []*Seq         // FIFO; preempted sequences go first
	slots   []string       // adapters loaded, least recently used first
	stats   Stats
}

// New returns an idle engine.
func New(cfg Config) *Engine {
	cfg = cfg.withDefaults()
	e := &Engine{cfg: cfg, seed: maphash.MakeSeed(), blocks: make([]block, cfg.NumBlocks), free: list.New(), cached: map[uint64]int{}}
	for i := range e.blocks {
		e.blocks[i].free = e.free.PushBack(i)
	}
	return e
}

// Config is the engine's configuration, defaults filled in.
func (e *Engine) Config() Config { return e.cfg }

// Add queues a request.
func (e *Engine) Add(r Request) *Seq {
	r.MaxTokens = max(r.MaxTokens, 1)
	s := &Seq{req: r, tokens: slices.Clip(slices.Clone(r.Prompt))}
	if len(s.tokens) == 0 {
		s.tokens = []uint32{0}
		s.req.Prompt = s.tokens
	}
	e.hashFull(s)
	e.waiting = append(e.waiting, s)
	return s
}

// Abort takes a sequence out, freeing its blocks.
func (e *Engine) Abort(s *Seq) {
	if s.done {
		return
	}
	s.done = true
	e.release(s)
	e.running = slices.DeleteFunc(e.running, func(x *Seq) bool { return x == s })
	e.waiting = slices.DeleteFunc(e.waiting, func(x *Seq) bool { return x == s })
}

// Idle reports whether no sequence is running or waiting.
func (e *Engine) Idle() bool { return len(e.running) == 0 && len(e.waiting) == 0 }

// Stats returns the engine's gauges and counters now.
func (e *Engine) Stats() Stats {
	st := e.stats
	st.Running, st.Waiting = len(e.running), len(e.waiting)
	st.KVCacheUsage = 1 - float64(e.free.Len())/float64(len(e.blocks))
	st.RunningAdapters, st.WaitingAdapters = adapters(e.running), adapters(e.waiting)
	st.MaxLoRAs = e.cfg.MaxLoRAs
	return st
}

func adapters(seqs []*Seq) []string {
	var out []string
	for _, s := range seqs {
		if s.req.Adapter != "" && !slices.Contains(out, s.req.Adapter) {
			out = append(out, s.req.Adapter)
		}
	}
	slices.Sort(out)
	return out
}

// Step schedules one step, runs it, and returns how long it took and the
// tokens it generated. An idle engine's step takes no time.
func (e *Engine) Step() (time.Duration, []Output) {
	if e.Idle() {
		return 0, nil
	}
	budget := e.cfg.MaxBatchedTokens
	var scheduled []*Seq
	batchAdapters := map[string]bool{}
	preempted := false

	// Running sequences first, in order; one that cannot get a block
	// preempts the newest running sequence, itself if it is the newest.
	for i := 0; i < len(e.running) && budget > 0; i++ {
		s := e.running[i]
		n := min(len(s.tokens)-s.computed, budget)
		for !e.allocate(s, n) {
			victim := e.running[len(e.running)-1]
			e.preempt(victim)
			preempted = true
			if victim == s {
				n = 0
				break
			}
		}
		if n == 0 {
			break // s preempted itself: it was the last running one
		}
		s.scheduled = n
		budget -= n
		scheduled = append(scheduled, s)
		if s.req.Adapter != "" {
			batchAdapters[s.req.Adapter] = true
		}
	}
	// Then waiting ones, in order, unless this step preempted.
	for i := 0; !preempted && i < len(e.waiting) && budget > 0 && len(e.running) < e.cfg.MaxNumSeqs; {
		s := e.waiting[i]
		if a := s.req.Adapter; a != "" && !batchAdapters[a] && len(batchAdapters) >= e.cfg.MaxLoRAs {
			i++ // no slot for its adapter in this step; later ones may fit
			continue
		}
		var hit []int
		if s.computed == 0 {
			hit = e.lookup(s)
		}
		n := min(len(s.tokens)-len(hit)*e.cfg.BlockSize, budget)
		for _, b := range hit {
			e.ref(b)
		}
		s.blocks, s.computed = append(s.blocks, hit...), len(hit)*e.cfg.BlockSize
		if !e.allocate(s, n) {
			e.release(s)
			s.computed = 0
			break // the cache is full: wait for running sequences to free it
		}
		if !s.admitted {
			s.admitted = true
			s.CachedTokens = s.computed
			e.stats.PromptTokens += int64(len(s.req.Prompt))
			e.stats.PrefixQueries += int64(len(s.req.Prompt))
			e.stats.PrefixHits += int64(s.computed)
		}
		e.waiting = slices.Delete(e.waiting, i, i+1)
		e.running = append(e.running, s)
		s.scheduled = n
		budget -= n
		scheduled = append(scheduled, s)
		if s.req.Adapter != "" {
			batchAdapters[s.req.Adapter] = true
		}
	}

	var loads, computed, context int
	// Adapters take their slots in the order of the batch, so that which
	// one is least recently used does not depend on map order.
	for _, s := range scheduled {
		if a := s.req.Adapter; batchAdapters[a] {
			batchAdapters[a] = false
			if e.loadAdapter(a) {
				loads++
			}
		}
	}
	e.stats.LoRALoads += int64(loads)
	var out []Output
	for _, s := range scheduled {
		computed += s.scheduled
		s.computed += s.scheduled
		context += s.computed
		s.scheduled = 0
		if s.computed < len(s.tokens) {
			continue // a prefill chunk: no token yet
		}
		tok := uint32(0)
		i := s.Generated()
		if s.req.Next != nil {
			tok = s.req.Next(i)
		}
		s.tokens = append(s.tokens, tok)
		e.hashFull(s)
		e.stats.GenerationTokens++
		out = append(out, Output{Seq: s, Token: tok, First: i == 0})
		if s.Generated() >= s.req.MaxTokens {
			s.done = true
			e.release(s)
			e.running = slices.DeleteFunc(e.running, func(x *Seq) bool { return x == s })
		}
	}
	memory := e.cfg.StepBase + time.Duration(context)*e.cfg.KVReadPerToken
	d := max(memory, time.Duration(computed)*e.cfg.ComputePerToken) +
		time.Duration(len(scheduled))*e.cfg.PerSeq + time.Duration(loads)*e.cfg.LoRALoad
	return d, out
}

// allocate gives s the blocks for n more tokens, or none and reports false.
// A cached block given out loses its hash.
func (e *Engine) allocate(s *Seq, n int) bool {
	need := ceilDiv(s.computed+n, e.cfg.BlockSize) - len(s.blocks)
	if need <= 0 {
		return true
	}
	if need > e.free.Len() {
		return false
	}
	for range need {
		id := e.free.Remove(e.free.Front()).(int)
		b := &e.blocks[id]
		b.free = nil
		if b.hashed {
			if e.cached[b.hash] == id {
				delete(e.cached, b.hash)
			}
			b.hashed = false
		}
		b.ref = 1
		s.blocks = append(s.blocks, id)
	}
	e.register(s, s.computed+n)
	return true
}

// lookup returns the cached blocks of the longest cached prefix of s's full
// blocks, leaving at least one token to compute.
func (e *Engine) lookup(s *Seq) []int {
	if e.cfg.NoPrefixCaching {
		return nil
	}
	limit := (len(s.tokens) - 1) / e.cfg.BlockSize
	var hit []int
	for _, h := range s.hashes[:min(limit, len(s.hashes))] {
		id, ok := e.cached[h]
		if !ok {
			break
		}
		hit = append(hit, id)
	}
	return hit
}

func (e *Engine) ref(id int) {
	b := &e.blocks[id]
	if b.ref == 0 && b.free != nil {
		e.free.Remove(b.free)
		b.free = nil
	}
	b.ref++
}

// register puts the full blocks of s's first upto tokens, which are
// computed or being computed this step, into the prefix cache.
func (e *Engine) register(s *Seq, upto int) {
	if e.cfg.NoPrefixCaching {
		return
	}
	full := min(len(s.hashes), len(s.blocks), upto/e.cfg.BlockSize)
	for i := range full {
		b := &e.blocks[s.blocks[i]]
		if b.hashed {
			continue
		}
		if _, dup := e.cached[s.hashes[i]]; dup {
			continue // computed twice at once; the first copy serves
		}
		b.hash, b.hashed = s.hashes[i], true
		e.cached[b.hash] = s.blocks[i]
	}
}

// release frees s's blocks, the last ones first, so that a prompt's tail is
// evicted before its head, which more requests share.
func (e *Engine) release(s *Seq) {
	for i := len(s.blocks) - 1; i >= 0; i-- {
		b := &e.blocks[s.blocks[i]]
		b.ref--
		if b.ref == 0 {
			b.free = e.free.PushBack(s.blocks[i])
		}
	}
	s.blocks = s.blocks[:0]
}

// preempt sends a running sequence back to the front of the waiting queue
// without its blocks: it is recomputed when it is admitted again.
func (e *Engine) preempt(s *Seq) {
	e.release(s)
	s.computed = 0
	s.Preempted++
	e.stats.Preemptions++
	e.running = slices.DeleteFunc(e.running, func(x *Seq) bool { return x == s })
	e.waiting = slices.Insert(e.waiting, 0, s)
}

// hashFull extends s's chained block hashes over its full blocks. The
// adapter is part of the first block's hash: an adapter's KV differs from
// the base model's.
func (e *Engine) hashFull(s *Seq) {
	bs := e.cfg.BlockSize
	for len(s.hashes) < len(s.tokens)/bs {
		i := len(s.hashes)
		var h maphash.Hash
		h.SetSeed(e.seed)
		if i == 0 {
			h.WriteString(s.req.Adapter)
		} else {
			writeUint64(&h, s.hashes[i-1])
		}
		for _, t := range s.tokens[i*bs : (i+1)*bs] {
			writeUint64(&h, uint64(t))
		}
		s.hashes = append(s.hashes, h.Sum64())
	}
}

// loadAdapter makes a the most recently used adapter slot and reports
// whether it had to be loaded.
func (e *Engine) loadAdapter(a string) bool {
	if i := slices.Index(e.slots, a); i >= 0 {
		e.slots = append(slices.Delete(e.slots, i, i+1), a)
		return false
	}
	if len(e.slots) >= e.cfg.MaxLoRAs {
		e.slots = e.slots[1:]
	}
	e.slots = append(e.slots, a)
	return true
}

func writeUint64(h *maphash.Hash, v uint64) {
	var b [8]byte
	for i := range b {
		b[i] = byte(v >> (8 * i))
	}
	h.Write(b[:])
}

func ceilDiv(a, b int) int { return (a + b - 1) / b }
