package fleet

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

func vllmPod(extra map[string]string) map[string]string {
	a := map[string]string{SchedulerAnnotation: "vllm", TimeScaleAnnotation: "0.05", OutputTokensAnnotation: "8",
		LoRAAdaptersAnnotation: "sql,chat"}
	for k, v := range extra {
		a[k] = v
	}
	return a
}

func post(t *testing.T, url, path, body string) (int, map[string]any) {
	t.Helper()
	code, data := postText(t, url, path, body)
	var out map[string]any
	if err := json.Unmarshal([]byte(data), &out); err != nil {
		t.Fatalf("%s: %v: %s", path, err, data)
	}
	return code, out
}

// With the vLLM-like engine model, a second chat turn that repeats the
// first turn and its answer finds them in the prefix cache, and the cache
// counters, the prefill histogram and the LoRA info say so.
func TestVLLMEngineModelMultiTurn(t *testing.T) {
	_, ts := testServer(t, testPod(modelserver.VLLM, vllmPod(nil)), Options{})
	system := strings.Repeat("You answer questions about Kubernetes clusters. ", 40)
	turn1 := fmt.Sprintf(`{"model":"llama","messages":[{"role":"system","content":%q},{"role":"user","content":"what is a pod"}]}`, system)
	code, first := post(t, ts.URL, "/v1/chat/completions", turn1)
	if code != http.StatusOK {
		t.Fatalf("first turn: %d %v", code, first)
	}
	answer := first["choices"].([]any)[0].(map[string]any)["message"].(map[string]any)["content"].(string)
	turn2 := fmt.Sprintf(`{"model":"llama","messages":[{"role":"system","content":%q},{"role":"user","content":"what is a pod"},{"role":"assistant","content":%q},{"role":"user","content":"and a node"}]}`, system, answer)
	if code, out := post(t, ts.URL, "/v1/chat/completions", turn2); code != http.StatusOK {
		t.Fatalf("second turn: %d %v", code, out)
	}
	families := scrape(t, ts.URL)
	l := map[string]string{"model_name": "llama"}
	queries := families["vllm:prefix_cache_queries_total"].GetMetric()[0].GetCounter().GetValue()
	hits := families["vllm:prefix_cache_hits_total"].GetMetric()[0].GetCounter().GetValue()
	// The system prompt alone is about 400 of the second turn's tokens.
	if hits < 400 || hits >= queries {
		t.Errorf("prefix cache hits %v of %v queried tokens, want the first turn's tokens found again", hits, queries)
	}
	if n := families["vllm:request_prefill_time_seconds"].GetMetric()[0].GetHistogram().GetSampleCount(); n != 2 {
		t.Errorf("prefill histogram has %d samples, want 2", n)
	}
	if v := gauge(t, families, "vllm:kv_cache_usage_perc", l); v != 0 {
		t.Errorf("KV-cache usage %v when idle, want 0 (cached blocks count as free)", v)
	}
	info := families["vllm:lora_requests_info"].GetMetric()
	if len(info) != 1 || !hasLabels(info[0], map[string]string{"max_lora": "1", "running_lora_adapters": "", "waiting_lora_adapters": ""}) {
		t.Errorf("vllm:lora_requests_info = %v", info)
	}
}

// Adapters are models of their own in /v1/models, with the base model as
// parent, and requests may name them; other names are 404.
func TestVLLMEngineModelAdapters(t *testing.T) {
	_, ts := testServer(t, testPod(modelserver.VLLM, vllmPod(nil)), Options{})
	resp, err := http.Get(ts.URL + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		Data []struct {
			ID     string  `json:"id"`
			Parent *string `json:"parent"`
		} `json:"data"`
	}
	err = json.NewDecoder(resp.Body).Decode(&list)
	resp.Body.Close()
	if err != nil || len(list.Data) != 3 || list.Data[0].ID != "llama" || list.Data[0].Parent != nil ||
		list.Data[1].ID != "sql" || list.Data[1].Parent == nil || *list.Data[1].Parent != "llama" {
		t.Fatalf("/v1/models: %+v %v", list, err)
	}
	if code, out := post(t, ts.URL, "/v1/completions", `{"model":"sql","prompt":"select","max_tokens":2}`); code != http.StatusOK {
		t.Errorf("a request for adapter sql: %d %v", code, out)
	}
	if code, _ := post(t, ts.URL, "/v1/completions", `{"model":"nope","prompt":"x"}`); code != http.StatusNotFound {
		t.Errorf("a request for an unknown adapter: %d, want 404", code)
	}
}

// The simulator counts the adapters it loads into a slot on the metrics
// page: with one slot, each request for another adapter than the last one's
// is a load.
func TestVLLMEngineModelCountsSlotLoads(t *testing.T) {
	_, ts := testServer(t, testPod(modelserver.VLLM, vllmPod(map[string]string{MaxLoRAsAnnotation: "1"})), Options{})
	for _, model := range []string{"sql", "sql", "llama", "chat", "sql"} {
		if code, out := post(t, ts.URL, "/v1/completions", fmt.Sprintf(`{"model":%q,"prompt":"select","max_tokens":2}`, model)); code != http.StatusOK {
			t.Fatalf("a request for %s: %d %v", model, code, out)
		}
	}
	m := scrape(t, ts.URL)[SimLoRASlotLoads].GetMetric()
	if len(m) != 1 || m[0].GetCounter().GetValue() != 3 {
		t.Errorf("%s = %v; want one series of 3 (sql, chat, sql again)", SimLoRASlotLoads, m)
	}
}

// A client that goes away frees its sequence: the engine ends up idle.
func TestVLLMEngineModelAbort(t *testing.T) {
	s, ts := testServer(t, testPod(modelserver.VLLM, vllmPod(map[string]string{TimeScaleAnnotation: "1", OutputTokensAnnotation: "10000"})), Options{})
	ctx, cancel := context.WithCancel(t.Context())
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, ts.URL+"/v1/completions", strings.NewReader(`{"model":"llama","prompt":"x","stream":true}`))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	if _, err := resp.Body.Read(buf); err != nil {
		t.Fatal(err)
	}
	if st := s.paged.Stats(); st.Running != 1 {
		t.Fatalf("running %d while streaming", st.Running)
	}
	cancel()
	resp.Body.Close()
	waitFor(t, "the engine to be idle", func() bool { st := s.paged.Stats(); return st.Running == 0 && st.KVCacheUsage == 0 })
}

func waitFor(t *testing.T, what string, done func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !done() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
