package router

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/test/cluster"
)

// A request for a model whose only replica cannot be scheduled is held,
// /v1/models says why meanwhile, and when the hold times out the 503 names
// the scheduler's reason from the pod's PodScheduled condition.
func TestHoldEndsWithTheSchedulersReason(t *testing.T) {
	ctx := testContext(t, 2*time.Minute)
	ns := namespace(t, ctx, "hold")
	simulate(t, ctx, ns, nil)
	unschedulableModel(t, ctx, ns)
	const reason = "didn't match Pod's node affinity/selector"
	err := testCluster.WaitFor(ctx, 30*time.Second, "the replica to be Unschedulable", func(ctx context.Context) (bool, error) {
		pods, err := testCluster.Pods(ctx, ns, "app=llama")
		if err != nil || len(pods) != 1 {
			return false, err
		}
		for _, c := range pods[0].Status.Conditions {
			if c.Type == "PodScheduled" && strings.Contains(c.Message, reason) {
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	r := startRouter(t, ctx, "router-hold", "--namespaces="+ns, "--hold-timeout=3s")
	results := make(chan result, 1)
	start := time.Now()
	go func() { results <- r.post(ctx, "/v1/completions", completion("llama")) }()

	var replicas string
	err = testCluster.WaitFor(ctx, 3*time.Second, "/v1/models to show the held request and why", func(ctx context.Context) (bool, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, r.url+"/v1/models/llama", nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return false, err
		}
		defer resp.Body.Close()
		var m struct {
			Held     int    `json:"held"`
			Replicas string `json:"replicas"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&m); err != nil {
			return false, err
		}
		replicas = m.Replicas
		return m.Held == 1, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(replicas, "1 Pending: 0/") || !strings.Contains(replicas, reason) {
		t.Errorf("/v1/models replicas %q, want the Pending replica and the scheduler's reason", replicas)
	}
	res := <-results
	held := time.Since(start)
	if res.err != nil || res.status != http.StatusServiceUnavailable {
		t.Fatalf("after the hold: %d %v %s, want 503", res.status, res.err, res.body)
	}
	for _, want := range []string{"held 3s for a ready endpoint", "1 Pending: 0/", reason} {
		if !strings.Contains(res.body, want) {
			t.Errorf("the 503 %s does not say %q", res.body, want)
		}
	}
	if held < 3*time.Second || held > 6*time.Second {
		t.Errorf("the request was answered after %s, want the 3s hold", held)
	}
}

// A router told to stop (SIGTERM) while it holds requests keeps holding
// them through its drain: when a replica turns Ready within
// --shutdown-timeout they are answered, then the router exits.
func TestHeldRequestsSurviveAGracefulStop(t *testing.T) {
	ctx := testContext(t, 2*time.Minute)
	ns := namespace(t, ctx, "hold-stop")
	simulate(t, ctx, ns, nil)
	unschedulableModel(t, ctx, ns)
	r := startRouter(t, ctx, "router-hold-stop", "--namespaces="+ns, "--hold-timeout=1m", "--shutdown-timeout=30s")
	const n = 3
	results := r.holdRequests(t, ctx, "llama", n)

	stopped := make(chan struct{})
	go func() { r.proc.Stop(30 * time.Second); close(stopped) }()
	// The replica becomes schedulable only once the router is draining.
	err := testCluster.WaitFor(ctx, 10*time.Second, "the router to fail /readyz", func(ctx context.Context) (bool, error) {
		resp, err := http.Get(r.admin + "/readyz")
		if err != nil {
			return false, nil
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusServiceUnavailable, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	makeSchedulable(t, ctx, ns)
	for range n {
		if res := <-results; res.err != nil || res.status != http.StatusOK {
			t.Errorf("a request held through the drain: %d %v %s", res.status, res.err, res.body)
		}
	}
	select {
	case <-stopped:
	case <-ctx.Done():
		t.Fatal("the router did not exit after its held requests were answered")
	}
}

// A router killed (SIGKILL) while it holds requests drops their
// connections at once, and nothing is ever sent for them: when a replica
// turns Ready afterwards, it receives no request.
func TestHeldRequestsOfAKilledRouter(t *testing.T) {
	ctx := testContext(t, 2*time.Minute)
	ns := namespace(t, ctx, "hold-kill")
	var seen arrivals
	simulate(t, ctx, ns, seen.add)
	unschedulableModel(t, ctx, ns)
	r := startRouter(t, ctx, "router-hold-kill", "--namespaces="+ns, "--hold-timeout=1m")
	const n = 3
	results := r.holdRequests(t, ctx, "llama", n)
	killed := time.Now()
	r.proc.Kill()
	for range n {
		res := <-results
		if res.err == nil {
			t.Errorf("a request held by the killed router was answered %d %s", res.status, res.body)
		} else {
			t.Logf("a held client of the killed router: %v", res.err)
		}
	}
	if d := time.Since(killed); d > 5*time.Second {
		t.Errorf("the killed router's clients learnt it after %s", d)
	}
	makeSchedulable(t, ctx, ns)
	if _, err := testCluster.WaitForReadyPods(ctx, ns, "app=llama", 1, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	// A request through a new router is the model server's first.
	r2 := startRouter(t, ctx, "router-hold-kill-2", "--namespaces="+ns)
	r2.waitReady(t, ctx, "llama", 1)
	if res := r2.post(ctx, "/v1/completions", completion("llama")); res.err != nil || res.status != http.StatusOK {
		t.Fatalf("through the second router: %d %v %s", res.status, res.err, res.body)
	}
	if got := len(seen.all()); got != 1 {
		t.Errorf("the model server got %d requests, want 1: none for the killed router's held requests", got)
	}
}

// waitModel waits until the router knows the model (its Services exist).
func (r *router) waitModel(t *testing.T, ctx context.Context, modelName string) {
	t.Helper()
	err := testCluster.WaitFor(ctx, 20*time.Second, "the router to know "+modelName, func(ctx context.Context) (bool, error) {
		models, err := r.models(ctx)
		_, ok := models[modelName]
		return err == nil && ok, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// holdRequests sends n completions for a known model that has no ready
// endpoint and returns their results once the router holds all n.
func (r *router) holdRequests(t *testing.T, ctx context.Context, modelName string, n int) <-chan result {
	t.Helper()
	r.waitModel(t, ctx, modelName)
	results := make(chan result, n)
	for range n {
		go func() { results <- r.post(ctx, "/v1/completions", completion(modelName)) }()
	}
	r.waitHeld(t, ctx, modelName, n)
	return results
}

// waitHeld waits until the router holds n requests for the model.
func (r *router) waitHeld(t *testing.T, ctx context.Context, modelName string, n int) {
	t.Helper()
	err := testCluster.WaitFor(ctx, 10*time.Second, fmt.Sprintf("%d requests held for %s", n, modelName), func(ctx context.Context) (bool, error) {
		v := r.metric(t, "capstan_router_model_held_requests", map[string]string{"model": modelName})
		return v == float64(n), nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// Beyond --max-held-requests-per-model a request gets 429 at once; a
// client that leaves while held is out of the queue at once, and nothing
// reaches the model server for it when a replica turns Ready.
func TestHoldQueueLimitAndLeavingClients(t *testing.T) {
	ctx := testContext(t, 2*time.Minute)
	ns := namespace(t, ctx, "hold-queue")
	var seen arrivals
	simulate(t, ctx, ns, seen.add)
	unschedulableModel(t, ctx, ns)
	r := startRouter(t, ctx, "router-hold-queue", "--namespaces="+ns, "--hold-timeout=1m", "--max-held-requests-per-model=2")
	r.waitModel(t, ctx, "llama")
	stays := make(chan result, 1)
	go func() { stays <- r.post(ctx, "/v1/completions", completion("llama")) }()
	leaveCtx, leave := context.WithCancel(ctx)
	leaves := make(chan result, 1)
	go func() { leaves <- r.post(leaveCtx, "/v1/completions", completion("llama")) }()
	r.waitHeld(t, ctx, "llama", 2)

	full := r.post(ctx, "/v1/completions", completion("llama"))
	if full.status != http.StatusTooManyRequests || !strings.Contains(full.body, "hold_queue_full") {
		t.Errorf("beyond the queue: %d %s, want 429 hold_queue_full", full.status, full.body)
	}
	leave()
	if res := <-leaves; res.err == nil {
		t.Errorf("the leaving client got %d", res.status)
	}
	r.waitHeld(t, ctx, "llama", 1)

	makeSchedulable(t, ctx, ns)
	if res := <-stays; res.err != nil || res.status != http.StatusOK {
		t.Fatalf("the request that stayed: %d %v %s", res.status, res.err, res.body)
	}
	if n := len(seen.all()); n != 1 {
		t.Errorf("the model server got %d requests, want only the one that stayed", n)
	}
}

// unschedulableModel deploys one replica of model llama whose node selector
// matches no node, so it stays Pending with the scheduler's reason.
func unschedulableModel(t *testing.T, ctx context.Context, ns string) {
	t.Helper()
	m := cluster.ModelServer{Namespace: ns, Name: "llama", Model: "llama", Replicas: 1,
		NodeSelector: map[string]string{"e2e.capstan.dev/no-such-node": "true"}}
	if err := testCluster.Deploy(ctx, m); err != nil {
		t.Fatal(err)
	}
}

// makeSchedulable drops the node selector unschedulableModel set.
func makeSchedulable(t *testing.T, ctx context.Context, ns string) {
	t.Helper()
	patch := []byte(`{"spec":{"template":{"spec":{"nodeSelector":null}}}}`)
	if _, err := testCluster.Client.AppsV1().Deployments(ns).Patch(ctx, "llama", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
}
