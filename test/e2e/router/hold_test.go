package router

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/capstan-dev/capstan/test/cluster"
)

// A request for a model whose only replica cannot be scheduled is held,
// /v1/models says why meanwhile, and when the hold times out the 503 names
// the scheduler's reason from the pod's PodScheduled condition.
func TestHoldEndsWithTheSchedulersReason(t *testing.T) {
	ctx := testContext(t, 2*time.Minute)
	ns := namespace(t, ctx, "hold")
	simulate(t, ctx, ns, nil)
	m := cluster.ModelServer{Namespace: ns, Name: "llama", Model: "llama", Replicas: 1,
		NodeSelector: map[string]string{"e2e.capstan.dev/no-such-node": "true"}}
	if err := testCluster.Deploy(ctx, m); err != nil {
		t.Fatal(err)
	}
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
