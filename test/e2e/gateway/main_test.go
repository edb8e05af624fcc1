// Package gateway tests capstan-router as a Gateway API implementation
// against a real control plane with the Gateway API CRDs installed: the
// router runs as its own process from the freshly built binary, as the
// manifests' ServiceAccount with exactly their RBAC, and the fleet
// simulator plays both model servers and the conformance suite's echo
// backends.
package gateway

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2/ktesting"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/components"
	"github.com/capstan-dev/capstan/test/fleet"
)

const (
	className      = "capstan"
	controllerName = "capstan.dev/gateway-controller"
	// addressPool is where the routers under test give Gateways their
	// addresses: local inside the test's network namespace, apart from the
	// pod IPs (198.18.0.0/17) and the API server (198.18.255.1).
	addressPool = "198.18.254.0/24"
)

var testCluster *cluster.Cluster

func TestMain(m *testing.M) {
	for _, locate := range []func() error{components.LocateGatewayAPICRDs, components.LocateInferencePoolCRD} {
		if err := locate(); err != nil {
			fmt.Fprintln(os.Stderr, "FAIL:", err)
			os.Exit(1)
		}
	}
	os.Exit(cluster.RunTests(m, cluster.Config{}, &testCluster))
}

// The cluster is prepared once, by the first test that needs it.
var (
	setupOnce sync.Once
	setupErr  error
	// installed is manifests/router/gateway applied, with the Deployment's
	// arguments and environment and a kubeconfig for the ServiceAccount.
	installed *components.Router
	gwClient  gatewayclient.Interface
)

// setup installs the Gateway API CRDs and manifests/router/gateway
// (server-side apply, so the API server validates every object: the router's
// RBAC, its Deployment's arguments and the GatewayClass), and two kwok
// nodes.
func setup(t testing.TB) {
	t.Helper()
	setupOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		setupErr = func() error {
			c := testCluster
			var err error
			if gwClient, err = gatewayclient.NewForConfig(c.RESTConfig); err != nil {
				return err
			}
			if err := components.InstallGatewayAPICRDs(ctx, c); err != nil {
				return err
			}
			if installed, err = components.InstallRouter(ctx, c, "router/gateway"); err != nil {
				return err
			}
			return c.CreateNodes(ctx, cluster.Node{Name: "gateway-0"}, cluster.Node{Name: "gateway-1"})
		}()
	})
	if setupErr != nil {
		t.Fatalf("setting up: %v", setupErr)
	}
}

// router is one capstan-router process.
type router struct {
	name string
	proc *cluster.Process
	url  string // the API
	// admin serves /healthz, /readyz and /metrics.
	admin string
}

// startRouter runs capstan-router with the manifests' arguments, then with
// Gateways given addresses of their own from the pool instead of the
// manifests' LoadBalancer Service (which the test cluster cannot provide),
// then extra arguments (later flags win), waits for /readyz, and stops it
// when the test ends.
func startRouter(t *testing.T, ctx context.Context, name string, extra ...string) *router {
	t.Helper()
	setup(t)
	args := append([]string{"--shutdown-timeout=5s", "--v=2", "--gateway-publish-service=", "--gateway-address-pool=" + addressPool}, extra...)
	c := installed.StartTest(t, ctx, components.RouterOptions{Name: name, Args: args})
	return &router{name: name, proc: c.Process, url: c.URL, admin: c.AdminURL}
}

func testContext(t *testing.T, timeout time.Duration) context.Context {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	t.Cleanup(cancel)
	return ctx
}

// namespace creates a test namespace, deleted at the end of the test.
func namespace(t *testing.T, ctx context.Context, prefix string) string {
	t.Helper()
	setup(t)
	ns, err := testCluster.CreateNamespace(ctx, prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = testCluster.Client.CoreV1().Namespaces().Delete(context.Background(), ns, metav1.DeleteOptions{})
	})
	return ns
}

// simulate serves every pod of a namespace ("" for all) as a model server
// or echo backend until the test ends.
func simulate(t *testing.T, ctx context.Context, ns string, onRequest func(fleet.Arrival)) *fleet.Fleet {
	t.Helper()
	return runFleet(t, ctx, fleet.Options{Namespace: ns, Echo: true, OnRequest: onRequest})
}

// runFleet runs the fleet simulator until the test ends.
func runFleet(t *testing.T, ctx context.Context, opts fleet.Options) *fleet.Fleet {
	t.Helper()
	sim := fleet.New(testCluster.Client, opts)
	simCtx, stop := context.WithCancel(ctx)
	if err := sim.Start(simCtx); err != nil {
		stop()
		t.Fatal(err)
	}
	t.Cleanup(func() { stop(); sim.Wait() })
	return sim
}

// apply server-side applies YAML in a namespace.
func apply(t *testing.T, ctx context.Context, ns, manifest string) {
	t.Helper()
	if err := testCluster.Apply(ctx, ns, strings.NewReader(manifest)); err != nil {
		t.Fatal(err)
	}
}

// gatewayAddress waits for a Gateway to be Programmed and returns its
// address.
func gatewayAddress(t *testing.T, ctx context.Context, ns, name string) string {
	t.Helper()
	var addr string
	err := testCluster.WaitFor(ctx, 20*time.Second, "Gateway "+ns+"/"+name+" to be programmed with an address", func(ctx context.Context) (bool, error) {
		gw, err := gwClient.GatewayV1().Gateways(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		c := findCondition(gw.Status.Conditions, "Programmed")
		if c == nil || c.Status != metav1.ConditionTrue || c.ObservedGeneration != gw.Generation || len(gw.Status.Addresses) == 0 {
			return false, nil
		}
		addr = gw.Status.Addresses[0].Value
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return addr
}

func findCondition(conds []metav1.Condition, typ string) *metav1.Condition {
	for i := range conds {
		if conds[i].Type == typ {
			return &conds[i]
		}
	}
	return nil
}

// parentStatus returns the route's status for a Gateway parent written by
// the router, or nil.
func parentStatus(r *gatewayv1.HTTPRoute, gateway string) *gatewayv1.RouteParentStatus {
	for i, p := range r.Status.Parents {
		if p.ControllerName == controllerName && string(p.ParentRef.Name) == gateway {
			return &r.Status.Parents[i]
		}
	}
	return nil
}

// wantRouteCondition waits until a route's condition for a parent Gateway
// has a status and reason, for the route's current generation, and returns
// it.
func wantRouteCondition(t *testing.T, ctx context.Context, key types.NamespacedName, gateway, typ string, status metav1.ConditionStatus, reason string) metav1.Condition {
	t.Helper()
	var got metav1.Condition
	var last string
	err := testCluster.WaitFor(ctx, 15*time.Second, fmt.Sprintf("HTTPRoute %s: %s=%s %s", key, typ, status, reason), func(ctx context.Context) (bool, error) {
		r, err := gwClient.GatewayV1().HTTPRoutes(key.Namespace).Get(ctx, key.Name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		p := parentStatus(r, gateway)
		if p == nil {
			last = "no parent status"
			return false, nil
		}
		c := findCondition(p.Conditions, typ)
		if c == nil {
			last = "no " + typ
			return false, nil
		}
		last = fmt.Sprintf("%s=%s %s %q (generation %d of %d)", c.Type, c.Status, c.Reason, c.Message, c.ObservedGeneration, r.Generation)
		got = *c
		return c.Status == status && c.Reason == reason && c.ObservedGeneration == r.Generation, nil
	})
	if err != nil {
		t.Fatalf("%v; last seen: %s", err, last)
	}
	return got
}

// httpClient sends requests to Gateway addresses.
var httpClient = &http.Client{
	Transport: &http.Transport{MaxIdleConnsPerHost: 64, Proxy: nil},
	Timeout:   30 * time.Second,
	CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	},
}

// result is one response.
type result struct {
	status int
	header http.Header
	body   string
	err    error
}

// send makes one request to a Gateway address with a Host header.
func send(ctx context.Context, method, addr, host, path, body string, header ...string) result {
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://"+addr+path, rd)
	if err != nil {
		return result{err: err}
	}
	if host != "" {
		req.Host = host
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := httpClient.Do(req)
	if err != nil {
		return result{err: err}
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	return result{status: resp.StatusCode, header: resp.Header, body: string(data), err: err}
}

// echoed is what an echo backend answers.
type echoed struct {
	Path      string              `json:"path"`
	Host      string              `json:"host"`
	Headers   map[string][]string `json:"headers"`
	Namespace string              `json:"namespace"`
	Pod       string              `json:"pod"`
}

func (r result) echo() (echoed, error) {
	var e echoed
	if r.err != nil {
		return e, r.err
	}
	err := json.Unmarshal([]byte(r.body), &e)
	return e, err
}
