package fleet

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/capstan-dev/capstan/test/fleet/paged"
)

// request is the part of an OpenAI request body the simulator reads.
type request struct {
	Model     string          `json:"model"`
	Prompt    json.RawMessage `json:"prompt"`
	Messages  []message       `json:"messages"`
	Input     json.RawMessage `json:"input"`
	MaxTokens *int            `json:"max_tokens"`
	// max_completion_tokens is the chat API's newer spelling.
	MaxCompletionTokens *int `json:"max_completion_tokens"`
	Stream              bool `json:"stream"`
	StreamOptions       *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
}

type message struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

type usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

// apiKind is which OpenAI endpoint a request came to.
type apiKind int

const (
	completions apiKind = iota
	chatCompletions
	embeddings
)

// serveModels answers GET /v1/models with the pod's model and, as vLLM
// lists them, its LoRA adapters with the model as their parent.
func (s *podServer) serveModels(w http.ResponseWriter, _ *http.Request) {
	data := []map[string]any{{
		"id": s.model, "object": "model", "created": s.created.Unix(), "owned_by": "capstan-fleet", "root": s.model, "parent": nil,
	}}
	for _, a := range s.loras.list() {
		data = append(data, map[string]any{
			"id": a.name, "object": "model", "created": s.created.Unix(), "owned_by": "capstan-fleet", "root": a.path, "parent": s.model,
		})
	}
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": data})
}

// serveInference answers the completion, chat and embedding endpoints the way
// an engine with a bounded batch would: the request waits for a slot, takes
// the time to first token, then produces tokens one per TPOT.
func (s *podServer) serveInference(w http.ResponseWriter, r *http.Request, kind apiKind) {
	start := time.Now()
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		writeError(w, http.StatusMethodNotAllowed, "method not allowed", "BadRequestError")
		return
	}
	p := s.params()
	if p.faults[FaultSlow] && !sleep(r.Context(), p.faultDelay) {
		return
	}
	if p.faults[FaultHTTP500] {
		s.exp.failed()
		writeError(w, http.StatusInternalServerError, "simulated engine failure", "InternalServerError")
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 32<<20))
	if err != nil {
		return
	}
	var req request
	if err := json.Unmarshal(body, &req); err != nil {
		writeError(w, http.StatusBadRequest, "invalid JSON body: "+err.Error(), "BadRequestError")
		return
	}
	if req.Model != s.model && !s.loras.has(req.Model) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("The model `%s` does not exist.", req.Model), "NotFoundError")
		return
	}
	promptTokens := countTokens(req, kind)
	outputTokens := p.outputTokens
	if req.MaxTokens != nil && *req.MaxTokens >= 0 && *req.MaxTokens < outputTokens {
		outputTokens = *req.MaxTokens
	}
	if req.MaxCompletionTokens != nil && *req.MaxCompletionTokens >= 0 && *req.MaxCompletionTokens < outputTokens {
		outputTokens = *req.MaxCompletionTokens
	}
	finish := "stop" // the simulated answer ran to its natural end
	if outputTokens < p.outputTokens {
		finish = "length"
	}
	if kind == embeddings {
		outputTokens = 0
	}

	ctx := r.Context()
	var gen generation
	if s.paged != nil {
		var adapter string
		if req.Model != s.model {
			adapter = req.Model
		}
		gen = s.paged.start(promptText(req, kind), max(outputTokens, 1), adapter)
	} else {
		gen = &fixedGeneration{engine: s.engine, ttft: p.ttft, tpot: p.tpot}
	}
	defer gen.close()
	first, ok := gen.token(ctx, 0)
	if !ok {
		return // the client went away while queued or in prefill
	}
	queued, prefill := gen.queued()
	ttft := time.Since(start)
	s.exp.prefilled(promptTokens)

	if kind == embeddings {
		s.writeEmbeddings(w, req, promptTokens)
		s.exp.done(s.scaled(finished{queued: queued, prefill: prefill, ttft: ttft, e2e: time.Since(start), promptTokens: promptTokens, finishReason: "stop"}))
		return
	}
	id := fmt.Sprintf("cmpl-%s-%d", s.name, s.seq.Add(1))
	u := usage{PromptTokens: promptTokens, CompletionTokens: outputTokens, TotalTokens: promptTokens + outputTokens}
	if req.Stream {
		if !s.stream(ctx, w, kind, id, req, first, gen, outputTokens, finish, u) {
			return
		}
	} else {
		var b strings.Builder
		if outputTokens > 0 {
			b.WriteString(first)
		}
		for i := 1; i < outputTokens; i++ {
			t, ok := gen.token(ctx, i)
			if !ok {
				return
			}
			b.WriteString(t)
		}
		s.exp.generated(outputTokens)
		writeJSON(w, http.StatusOK, s.completion(kind, id, b.String(), finish, u))
	}
	s.exp.done(s.scaled(finished{queued: queued, prefill: prefill, ttft: ttft, e2e: time.Since(start),
		promptTokens: promptTokens, outputTokens: outputTokens, finishReason: finish}))
}

// stream writes a Server-Sent Events response, one chunk per token (the
// first, then gen's), flushed as each is produced, ending with
// "data: [DONE]". It reports whether the whole stream was written.
func (s *podServer) stream(ctx context.Context, w http.ResponseWriter, kind apiKind, id string, req request,
	first string, gen generation, tokens int, finish string, u usage) bool {
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	send := func(v any) bool {
		data, _ := json.Marshal(v)
		if _, err := fmt.Fprintf(w, "data: %s\n\n", data); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	for i := range tokens {
		t, ok := first, true
		if i > 0 {
			t, ok = gen.token(ctx, i)
		}
		if !ok || !send(s.chunk(kind, id, t, nil)) {
			return false
		}
		s.exp.generated(1)
	}
	if !send(s.chunk(kind, id, "", &finish)) {
		return false
	}
	if req.StreamOptions != nil && req.StreamOptions.IncludeUsage {
		final := s.chunk(kind, id, "", nil)
		final["choices"] = []any{}
		final["usage"] = u
		if !send(final) {
			return false
		}
	}
	_, err := io.WriteString(w, "data: [DONE]\n\n")
	return err == nil && rc.Flush() == nil
}

func (s *podServer) completion(kind apiKind, id, content, finish string, u usage) map[string]any {
	choice := map[string]any{"index": 0, "finish_reason": finish, "logprobs": nil}
	object := "text_completion"
	if kind == chatCompletions {
		object = "chat.completion"
		choice["message"] = map[string]any{"role": "assistant", "content": content}
	} else {
		choice["text"] = content
	}
	return map[string]any{"id": id, "object": object, "created": time.Now().Unix(), "model": s.model,
		"choices": []any{choice}, "usage": u}
}

func (s *podServer) chunk(kind apiKind, id, content string, finish *string) map[string]any {
	choice := map[string]any{"index": 0, "finish_reason": finish, "logprobs": nil}
	object := "text_completion"
	if kind == chatCompletions {
		object = "chat.completion.chunk"
		delta := map[string]any{}
		if content != "" {
			delta["content"] = content
		}
		choice["delta"] = delta
	} else {
		choice["text"] = content
	}
	return map[string]any{"id": id, "object": object, "created": time.Now().Unix(), "model": s.model,
		"choices": []any{choice}}
}

func (s *podServer) writeEmbeddings(w http.ResponseWriter, req request, promptTokens int) {
	inputs := 1
	var list []json.RawMessage
	if json.Unmarshal(req.Input, &list) == nil && len(list) > 0 {
		inputs = len(list)
	}
	data := make([]any, inputs)
	for i := range data {
		vec := make([]float64, 8)
		for j := range vec {
			vec[j] = float64((i+1)*(j+1)%7) / 7
		}
		data[i] = map[string]any{"object": "embedding", "index": i, "embedding": vec}
	}
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "model": s.model, "data": data,
		"usage": map[string]int{"prompt_tokens": promptTokens, "total_tokens": promptTokens}})
}

// countTokens approximates a tokenizer with whitespace-separated words of
// the prompt's content.
func countTokens(req request, kind apiKind) int {
	var n int
	switch kind {
	case chatCompletions:
		for _, m := range req.Messages {
			n += len(strings.Fields(contentText(m.Content)))
		}
	case embeddings:
		n = len(strings.Fields(contentText(req.Input)))
	default:
		n = len(strings.Fields(contentText(req.Prompt)))
	}
	return max(n, 1)
}

// promptText is the text the engine tokenizes: the prompt, the input, or the
// messages through the chat template.
func promptText(req request, kind apiKind) string {
	switch kind {
	case chatCompletions:
		msgs := make([]paged.Message, len(req.Messages))
		for i, m := range req.Messages {
			msgs[i] = paged.Message{Role: m.Role, Content: contentText(m.Content)}
		}
		return paged.ChatTemplate(msgs)
	case embeddings:
		return contentText(req.Input)
	}
	return contentText(req.Prompt)
}

// contentText is the text of a prompt, input or message content: a string,
// a list of them, or chat content parts ({"type":"text","text":...}).
func contentText(raw json.RawMessage) string {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s
	}
	var list []json.RawMessage
	if json.Unmarshal(raw, &list) == nil {
		parts := make([]string, 0, len(list))
		for _, item := range list {
			parts = append(parts, contentText(item))
		}
		return strings.Join(parts, " ")
	}
	var part struct {
		Text string `json:"text"`
	}
	if json.Unmarshal(raw, &part) == nil {
		return part.Text
	}
	return ""
}

var vocabulary = []string{"the", "model", "replies", "with", "simulated", "tokens", "from", "capstan"}

func word(i int) string { return vocabulary[i%len(vocabulary)] + " " }

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// writeError answers in vLLM's error shape.
func writeError(w http.ResponseWriter, status int, msg, typ string) {
	writeJSON(w, status, map[string]any{"object": "error", "message": msg, "type": typ, "param": nil, "code": status})
}
