package router

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/fleet"
)

// loraEngine calls a simulated vLLM pod's adapter API directly, as the
// engine's operator (or a loader) would.
func loraEngine(t *testing.T, ctx context.Context, pod corev1.Pod, call, body string) {
	t.Helper()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, fmt.Sprintf("http://%s:8000/v1/%s", pod.Status.PodIP, call), strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s on %s: %s", call, pod.Name, resp.Status)
	}
}

// loadedOn returns where the router says an adapter is loaded, and its
// parent; ok is false while it does not list the adapter.
func (r *router) loadedOn(ctx context.Context, adapter string) (pods []string, parent string, ok bool, err error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, r.url+"/v1/models/"+adapter, nil)
	resp, err := client.Do(req)
	if err != nil {
		return nil, "", false, err
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound {
		return nil, "", false, nil
	}
	var o struct {
		Parent   string   `json:"parent"`
		LoadedOn []string `json:"loaded_on"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&o); err != nil {
		return nil, "", false, err
	}
	return o.LoadedOn, o.Parent, true, nil
}

// waitLoadedOn waits until the router serves the adapter from exactly these
// pods (none: it does not know the adapter).
func (r *router) waitLoadedOn(t *testing.T, ctx context.Context, ns, adapter string, pods ...string) {
	t.Helper()
	var want []string
	for _, p := range pods {
		want = append(want, ns+"/"+p)
	}
	slices.Sort(want)
	var last []string
	err := testCluster.WaitFor(ctx, 10*time.Second, fmt.Sprintf("the router to serve %s from %v", adapter, want), func(ctx context.Context) (bool, error) {
		got, parent, ok, err := r.loadedOn(ctx, adapter)
		if err != nil {
			return false, err
		}
		slices.Sort(got)
		last = got
		return ok == (len(want) > 0) && slices.Equal(got, want) && (!ok || parent == "llama"), nil
	})
	if err != nil {
		t.Fatalf("%v; last seen loaded on %v", err, last)
	}
}

// A request naming a LoRA adapter goes only to the pods whose engine
// reports it loaded: the router follows the engines' own model lists as
// adapters are loaded and unloaded at run time, base-model requests still
// go to every pod, and an adapter loaded nowhere is 404.
func TestLoRAAdapterRouting(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	ns := namespace(t, ctx, "lora")
	var seen arrivals
	simulate(t, ctx, ns, seen.add)
	pods := deploy(t, ctx, cluster.ModelServer{Namespace: ns, Name: "llama", Model: "llama", Replicas: 3,
		Env: []corev1.EnvVar{{Name: fleet.RuntimeLoRAUpdatingEnv, Value: "True"}}})
	r := startRouter(t, ctx, "router-lora", "--namespaces="+ns, spreadEvenly, "--lora-poll-interval=200ms")
	r.waitReady(t, ctx, "llama", 3)
	slices.SortFunc(pods, func(a, b corev1.Pod) int { return strings.Compare(a.Name, b.Name) })

	if res := r.post(ctx, "/v1/completions", completion("support")); res.status != http.StatusNotFound {
		t.Fatalf("an adapter loaded nowhere: %d %s", res.status, res.body)
	}
	load := `{"lora_name":"support","lora_path":"/adapters/support-v3"}`
	loraEngine(t, ctx, pods[0], "load_lora_adapter", load)
	loraEngine(t, ctx, pods[1], "load_lora_adapter", load)
	r.waitLoadedOn(t, ctx, ns, "support", pods[0].Name, pods[1].Name)

	// completions counts the completions each pod got (the router also
	// asks the pods for their model lists).
	completions := func() map[string]int {
		n := map[string]int{}
		for _, x := range seen.all() {
			if x.Path == "/v1/completions" {
				n[x.Pod.Name]++
			}
		}
		return n
	}
	// send sends n requests for model and returns how many each pod got.
	send := func(model string, n int) map[string]int {
		t.Helper()
		before := completions()
		for i := range n {
			if res := r.post(ctx, "/v1/completions", completion(model)); res.status != http.StatusOK {
				t.Fatalf("request %d for %s: %d %s", i, model, res.status, res.body)
			}
		}
		got := completions()
		for pod, k := range before {
			got[pod] -= k
		}
		return got
	}
	got := send("support", 30)
	if got[pods[2].Name] != 0 || got[pods[0].Name] == 0 || got[pods[1].Name] == 0 {
		t.Errorf("requests for the adapter loaded on %s and %s reached %v", pods[0].Name, pods[1].Name, got)
	}
	if got := send("llama", 30); got[pods[2].Name] == 0 {
		t.Errorf("base-model requests reached %v: the pod without the adapter got none", got)
	}

	// Unloaded from one pod, then from the other: the router follows.
	loraEngine(t, ctx, pods[0], "unload_lora_adapter", `{"lora_name":"support"}`)
	r.waitLoadedOn(t, ctx, ns, "support", pods[1].Name)
	if got := send("support", 10); got[pods[1].Name] != 10 {
		t.Errorf("requests for the adapter now loaded only on %s reached %v", pods[1].Name, got)
	}
	loraEngine(t, ctx, pods[1], "unload_lora_adapter", `{"lora_name":"support"}`)
	r.waitLoadedOn(t, ctx, ns, "support")
	if res := r.post(ctx, "/v1/completions", completion("support")); res.status != http.StatusNotFound || !strings.Contains(res.body, "model_not_found") {
		t.Errorf("the adapter unloaded everywhere: %d %s", res.status, res.body)
	}
}
