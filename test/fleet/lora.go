package fleet

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
)

// RuntimeLoRAUpdatingEnv is vLLM's switch for loading and unloading LoRA
// adapters at run time: a simulated vLLM pod whose container sets it to
// "True" (or "1") serves /v1/load_lora_adapter and /v1/unload_lora_adapter,
// as vLLM does, and answers 404 on them otherwise.
const RuntimeLoRAUpdatingEnv = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"

// LoRALoadTimeAnnotation is how long loading an adapter at run time takes
// (default 0): vLLM reads the adapter's weights before it answers.
const LoRALoadTimeAnnotation = "sim.capstan.dev/lora-load-time"

// FaultLoRALoad makes every run-time adapter load fail, after the load
// time, with vLLM's 400 answer to an adapter it could not load.
const FaultLoRALoad Fault = "lora-load"

// maxLoRARequestBody bounds a load or unload request's body.
const maxLoRARequestBody = 64 << 10

// loras are a simulated engine's LoRA adapters: those it was started with
// (LoRAAdaptersAnnotation) and those loaded at run time, in the order they
// were loaded, which is how /v1/models lists them.
type loras struct {
	mu      sync.Mutex
	loaded  []lora
	loading map[string]bool
}

// lora is a loaded adapter: its name and where its weights came from.
type lora struct{ name, path string }

func newLoRAs(initial []string) *loras {
	l := &loras{loading: map[string]bool{}}
	for _, name := range initial {
		l.loaded = append(l.loaded, lora{name: name, path: "/adapters/" + name})
	}
	return l
}

func (l *loras) index(name string) int {
	return slices.IndexFunc(l.loaded, func(a lora) bool { return a.name == name })
}

func (l *loras) has(name string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.index(name) >= 0
}

func (l *loras) list() []lora {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.loaded)
}

// runtimeLoRAUpdating reports whether the pod's engine allows loading
// adapters at run time.
func runtimeLoRAUpdating(pod *corev1.Pod) bool {
	for _, c := range pod.Spec.Containers {
		for _, e := range c.Env {
			if e.Name == RuntimeLoRAUpdatingEnv && (strings.EqualFold(e.Value, "true") || e.Value == "1") {
				return true
			}
		}
	}
	return false
}

// loraRequest is the body of vLLM's load and unload calls.
type loraRequest struct {
	Name string `json:"lora_name"`
	Path string `json:"lora_path"`
}

// readLoRARequest decodes a load or unload body, answering 400 itself when
// it cannot.
func readLoRARequest(w http.ResponseWriter, r *http.Request) (loraRequest, bool) {
	var req loraRequest
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxLoRARequestBody))
	if err == nil {
		err = json.Unmarshal(body, &req)
	}
	if err != nil {
		writeError(w, http.StatusBadRequest, "invalid JSON body: "+err.Error(), "BadRequestError")
		return req, false
	}
	return req, true
}

// serveLoadLoRA is vLLM's POST /v1/load_lora_adapter: the adapter is served
// once the load time has passed, unless the lora-load fault fails it.
func (s *podServer) serveLoadLoRA(w http.ResponseWriter, r *http.Request) {
	req, ok := readLoRARequest(w, r)
	if !ok {
		return
	}
	if req.Name == "" || req.Path == "" {
		writeError(w, http.StatusBadRequest, "Both 'lora_name' and 'lora_path' must be provided.", "BadRequestError")
		return
	}
	l := s.loras
	l.mu.Lock()
	if l.index(req.Name) >= 0 || l.loading[req.Name] {
		l.mu.Unlock()
		writeError(w, http.StatusBadRequest, fmt.Sprintf("The lora adapter '%s' has already been loaded.", req.Name), "BadRequestError")
		return
	}
	l.loading[req.Name] = true
	l.mu.Unlock()

	p := s.params()
	loaded := sleep(r.Context(), p.loraLoadTime) && !p.faults[FaultLoRALoad]
	l.mu.Lock()
	delete(l.loading, req.Name)
	if loaded {
		l.loaded = append(l.loaded, lora{name: req.Name, path: req.Path})
	}
	l.mu.Unlock()
	switch {
	case r.Context().Err() != nil:
	case !loaded:
		writeError(w, http.StatusBadRequest, fmt.Sprintf("simulated failure loading LoRA adapter '%s' from '%s'", req.Name, req.Path), "BadRequestError")
	default:
		writeText(w, fmt.Sprintf("Success: LoRA adapter '%s' added successfully.", req.Name))
	}
}

// writeText answers 200 with a plain-text message, as vLLM's adapter calls
// do.
func writeText(w http.ResponseWriter, msg string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = io.WriteString(w, msg)
}

// serveUnloadLoRA is vLLM's POST /v1/unload_lora_adapter. Requests already
// running with the adapter finish; new ones are answered 404.
func (s *podServer) serveUnloadLoRA(w http.ResponseWriter, r *http.Request) {
	req, ok := readLoRARequest(w, r)
	if !ok {
		return
	}
	if req.Name == "" {
		writeError(w, http.StatusBadRequest, "'lora_name' needs to be provided to unload a LoRA adapter.", "BadRequestError")
		return
	}
	l := s.loras
	l.mu.Lock()
	i := l.index(req.Name)
	if i >= 0 {
		l.loaded = slices.Delete(l.loaded, i, i+1)
	}
	l.mu.Unlock()
	if i < 0 {
		writeError(w, http.StatusNotFound, fmt.Sprintf("The lora adapter '%s' cannot be found.", req.Name), "NotFoundError")
		return
	}
	writeText(w, fmt.Sprintf("Success: LoRA adapter '%s' removed successfully.", req.Name))
}
