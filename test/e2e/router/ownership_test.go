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

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/scheme"

	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/fleet"
)

// modelClaims is what GET /v1/models says about who serves a model.
type modelClaims struct {
	Owner      string   `json:"owner"`
	SharedWith []string `json:"shared_with"`
	Refused    []struct {
		Service string `json:"service"`
		Reason  string `json:"reason"`
	} `json:"refused"`
	Endpoints struct {
		Ready int `json:"ready"`
	} `json:"endpoints"`
}

func (r *router) claims(ctx context.Context, modelName string) (modelClaims, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, r.url+"/v1/models/"+modelName, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return modelClaims{}, err
	}
	defer resp.Body.Close()
	var m modelClaims
	return m, json.NewDecoder(resp.Body).Decode(&m)
}

// A second namespace claiming a model another one serves gets none of its
// traffic and is told why (an Event on its Service, a metric, /v1/models);
// the owner's grant pools both; revoking it takes the foreign endpoints out
// within a second.
func TestModelNameBelongsToItsOwner(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	// The owner's namespace is created first and sorts first, so it owns
	// the model however the Services' creation seconds compare.
	owner := namespace(t, ctx, "owner")
	tenant := namespace(t, ctx, "tenant")
	var seen arrivals
	simulate(t, ctx, owner, seen.add)
	simulate(t, ctx, tenant, seen.add)
	deploy(t, ctx, cluster.ModelServer{Namespace: owner, Name: "llama", Model: "llama", Replicas: 2})
	deploy(t, ctx, cluster.ModelServer{Namespace: tenant, Name: "llama", Model: "llama", Replicas: 1})
	r := startRouter(t, ctx, "router-ownership", "--namespaces="+owner+","+tenant, spreadEvenly)

	var m modelClaims
	err := testCluster.WaitFor(ctx, 20*time.Second, "the router to refuse the tenant's claim", func(ctx context.Context) (bool, error) {
		var err error
		m, err = r.claims(ctx, "llama")
		return err == nil && m.Endpoints.Ready == 2 && len(m.Refused) == 1, nil
	})
	if err != nil {
		t.Fatalf("%v; last /v1/models/llama: %+v", err, m)
	}
	if m.Owner != owner || m.Refused[0].Service != tenant+"/llama" || !strings.Contains(m.Refused[0].Reason, "capstan.dev/share-model-with") {
		t.Errorf("/v1/models/llama: owner %q, refused %+v; want owner %s and %s/llama refused naming the annotation", m.Owner, m.Refused, owner, tenant)
	}
	refused := map[string]string{"model": "llama", "namespace": tenant}
	if v := r.metric(t, "capstan_router_model_refused_claims", refused); v != 1 {
		t.Errorf("capstan_router_model_refused_claims%v = %v, want 1", refused, v)
	}
	for i := range 40 {
		if res := r.post(ctx, "/v1/completions", completion("llama")); res.err != nil || res.status != http.StatusOK {
			t.Fatalf("owner's request %d: %d %v %s", i, res.status, res.err, res.body)
		}
	}
	if n := countNamespace(seen.all(), tenant); n != 0 {
		t.Errorf("the refused tenant's pod got %d of 40 requests", n)
	}

	// The Event is found the way kubectl describe service finds it.
	svc, err := testCluster.Client.CoreV1().Services(tenant).Get(ctx, "llama", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var message string
	err = testCluster.WaitFor(ctx, 10*time.Second, "a ModelClaimRefused Event on the tenant's Service", func(ctx context.Context) (bool, error) {
		events, err := testCluster.Client.CoreV1().Events(tenant).SearchWithContext(ctx, scheme.Scheme, svc)
		if err != nil {
			return false, err
		}
		for _, e := range events.Items {
			if e.Reason == "ModelClaimRefused" && e.Type == "Warning" {
				message = e.Message
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(message, "namespace "+owner) {
		t.Errorf("Event message %q does not name the owner %s", message, owner)
	}

	// The owner shares the model: both are pooled.
	share(t, ctx, owner, tenant)
	err = testCluster.WaitFor(ctx, 10*time.Second, "the router to pool the tenant's endpoint", func(ctx context.Context) (bool, error) {
		m, err = r.claims(ctx, "llama")
		return err == nil && m.Endpoints.Ready == 3 && len(m.Refused) == 0, nil
	})
	if err != nil {
		t.Fatalf("%v; last /v1/models/llama: %+v", err, m)
	}
	if !slices.Equal(m.SharedWith, []string{tenant}) {
		t.Errorf("shared_with = %v, want [%s]", m.SharedWith, tenant)
	}
	if v := r.metric(t, "capstan_router_model_refused_claims", refused); v != 0 {
		t.Errorf("after the grant capstan_router_model_refused_claims%v = %v, want 0", refused, v)
	}
	before := len(seen.all())
	for i := range 60 {
		if res := r.post(ctx, "/v1/completions", completion("llama")); res.err != nil || res.status != http.StatusOK {
			t.Fatalf("request %d with the grant: %d %v %s", i, res.status, res.err, res.body)
		}
	}
	if n := countNamespace(seen.all()[before:], tenant); n == 0 {
		t.Fatal("with the owner's grant the tenant's pod got none of 60 requests")
	}

	// The grant is revoked under load: the tenant's endpoint leaves within
	// a second and no client request fails.
	loadCtx, stopLoad := context.WithCancel(ctx)
	results := steadyLoad(loadCtx, []*router{r}, 4, completion("llama"))
	err = testCluster.WaitFor(ctx, 10*time.Second, "load reaching the tenant's pod", func(context.Context) (bool, error) {
		return countNamespace(seen.all()[before:], tenant) > 0, nil
	})
	if err != nil {
		stopLoad()
		t.Fatal(err)
	}
	revoked := time.Now()
	share(t, ctx, owner, "")
	err = testCluster.WaitFor(ctx, 10*time.Second, "the router to refuse the tenant's claim again", func(ctx context.Context) (bool, error) {
		m, err = r.claims(ctx, "llama")
		return err == nil && len(m.Refused) == 1, nil
	})
	if err == nil {
		// Keep the load on well past the 1 s bound.
		err = testCluster.WaitFor(ctx, 10*time.Second, "2 s after the revocation", func(context.Context) (bool, error) {
			return time.Since(revoked) > 2*time.Second, nil
		})
	}
	stopLoad()
	if f := failures(<-results); len(f) > 0 {
		t.Errorf("%d client requests failed: %v", len(f), f[:min(len(f), 5)])
	}
	if err != nil {
		t.Fatal(err)
	}
	var last time.Time
	late := 0
	for _, a := range seen.all() {
		if a.Pod.Namespace != tenant {
			continue
		}
		if a.At.After(last) {
			last = a.At
		}
		if a.At.After(revoked.Add(time.Second)) {
			late++
		}
	}
	if late > 0 {
		t.Errorf("the tenant's pod got %d requests more than 1 s after the grant was revoked (last %s after)", late, last.Sub(revoked))
	}
	t.Logf("last request to the tenant's pod arrived %s after the grant was revoked", last.Sub(revoked).Round(time.Millisecond))
}

// share sets the owner's Service's share annotation to namespaces, or
// removes it when namespaces is empty.
func share(t *testing.T, ctx context.Context, owner, namespaces string) {
	t.Helper()
	value := "null"
	if namespaces != "" {
		value = fmt.Sprintf("%q", namespaces)
	}
	patch := fmt.Sprintf(`{"metadata":{"annotations":{"capstan.dev/share-model-with":%s}}}`, value)
	if _, err := testCluster.Client.CoreV1().Services(owner).Patch(ctx, "llama", types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
}

func countNamespace(list []fleet.Arrival, ns string) int {
	n := 0
	for _, a := range list {
		if a.Pod.Namespace == ns {
			n++
		}
	}
	return n
}
