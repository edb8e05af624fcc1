package paged

import (
	"slices"
	"testing"
	"time"
)

// clock runs an engine on virtual time: the sum of its steps' durations.
type clock struct {
	e     *Engine
	now   time.Duration
	first map[*Seq]time.Duration
	steps []time.Duration // of steps that only decoded
}

func newClock(e *Engine) *clock { return &clock{e: e, first: map[*Seq]time.Duration{}} }

// run steps until the engine is idle or until stop says so.
func (c *clock) run(t *testing.T, stop func() bool) {
	t.Helper()
	for i := 0; !c.e.Idle() && (stop == nil || !stop()); i++ {
		if i > 1_000_000 {
			t.Fatal("the engine does not finish")
		}
		d, out := c.e.Step()
		c.now += d
		for _, o := range out {
			if o.First {
				c.first[o.Seq] = c.now
			}
		}
		if len(out) > 0 && !slices.ContainsFunc(out, func(o Output) bool { return o.First }) {
			c.steps = append(c.steps, d)
		}
	}
}

func tokens(start, n int) []uint32 {
	out := make([]uint32, n)
	for i := range out {
		out[i] = uint32(start + i)
	}
	return out
}

// A request whose prompt shares a cached prefix prefills only the rest:
// its time to first token shrinks by the cached share, and the prefix-cache
// counters say how much was found.
func TestCachedPrefixCutsTTFT(t *testing.T) {
	e := New(Config{})
	c := newClock(e)
	shared := tokens(0, 960)
	a := e.Add(Request{Prompt: append(slices.Clone(shared), tokens(10_000, 64)...), MaxTokens: 4})
	c.run(t, nil)
	ttftA := c.first[a]

	start := c.now
	b := e.Add(Request{Prompt: append(slices.Clone(shared), tokens(20_000, 64)...), MaxTokens: 4})
	c.run(t, nil)
	ttftB := c.first[b] - start

	if b.CachedTokens != 960 {
		t.Errorf("b found %d tokens cached, want the 960 shared ones", b.CachedTokens)
	}
	st := e.Stats()
	if st.PrefixQueries != 2048 || st.PrefixHits != 960 {
		t.Errorf("prefix cache queries %d hits %d, want 2048 and 960", st.PrefixQueries, st.PrefixHits)
	}
	// a computes 1024 tokens in its step (compute-bound); b 64, which
	// leaves its step memory-bound: the weights and 1024 tokens of KV.
	cfg := e.Config()
	wantA := 1024*cfg.ComputePerToken + cfg.PerSeq
	wantB := cfg.StepBase + 1024*cfg.KVReadPerToken + cfg.PerSeq
	if ttftA != wantA || ttftB != wantB {
		t.Errorf("TTFT a %s, b %s; want %s and %s", ttftA, ttftB, wantA, wantB)
	}

	off := New(Config{NoPrefixCaching: true})
	c = newClock(off)
	off.Add(Request{Prompt: append(slices.Clone(shared), tokens(10_000, 64)...), MaxTokens: 4})
	c.run(t, nil)
	b = off.Add(Request{Prompt: append(slices.Clone(shared), tokens(20_000, 64)...), MaxTokens: 4})
	c.run(t, nil)
	if b.CachedTokens != 0 || off.Stats().PrefixHits != 0 {
		t.Errorf("with prefix caching off, %d tokens were found cached", b.CachedTokens)
	}
}

// A prompt that is cached whole still computes its last token (the one the
// first output comes from), and a different adapter's cache is not the base
// model's.
func TestCacheHitLimits(t *testing.T) {
	e := New(Config{})
	c := newClock(e)
	p := tokens(0, 64) // exactly four blocks
	e.Add(Request{Prompt: p, MaxTokens: 1})
	c.run(t, nil)
	again := e.Add(Request{Prompt: p, MaxTokens: 1})
	lora := e.Add(Request{Prompt: p, MaxTokens: 1, Adapter: "sql"})
	c.run(t, nil)
	if again.CachedTokens != 48 {
		t.Errorf("the same prompt again found %d tokens cached, want 48 (the last block is recomputed)", again.CachedTokens)
	}
	if lora.CachedTokens != 0 {
		t.Errorf("an adapter's request found %d of the base model's tokens cached", lora.CachedTokens)
	}
}

// When the KV cache is full, the newest running sequence is preempted back
// to waiting and recomputed later; every sequence still gets all its
// tokens.
func TestFullCachePreempts(t *testing.T) {
	e := New(Config{NumBlocks: 12, BlockSize: 16, NoPrefixCaching: true})
	c := newClock(e)
	var seqs []*Seq
	for i := range 3 {
		seqs = append(seqs, e.Add(Request{Prompt: tokens(i*1000, 40), MaxTokens: 40}))
	}
	sawUsage := 0.0
	c.run(t, func() bool { sawUsage = max(sawUsage, e.Stats().KVCacheUsage); return false })
	st := e.Stats()
	if st.Preemptions == 0 {
		t.Error("three sequences needing 15 blocks in a 12-block cache were never preempted")
	}
	if seqs[2].Preempted == 0 {
		t.Errorf("preemptions %d, %d, %d: the newest sequence should go first", seqs[0].Preempted, seqs[1].Preempted, seqs[2].Preempted)
	}
	for i, s := range seqs {
		if !s.Done() || s.Generated() != 40 {
			t.Errorf("sequence %d: done %t with %d tokens, want 40", i, s.Done(), s.Generated())
		}
	}
	if sawUsage < 0.9 {
		t.Errorf("KV-cache usage peaked at %.2f, want a full cache", sawUsage)
	}
	if st.KVCacheUsage != 0 || st.Running != 0 || st.Waiting != 0 {
		t.Errorf("after the run: %+v, want an empty engine", st)
	}
}

// Decoding gets slower per step as the batch grows, and prefill is far
// cheaper per token than decode.
func TestBatchGrowthSlowsDecode(t *testing.T) {
	itl := func(n int) time.Duration {
		e := New(Config{})
		c := newClock(e)
		for i := range n {
			e.Add(Request{Prompt: tokens(i*10_000, 512), MaxTokens: 32})
		}
		c.run(t, nil)
		var sum time.Duration
		for _, d := range c.steps {
			sum += d
		}
		return sum / time.Duration(len(c.steps))
	}
	one, many := itl(1), itl(64)
	if many < one*13/10 {
		t.Errorf("a decode step takes %s with 1 sequence and %s with 64, want at least 1.3× slower", one, many)
	}
	// A full chunk of prefill against one sequence's decode, per token.
	e := New(Config{})
	e.Add(Request{Prompt: tokens(0, 8192), MaxTokens: 1})
	chunk, _ := e.Step()
	if prefill := chunk / 8192; prefill*100 > one {
		t.Errorf("prefill %s per token, decode %s: prefill should be over 100× cheaper", prefill, one)
	}
}

// A prompt longer than the step's token budget is prefilled in chunks: its
// first token comes after ceil(prompt/budget left) steps, and a decoding
// sequence generates a token in each of them.
func TestChunkedPrefill(t *testing.T) {
	e := New(Config{MaxBatchedTokens: 1024})
	short := e.Add(Request{Prompt: tokens(0, 8), MaxTokens: 100})
	e.Step()
	long := e.Add(Request{Prompt: tokens(1000, 3000), MaxTokens: 1})
	before := short.Generated()
	steps := 0
	for ; !long.Done(); steps++ {
		if steps > 100 {
			t.Fatal("the long prompt never got its token")
		}
		e.Step()
	}
	// The short sequence's decode takes 1 token of each step's 1024.
	if steps != 3 {
		t.Errorf("the 3000-token prompt took %d steps, want ceil(3000/1023) = 3", steps)
	}
	if got := short.Generated() - before; got != steps {
		t.Errorf("the short sequence generated %d tokens in those %d steps, want one per step", got, steps)
	}
}

// With one adapter slot, two adapters' requests do not share a step: the
// second waits, then pays the load; running and waiting adapters are
// reported.
func TestLoRASlots(t *testing.T) {
	e := New(Config{MaxLoRAs: 1})
	c := newClock(e)
	a := e.Add(Request{Prompt: tokens(0, 8), MaxTokens: 4, Adapter: "sql"})
	b := e.Add(Request{Prompt: tokens(100, 8), MaxTokens: 4, Adapter: "chat"})
	base := e.Add(Request{Prompt: tokens(200, 8), MaxTokens: 4})
	d, _ := e.Step()
	c.now += d
	st := e.Stats()
	if !slices.Equal(st.RunningAdapters, []string{"sql"}) || !slices.Equal(st.WaitingAdapters, []string{"chat"}) || st.MaxLoRAs != 1 {
		t.Errorf("after the first step: running %v waiting %v max %d, want [sql] [chat] 1", st.RunningAdapters, st.WaitingAdapters, st.MaxLoRAs)
	}
	if st.Running != 2 {
		t.Errorf("%d running, want sql's and the base model's", st.Running)
	}
	cfg := e.Config()
	if d < cfg.StepBase+cfg.LoRALoad {
		t.Errorf("the first step took %s, want the adapter load of %s in it", d, cfg.LoRALoad)
	}
	c.run(t, nil)
	if !a.Done() || !b.Done() || !base.Done() {
		t.Fatal("not every request finished")
	}
	if c.first[b] <= c.first[a] {
		t.Errorf("chat's first token at %s, sql's at %s: chat should wait for sql's slot", c.first[b], c.first[a])
	}
}

// Every adapter brought into a slot counts as a load, and only that: an
// adapter already in a slot is used again for free, until another takes
// its slot.
func TestLoRALoadsCountSlotSwaps(t *testing.T) {
	e := New(Config{MaxLoRAs: 2})
	c := newClock(e)
	run := func(adapters ...string) {
		t.Helper()
		for i, a := range adapters {
			e.Add(Request{Prompt: tokens(100*i, 8), MaxTokens: 2, Adapter: a})
		}
		c.run(t, nil)
	}
	steps := []struct {
		adapters []string
		loads    int64 // in all, after the step
	}{
		{[]string{"sql", "", "sql"}, 1},     // sql into a free slot
		{[]string{"chat"}, 2},               // chat into the other
		{[]string{"sql", "chat", "sql"}, 2}, // both still in their slots
		{[]string{"summary"}, 3},            // summary takes sql's slot, the least recently used
		{[]string{"chat"}, 3},               // chat kept its slot
		{[]string{"sql"}, 4},                // sql is back, in summary's slot
	}
	for i, st := range steps {
		run(st.adapters...)
		if got := e.Stats().LoRALoads; got != st.loads {
			t.Fatalf("after requests %d (%v): %d loads, want %d", i, st.adapters, got, st.loads)
		}
	}
}

// Freed blocks stay cached until the space is needed; the least recently
// freed go first.
func TestEviction(t *testing.T) {
	e := New(Config{NumBlocks: 8, BlockSize: 16})
	c := newClock(e)
	old := tokens(0, 64)
	e.Add(Request{Prompt: old, MaxTokens: 1})
	c.run(t, nil)
	e.Add(Request{Prompt: tokens(1000, 64), MaxTokens: 1})
	c.run(t, nil)
	// 8 blocks hold both prompts' 4 blocks: the first is still cached.
	if s := e.Add(Request{Prompt: old, MaxTokens: 1}); func() bool { c.run(t, nil); return s.CachedTokens != 48 }() {
		t.Errorf("the first prompt found %d tokens cached, want 48", s.CachedTokens)
	}
	e.Add(Request{Prompt: tokens(2000, 128), MaxTokens: 1}) // needs all 8 blocks
	c.run(t, nil)
	if s := e.Add(Request{Prompt: old, MaxTokens: 1}); func() bool { c.run(t, nil); return s.CachedTokens != 0 }() {
		t.Errorf("after the cache was overwritten the first prompt found %d tokens cached", s.CachedTokens)
	}
}

// Aborting a sequence frees its blocks at once.
func TestAbort(t *testing.T) {
	e := New(Config{NumBlocks: 8})
	s := e.Add(Request{Prompt: tokens(0, 64), MaxTokens: 100})
	e.Step()
	if e.Stats().KVCacheUsage == 0 {
		t.Fatal("a running sequence holds no block")
	}
	e.Abort(s)
	if st := e.Stats(); st.KVCacheUsage != 0 || !e.Idle() {
		t.Errorf("after the abort: %+v", st)
	}
}

func TestTokenize(t *testing.T) {
	got := Tokenize("<|begin_of_text|>hello capstan<|eot_id|> a")
	want := []uint32{id("<|begin_of_text|>"), id("hell"), id("o"), id("caps"), id("tan"), id("<|eot_id|>"), id("a")}
	if !slices.Equal(got, want) {
		t.Errorf("Tokenize = %v, want %v", got, want)
	}
	for i := range 16 {
		if toks := Tokenize(Word(i)); len(toks) != 1 || toks[0] != WordToken(i) {
			t.Errorf("Word(%d) %q tokenizes to %v, want [%d]", i, Word(i), toks, WordToken(i))
		}
	}
	chat := ChatTemplate([]Message{{"system", "be brief"}, {"user", "hi"}})
	if want := "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"; chat != want {
		t.Errorf("ChatTemplate = %q", chat)
	}
}
