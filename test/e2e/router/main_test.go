// Package router tests capstan-router against a real control plane and the
// fleet simulator: the router runs as its own process, from the freshly
// built binary, with the arguments of manifests/router's Deployment and as
// the manifests' ServiceAccount, so it has exactly their RBAC.
package router

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/components"
	"github.com/capstan-dev/capstan/test/fleet"
)

const (
	systemNamespace = components.Namespace
	serviceAccount  = "capstan-router"
)

var testCluster *cluster.Cluster

func TestMain(m *testing.M) { os.Exit(cluster.RunTests(m, cluster.Config{}, &testCluster)) }

// The manifests are applied once, by the first test that starts a router.
var (
	setupOnce sync.Once
	setupErr  error
	// installed is manifests/router applied, with the Deployment's
	// arguments and environment and a kubeconfig for the ServiceAccount.
	installed *components.Router
)

// setup applies manifests/router to the cluster (server-side apply, so the
// API server validates every object), reads the router's arguments from the
// Deployment, makes a kubeconfig for its ServiceAccount, and creates two
// kwok nodes for the model servers.
func setup(t testing.TB) {
	t.Helper()
	setupOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		setupErr = func() error {
			c := testCluster
			var err error
			if installed, err = components.InstallRouter(ctx, c, "router"); err != nil {
				return err
			}
			return c.CreateNodes(ctx, cluster.Node{Name: "router-0"}, cluster.Node{Name: "router-1"})
		}()
	})
	if setupErr != nil {
		t.Fatalf("setting up: %v", setupErr)
	}
}

// router is one capstan-router process.
type router struct {
	proc *cluster.Process
	url  string // the API
	// admin serves /healthz, /readyz and /metrics.
	admin string
}

// spreadEvenly is for tests whose identical requests must reach every pod,
// the faulty or the new one included: the default balancer, prefix-cache,
// keeps one prompt on as few pods as its load allows.
const spreadEvenly = "--balancer=least-requests"

// startRouter runs capstan-router with the manifests' arguments, then extra
// ones (later flags win), on a free loopback port, waits for /readyz, and
// stops it when the test ends.
func startRouter(t *testing.T, ctx context.Context, name string, extra ...string) *router {
	t.Helper()
	setup(t)
	c := installed.StartTest(t, ctx, components.RouterOptions{Name: name, Args: append([]string{"--v=2"}, extra...)})
	return &router{proc: c.Process, url: c.URL, admin: c.AdminURL}
}

// simulate starts the fleet simulator for a namespace and stops it at the
// end of the test.
func simulate(t *testing.T, ctx context.Context, ns string, onRequest func(fleet.Arrival)) *fleet.Fleet {
	t.Helper()
	sim := fleet.New(testCluster.Client, fleet.Options{Namespace: ns, OnRequest: onRequest})
	simCtx, stop := context.WithCancel(ctx)
	if err := sim.Start(simCtx); err != nil {
		stop()
		t.Fatal(err)
	}
	t.Cleanup(func() { stop(); sim.Wait() })
	return sim
}

// modelEndpoints is an entry of the router's GET /v1/models.
type modelEndpoints struct {
	ID        string `json:"id"`
	Endpoints struct {
		Ready, NotReady, Terminating, Total int
	} `json:"endpoints"`
}

func (r *router) models(ctx context.Context) (map[string]modelEndpoints, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, r.url+"/v1/models", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var list struct {
		Data []struct {
			ID        string `json:"id"`
			Endpoints struct {
				Ready       int `json:"ready"`
				NotReady    int `json:"not_ready"`
				Terminating int `json:"terminating"`
				Total       int `json:"total"`
			} `json:"endpoints"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		return nil, err
	}
	out := map[string]modelEndpoints{}
	for _, d := range list.Data {
		m := modelEndpoints{ID: d.ID}
		m.Endpoints.Ready, m.Endpoints.NotReady, m.Endpoints.Terminating, m.Endpoints.Total =
			d.Endpoints.Ready, d.Endpoints.NotReady, d.Endpoints.Terminating, d.Endpoints.Total
		out[d.ID] = m
	}
	return out, nil
}

// waitReady waits until the router lists the model with n ready endpoints.
func (r *router) waitReady(t *testing.T, ctx context.Context, modelName string, n int) {
	t.Helper()
	r.waitReadyWithin(t, ctx, modelName, n, 20*time.Second)
}

func (r *router) waitReadyWithin(t *testing.T, ctx context.Context, modelName string, n int, timeout time.Duration) {
	t.Helper()
	err := testCluster.WaitFor(ctx, timeout, fmt.Sprintf("the router to see %d ready endpoints of %s", n, modelName),
		func(ctx context.Context) (bool, error) {
			models, err := r.models(ctx)
			return err == nil && models[modelName].Endpoints.Ready == n, nil
		})
	if err != nil {
		t.Fatal(err)
	}
}

// result is one client request's outcome.
type result struct {
	status int
	pod    string
	body   string
	err    error
}

var client = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64, Proxy: nil}, Timeout: time.Minute}

// post sends one request to the router and reads the whole response.
func (r *router) post(ctx context.Context, path, body string, header ...string) result {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, r.url+path, strings.NewReader(body))
	if err != nil {
		return result{err: err}
	}
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := client.Do(req)
	if err != nil {
		return result{err: err}
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	return result{status: resp.StatusCode, pod: resp.Header.Get("X-Capstan-Pod"), body: string(data), err: err}
}

func completion(modelName string) string {
	return `{"model":"` + modelName + `","prompt":"hello there","max_tokens":4}`
}

// steadyLoad sends requests with `workers` concurrent clients, spread over
// the routers, until ctx ends, and returns every result.
func steadyLoad(ctx context.Context, routers []*router, workers int, body string) <-chan []result {
	out := make(chan []result, 1)
	go func() {
		var mu sync.Mutex
		var all []result
		var wg sync.WaitGroup
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := routers[w%len(routers)]
				for ctx.Err() == nil {
					res := r.post(context.WithoutCancel(ctx), "/v1/completions", body)
					mu.Lock()
					all = append(all, res)
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		out <- all
	}()
	return out
}

// failures returns the results that are not 200, described.
func failures(results []result) []string {
	var out []string
	for _, r := range results {
		switch {
		case r.err != nil:
			out = append(out, r.err.Error())
		case r.status != http.StatusOK:
			out = append(out, strconv.Itoa(r.status)+" "+r.body)
		}
	}
	return out
}

// metric returns the sum of a metric's samples whose labels include these.
func (r *router) metric(t *testing.T, name string, labels map[string]string) float64 {
	t.Helper()
	resp, err := http.Get(r.admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	fam, ok := families[name]
	if !ok {
		return 0
	}
	var sum float64
	for _, m := range fam.Metric {
		if hasLabels(m.Label, labels) {
			switch {
			case m.Counter != nil:
				sum += m.Counter.GetValue()
			case m.Gauge != nil:
				sum += m.Gauge.GetValue()
			}
		}
	}
	return sum
}

func hasLabels(have []*dto.LabelPair, want map[string]string) bool {
	n := 0
	for _, l := range have {
		if v, ok := want[l.GetName()]; ok {
			if v != l.GetValue() {
				return false
			}
			n++
		}
	}
	return n == len(want)
}
