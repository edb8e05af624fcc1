package fleet

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2/ktesting"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

// loraPod is a simulated vLLM pod serving the adapter "sql" from the start,
// with run-time adapter loading enabled as vLLM's environment variable says.
func loraPod(annotations map[string]string) *corev1.Pod {
	pod := testPod(modelserver.VLLM, vllmPod(annotations))
	pod.Annotations[LoRAAdaptersAnnotation] = "sql"
	pod.Spec.Containers = []corev1.Container{{Name: "vllm", Env: []corev1.EnvVar{{Name: RuntimeLoRAUpdatingEnv, Value: "True"}}}}
	return pod
}

// postText posts body and returns the status and the answer's text.
func postText(t *testing.T, url, path, body string) (int, string) {
	t.Helper()
	resp, err := http.Post(url+path, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(data)
}

// adapters lists the adapters /v1/models reports, by name, with their root.
func adapters(t *testing.T, url string) map[string]string {
	t.Helper()
	resp, err := http.Get(url + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var list struct {
		Data []struct {
			ID     string  `json:"id"`
			Root   string  `json:"root"`
			Parent *string `json:"parent"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, m := range list.Data {
		if m.Parent != nil {
			if *m.Parent != "llama" {
				t.Errorf("adapter %s has parent %q, want llama", m.ID, *m.Parent)
			}
			out[m.ID] = m.Root
		}
	}
	return out
}

const completeSupport = `{"model":"support","prompt":"hello","max_tokens":2}`

// An adapter loaded at run time is listed with its path as its root and
// served; loading it twice is refused; unloaded, it is neither listed nor
// served, and unloading it again is 404, as vLLM answers.
func TestLoRALoadAndUnload(t *testing.T) {
	_, ts := testServer(t, loraPod(nil), Options{})
	if code, body := postText(t, ts.URL, "/v1/completions", completeSupport); code != http.StatusNotFound {
		t.Fatalf("before the load: %d %s", code, body)
	}
	if code, body := postText(t, ts.URL, "/v1/load_lora_adapter", `{"lora_name":"support","lora_path":"/models/support-v3"}`); code != http.StatusOK ||
		body != "Success: LoRA adapter 'support' added successfully." {
		t.Fatalf("load: %d %q", code, body)
	}
	if got := adapters(t, ts.URL); len(got) != 2 || got["sql"] != "/adapters/sql" || got["support"] != "/models/support-v3" {
		t.Errorf("adapters after the load: %v", got)
	}
	if code, body := postText(t, ts.URL, "/v1/completions", completeSupport); code != http.StatusOK {
		t.Errorf("after the load: %d %s", code, body)
	}
	if code, body := postText(t, ts.URL, "/v1/load_lora_adapter", `{"lora_name":"support","lora_path":"/models/support-v3"}`); code != http.StatusBadRequest ||
		!strings.Contains(body, "has already been loaded") {
		t.Errorf("second load: %d %s", code, body)
	}
	if code, body := postText(t, ts.URL, "/v1/unload_lora_adapter", `{"lora_name":"support"}`); code != http.StatusOK ||
		body != "Success: LoRA adapter 'support' removed successfully." {
		t.Fatalf("unload: %d %q", code, body)
	}
	if got := adapters(t, ts.URL); len(got) != 1 || got["sql"] == "" {
		t.Errorf("adapters after the unload: %v", got)
	}
	if code, body := postText(t, ts.URL, "/v1/completions", completeSupport); code != http.StatusNotFound {
		t.Errorf("after the unload: %d %s", code, body)
	}
	if code, body := postText(t, ts.URL, "/v1/unload_lora_adapter", `{"lora_name":"support"}`); code != http.StatusNotFound ||
		!strings.Contains(body, "cannot be found") {
		t.Errorf("second unload: %d %s", code, body)
	}
}

// Bad load and unload calls get vLLM's 400, bodies are bounded, and an
// engine without run-time updating has no such endpoints.
func TestLoRABadCalls(t *testing.T) {
	_, ts := testServer(t, loraPod(nil), Options{})
	for name, c := range map[string]struct{ path, body string }{
		"load without a path":     {"/v1/load_lora_adapter", `{"lora_name":"x"}`},
		"load without a name":     {"/v1/load_lora_adapter", `{"lora_path":"/x"}`},
		"unload without a name":   {"/v1/unload_lora_adapter", `{}`},
		"not JSON":                {"/v1/load_lora_adapter", `lora`},
		"a body beyond the bound": {"/v1/load_lora_adapter", `{"lora_name":"x","lora_path":"` + strings.Repeat("a", maxLoRARequestBody) + `"}`},
	} {
		if code, body := postText(t, ts.URL, c.path, c.body); code != http.StatusBadRequest {
			t.Errorf("%s: %d %s", name, code, body)
		}
	}
	if got := adapters(t, ts.URL); len(got) != 1 {
		t.Errorf("bad calls changed the adapters: %v", got)
	}

	pod := loraPod(nil)
	pod.Spec.Containers = nil
	_, plain := testServer(t, pod, Options{})
	if code, body := postText(t, plain.URL, "/v1/load_lora_adapter", `{"lora_name":"x","lora_path":"/x"}`); code != http.StatusNotFound {
		t.Errorf("load without %s: %d %s", RuntimeLoRAUpdatingEnv, code, body)
	}
}

// A load takes the load time, during which the adapter is not served and
// a second load of it is refused; with the lora-load fault it fails after
// the load time and the adapter stays unserved; the fault gone, it loads.
func TestLoRALoadTimeAndFault(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const loadTime = 3 * time.Second
		// No listener: a goroutine blocked on the network would keep the
		// bubble from ever being idle.
		logger, _ := ktesting.NewTestContext(t)
		s := newPodServer(loraPod(map[string]string{LoRALoadTimeAnnotation: loadTime.String()}), Options{}.withDefaults(), new(atomic.Int64), logger)
		call := func(handler http.HandlerFunc, body string) *httptest.ResponseRecorder {
			rec := httptest.NewRecorder()
			handler(rec, httptest.NewRequest(http.MethodPost, "/", strings.NewReader(body)))
			return rec
		}
		load := `{"lora_name":"support","lora_path":"/models/support"}`

		done := make(chan *httptest.ResponseRecorder)
		start := time.Now()
		go func() { done <- call(s.serveLoadLoRA, load) }()
		synctest.Wait()
		if s.loras.has("support") {
			t.Error("the adapter is served before its load time has passed")
		}
		if rec := call(s.serveLoadLoRA, load); rec.Code != http.StatusBadRequest {
			t.Errorf("a load during the load: %d %s", rec.Code, rec.Body)
		}
		rec := <-done
		if rec.Code != http.StatusOK || time.Since(start) != loadTime || !s.loras.has("support") {
			t.Errorf("load: %d %s after %v, served %v", rec.Code, rec.Body, time.Since(start), s.loras.has("support"))
		}

		s.pod.Store(withFault(s.pod.Load(), FaultLoRALoad))
		start = time.Now()
		rec = call(s.serveLoadLoRA, `{"lora_name":"chat","lora_path":"/models/chat"}`)
		if rec.Code != http.StatusBadRequest || time.Since(start) != loadTime || s.loras.has("chat") {
			t.Errorf("load with the fault: %d %s after %v, served %v", rec.Code, rec.Body, time.Since(start), s.loras.has("chat"))
		}
		s.pod.Store(withFault(s.pod.Load(), ""))
		if rec := call(s.serveLoadLoRA, `{"lora_name":"chat","lora_path":"/models/chat"}`); rec.Code != http.StatusOK || !s.loras.has("chat") {
			t.Errorf("load without the fault: %d %s", rec.Code, rec.Body)
		}
	})
}
