package router

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/router/lora"
	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/fleet"
)

// runtimeLoRA is the engine environment that allows loading adapters at
// run time.
var runtimeLoRA = []corev1.EnvVar{{Name: fleet.RuntimeLoRAUpdatingEnv, Value: "True"}}

// loader runs the router as its own leader, so that it loads adapters at
// once whatever other tests' routers hold the shared Lease.
const loader = "--leader-elect=false"

// declare sets (or, with "", removes) the adapters a model's Service
// declares.
func declare(t *testing.T, ctx context.Context, ns, service, declaration string) {
	t.Helper()
	value := "null"
	if declaration != "" {
		value = fmt.Sprintf("%q", declaration)
	}
	patch := fmt.Sprintf(`{"metadata":{"annotations":{%q:%s}}}`, lora.Annotation, value)
	if _, err := testCluster.Client.CoreV1().Services(ns).Patch(ctx, service, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
}

// calls returns when each pod was called at path.
func (a *arrivals) calls(path string) map[string][]time.Time {
	out := map[string][]time.Time{}
	for _, x := range a.all() {
		if x.Path == path {
			out[x.Pod.Name] = append(out[x.Pod.Name], x.At)
		}
	}
	return out
}

// An adapter declared on the model's Service is loaded by the router on
// every Ready pod of the model; a request for it sent while it is still
// loading is held and answered; a pod whose load fails is tried again with
// a growing backoff, has Warning Events on the Service, and gets none of
// the adapter's traffic until a try succeeds; removing the declaration
// unloads the adapter everywhere and its name is unknown again.
func TestDeclaredLoRAAdapters(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	ns := namespace(t, ctx, "lora-declared")
	var seen arrivals
	simulate(t, ctx, ns, seen.add)
	good := deploy(t, ctx, cluster.ModelServer{Namespace: ns, Name: "llama", Model: "llama", Replicas: 2, Env: runtimeLoRA,
		Annotations: map[string]string{fleet.LoRALoadTimeAnnotation: "2s"}})
	bad := deploy(t, ctx, cluster.ModelServer{Namespace: ns, Name: "llama-bad", Model: "llama", Replicas: 1, Env: runtimeLoRA,
		Annotations: map[string]string{fleet.FaultAnnotation: string(fleet.FaultLoRALoad)}})[0]
	r := startRouter(t, ctx, "router-lora-declared", "--namespaces="+ns, spreadEvenly, "--lora-poll-interval=500ms", loader)
	r.waitReady(t, ctx, "llama", 3)
	if res := r.post(ctx, "/v1/completions", completion("support")); res.status != http.StatusNotFound {
		t.Fatalf("an adapter neither declared nor loaded: %d %s", res.status, res.body)
	}

	declare(t, ctx, ns, "llama", "- {name: support, source: /adapters/support-v3}")
	err := testCluster.WaitFor(ctx, 10*time.Second, "the router to know the declaration", func(ctx context.Context) (bool, error) {
		pods, _, ok, err := r.loadedOn(ctx, "support")
		return ok && len(pods) == 0, err
	})
	if err != nil {
		t.Fatal(err)
	}
	// Loading takes the pods 2 s: this request waits for it.
	if res := r.post(ctx, "/v1/completions", completion("support")); res.status != http.StatusOK || res.pod == ns+"/"+bad.Name {
		t.Errorf("a request for the adapter while it loads: %d from %q: %s", res.status, res.pod, res.body)
	}
	r.waitLoadedOn(t, ctx, ns, "support", good[0].Name, good[1].Name)
	for i := range 20 {
		if res := r.post(ctx, "/v1/completions", completion("support")); res.status != http.StatusOK || res.pod == ns+"/"+bad.Name {
			t.Fatalf("request %d for the adapter: %d from %q: %s", i, res.status, res.pod, res.body)
		}
	}

	// The bad pod's loads fail: tried again, further apart each time.
	var attempts []time.Time
	err = testCluster.WaitFor(ctx, 30*time.Second, "three loads tried on the bad pod", func(context.Context) (bool, error) {
		attempts = seen.calls("/v1/load_lora_adapter")[bad.Name]
		return len(attempts) >= 3, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if gap1, gap2 := attempts[1].Sub(attempts[0]), attempts[2].Sub(attempts[1]); gap1 < 2*time.Second || gap2 < 4*time.Second {
		t.Errorf("the bad pod's loads were tried again after %s and %s; want the backoff (2s, then 4s)", gap1, gap2)
	}
	events, err := testCluster.Client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: fields.Set{
		"involvedObject.kind": "Service", "involvedObject.name": "llama", "reason": "LoRAAdapterLoadFailed"}.String()})
	if err != nil {
		t.Fatal(err)
	}
	if len(events.Items) == 0 || !strings.Contains(events.Items[0].Message, "pod "+ns+"/"+bad.Name) {
		t.Errorf("Warning Events on the Service: %+v", events.Items)
	}
	if n := r.metric(t, "capstan_router_lora_adapter_calls_total", map[string]string{"operation": "load", "result": "error"}); n < 3 {
		t.Errorf("failed loads counted: %v, want at least 3", n)
	}
	if n := r.metric(t, "capstan_router_lora_declared_adapter_endpoints", map[string]string{"adapter": "support", "state": "loaded"}); n != 2 {
		t.Errorf("declared adapter loaded on %v endpoints, want 2", n)
	}

	// The bad pod is fixed: its next try loads the adapter, and from then
	// on it gets the adapter's traffic too.
	patch := fmt.Sprintf(`{"metadata":{"annotations":{%q:null}}}`, fleet.FaultAnnotation)
	if _, err := testCluster.Client.CoreV1().Pods(ns).Patch(ctx, bad.Name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	err = testCluster.WaitFor(ctx, 40*time.Second, "the adapter loaded on the fixed pod", func(ctx context.Context) (bool, error) {
		pods, _, _, err := r.loadedOn(ctx, "support")
		return len(pods) == 3, err
	})
	if err != nil {
		t.Fatal(err)
	}
	err = testCluster.WaitFor(ctx, 10*time.Second, "an adapter request on the fixed pod", func(ctx context.Context) (bool, error) {
		res := r.post(ctx, "/v1/completions", completion("support"))
		return res.status == http.StatusOK && res.pod == ns+"/"+bad.Name, res.err
	})
	if err != nil {
		t.Fatal(err)
	}

	// The declaration goes: unloaded everywhere, unknown again.
	declare(t, ctx, ns, "llama", "")
	r.waitLoadedOn(t, ctx, ns, "support")
	unloads := seen.calls("/v1/unload_lora_adapter")
	if len(unloads[good[0].Name]) == 0 || len(unloads[good[1].Name]) == 0 || len(unloads[bad.Name]) == 0 {
		t.Errorf("unload calls by pod: %v; want one on each pod", unloads)
	}
	if res := r.post(ctx, "/v1/completions", completion("support")); res.status != http.StatusNotFound {
		t.Errorf("the adapter after its declaration went: %d %s", res.status, res.body)
	}
}

// A rolling update of the base model under load to two declared adapters:
// no client request fails (a simulated engine answers 404 for an adapter it
// has not loaded, so none reached a pod without it), the new pods get both
// adapters and serve them, and no request reaches an old pod after its
// endpoint left.
func TestDeclaredLoRAAdaptersThroughARollingUpdate(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	ns := namespace(t, ctx, "lora-roll")
	var seen arrivals
	simulate(t, ctx, ns, seen.add)
	ms := cluster.ModelServer{Namespace: ns, Name: "llama", Model: "llama", Replicas: 4, PreStopSleepSeconds: 1, Env: runtimeLoRA,
		Annotations: map[string]string{"sim.capstan.dev/terminate-after": "2s", "sim.capstan.dev/ttft": "5ms", fleet.LoRALoadTimeAnnotation: "300ms"}}
	oldPods := deploy(t, ctx, ms)
	declare(t, ctx, ns, "llama", "- {name: support, source: /adapters/support}\n- {name: sql, source: /adapters/sql}\n")
	routers := []*router{
		startRouter(t, ctx, "router-lora-roll-0", "--namespaces="+ns, spreadEvenly, "--lora-poll-interval=500ms", loader),
		startRouter(t, ctx, "router-lora-roll-1", "--namespaces="+ns, spreadEvenly, "--lora-poll-interval=500ms", loader),
	}
	var names []string
	for _, p := range oldPods {
		names = append(names, p.Name)
	}
	for _, r := range routers {
		r.waitLoadedOn(t, ctx, ns, "support", names...)
		r.waitLoadedOn(t, ctx, ns, "sql", names...)
	}
	tracker := trackSlices(t, ctx, ns, "llama")

	loadCtx, stopLoad := context.WithCancel(ctx)
	support := steadyLoad(loadCtx, routers, 4, completion("support"))
	sql := steadyLoad(loadCtx, routers, 4, completion("sql"))
	rollOut(t, ctx, ns, "llama", oldPods, 4)
	pods, err := testCluster.Pods(ctx, ns, "app=llama")
	if err != nil {
		t.Fatal(err)
	}
	names = nil
	for _, p := range pods {
		if p.DeletionTimestamp == nil {
			names = append(names, p.Name)
		}
	}
	for _, r := range routers {
		r.waitLoadedOn(t, ctx, ns, "support", names...)
		r.waitLoadedOn(t, ctx, ns, "sql", names...)
	}
	err = testCluster.WaitFor(ctx, 20*time.Second, "adapter requests on every new pod", func(context.Context) (bool, error) {
		served := seen.calls("/v1/completions")
		return !slices.ContainsFunc(names, func(p string) bool { return len(served[p]) == 0 }), nil
	})
	stopLoad()
	all := append(<-support, <-sql...)
	if err != nil {
		t.Error(err)
	}
	if f := failures(all); len(f) > 0 {
		t.Errorf("%d of %d client requests failed during the rollout: %v", len(f), len(all), f[:min(len(f), 5)])
	}
	checkArrivals(t, &seen, tracker, oldPods)
	if slices.ContainsFunc(oldPods, func(o corev1.Pod) bool { return slices.Contains(names, o.Name) }) {
		t.Error("an old pod is among the new ones")
	}
	t.Logf("%d adapter requests through the rollout", len(all))
}

// With leader election (the manifests' default), only the replica holding
// the Lease loads adapters; when it stops, the other takes the Lease and
// loads the adapter onto a pod that arrives after.
func TestDeclaredLoRAAdaptersLoadedByTheLeader(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	ns := namespace(t, ctx, "lora-leader")
	var seen arrivals
	simulate(t, ctx, ns, seen.add)
	pods := deploy(t, ctx, cluster.ModelServer{Namespace: ns, Name: "llama", Model: "llama", Replicas: 2, Env: runtimeLoRA})
	routers := []*router{
		startRouter(t, ctx, "router-lora-leader-0", "--namespaces="+ns, "--lora-poll-interval=500ms"),
		startRouter(t, ctx, "router-lora-leader-1", "--namespaces="+ns, "--lora-poll-interval=500ms"),
	}
	// A router of an earlier test that was killed holds the Lease until it
	// expires (15 s).
	var leader, follower *router
	err := testCluster.WaitFor(ctx, 30*time.Second, "one of the two routers to lead", func(context.Context) (bool, error) {
		for i, r := range routers {
			if r.metric(t, "capstan_router_leader", nil) == 1 {
				leader, follower = r, routers[1-i]
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if follower.metric(t, "capstan_router_leader", nil) != 0 {
		t.Fatal("both routers lead")
	}
	declare(t, ctx, ns, "llama", "- {name: support, source: /adapters/support}")
	for _, r := range routers {
		r.waitLoadedOn(t, ctx, ns, "support", pods[0].Name, pods[1].Name)
	}
	if n := leader.metric(t, "capstan_router_lora_adapter_calls_total", map[string]string{"operation": "load"}); n < 2 {
		t.Errorf("the leader made %v loads, want at least 2", n)
	}
	if n := follower.metric(t, "capstan_router_lora_adapter_calls_total", nil); n != 0 {
		t.Errorf("the follower made %v adapter calls", n)
	}

	leader.proc.Stop(15 * time.Second)
	err = testCluster.WaitFor(ctx, 20*time.Second, "the other router to take the Lease", func(context.Context) (bool, error) {
		return follower.metric(t, "capstan_router_leader", nil) == 1, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	patch := `{"spec":{"replicas":3}}`
	if _, err := testCluster.Client.AppsV1().Deployments(ns).Patch(ctx, "llama", types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	all, err := testCluster.WaitForReadyPods(ctx, ns, "app=llama", 3, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, p := range all {
		names = append(names, p.Name)
	}
	follower.waitLoadedOn(t, ctx, ns, "support", names...)
	if n := follower.metric(t, "capstan_router_lora_adapter_calls_total", map[string]string{"operation": "load", "result": "success"}); n != 1 {
		t.Errorf("the new leader made %v successful loads, want 1 (the new pod)", n)
	}
}
