package gateway

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	inferencev1 "sigs.k8s.io/gateway-api-inference-extension/api/v1"
	inferenceclient "sigs.k8s.io/gateway-api-inference-extension/client-go/clientset/versioned"

	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/components"
	"github.com/capstan-dev/capstan/test/fleet"
)

// podCounts counts the requests each pod received.
type podCounts struct {
	mu sync.Mutex
	n  map[string]int
}

func (c *podCounts) add(a fleet.Arrival) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.n[a.Pod.Name]++
}

func (c *podCounts) get() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.n)
}

// TestInferencePool installs the Gateway API Inference Extension's
// InferencePool CRD, and sends a Gateway's traffic to a pool of simulated
// model servers: only the pool's Ready, non-terminating pods get requests,
// at once after a pod loses readiness or is deleted; the pool's
// capstan.dev/balancer annotation chooses its policy; the pool's status has
// the Gateway as an accepted parent; a route to a missing pool says
// BackendNotFound; and a FailClose pool whose endpoint picker Service has
// no Ready endpoint gets 503s naming the picker.
func TestInferencePool(t *testing.T) {
	ctx := testContext(t, 4*time.Minute)
	pools := installInferencePools(t, ctx)
	ns := namespace(t, ctx, "pools")
	counts := &podCounts{n: map[string]int{}}
	simulate(t, ctx, ns, counts.add)

	modelPods(t, ctx, ns, 3)
	apply(t, ctx, ns, httpGateway(ns, "inference")+"\n"+llamaPool("llama", "")+llamaPool("llama-picked", "{name: epp, port: {number: 9002}}")+`---
apiVersion: v1
kind: Service
metadata: {name: epp}
spec:
  selector: {app: epp}
  ports: [{name: grpc, port: 9002}]
`+poolRoute("pool", "llama.example.com", "llama")+poolRoute("picked", "picked.example.com", "llama-picked")+poolRoute("missing", "missing.example.com", "nonexistent"))
	r := startRouter(t, ctx, "router-pools", "--namespaces="+ns)
	addr := gatewayAddress(t, ctx, ns, "inference")
	wantRouteCondition(t, ctx, types.NamespacedName{Namespace: ns, Name: "pool"}, "inference", "ResolvedRefs", metav1.ConditionTrue, "ResolvedRefs")
	missing := wantRouteCondition(t, ctx, types.NamespacedName{Namespace: ns, Name: "missing"}, "inference", "ResolvedRefs", metav1.ConditionFalse, "BackendNotFound")
	t.Logf("a route to a missing pool: %s", missing.Message)
	wantPoolParent(t, ctx, pools, ns, "llama", "inference", accepted, resolved)

	// Each prompt its own, so that a prefix-aware balancer has no reason
	// to keep to one pod.
	completion := func(i int) string {
		return fmt.Sprintf(`{"model":"llama-3-8b","prompt":"%d: hello there","max_tokens":4}`, i)
	}
	// sendAll sends n completions through the pool's route; all must
	// succeed.
	sendAll := func(n int) {
		t.Helper()
		for i := range n {
			res := send(ctx, "POST", addr, "llama.example.com", "/v1/completions", completion(i))
			if res.err != nil || res.status != http.StatusOK {
				t.Fatalf("request %d: %d %v %s", i, res.status, res.err, res.body)
			}
		}
	}
	// waitReady waits until the router counts n ready endpoints in the
	// pool: it has seen the pod change.
	waitReady := func(n float64) {
		t.Helper()
		err := testCluster.WaitFor(ctx, 10*time.Second, fmt.Sprintf("the router to count %v ready endpoints in the pool", n), func(context.Context) (bool, error) {
			return r.metricValue(t, "capstan_router_inferencepool_ready_endpoints", map[string]string{"namespace": ns, "inferencepool": "llama"}) == n, nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	waitReady(3)
	sendAll(30)
	before := counts.get()
	for i := range 3 {
		if pod := fmt.Sprintf("llama-%d", i); before[pod] == 0 {
			t.Errorf("Ready pod %s got none of 30 requests: %v", pod, before)
		}
	}

	// The pool chooses round-robin (capstan.dev/balancer) over the
	// router's cache-aware default: one prompt sent nine times, which the
	// default keeps on one pod, goes to each pod in turn.
	annotation := `{"metadata":{"annotations":{"capstan.dev/balancer":"round-robin"}}}`
	if _, err := pools.InferenceV1().InferencePools(ns).Patch(ctx, "llama", types.MergePatchType, []byte(annotation), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	err := testCluster.WaitFor(ctx, 10*time.Second, "the pool's Accepted message to name round-robin", func(ctx context.Context) (bool, error) {
		pool, err := pools.InferenceV1().InferencePools(ns).Get(ctx, "llama", metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		for _, p := range pool.Status.Parents {
			if c := findCondition(p.Conditions, "Accepted"); c != nil && strings.Contains(c.Message, "round-robin policy (capstan.dev/balancer)") {
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	mark := counts.get()
	for i := range 9 {
		if res := send(ctx, "POST", addr, "llama.example.com", "/v1/completions", completion(0)); res.err != nil || res.status != http.StatusOK {
			t.Fatalf("request %d: %d %v %s", i, res.status, res.err, res.body)
		}
	}
	after := counts.get()
	for i := range 3 {
		if pod := fmt.Sprintf("llama-%d", i); after[pod]-mark[pod] != 3 {
			t.Errorf("round-robin over three pods: %s got %d of 9 requests", pod, after[pod]-mark[pod])
		}
	}

	// llama-0 loses readiness: it gets no request once the router has seen
	// that, though it still answers.
	patch := `{"metadata":{"annotations":{"sim.capstan.dev/unready":"true"}}}`
	if _, err := testCluster.Client.CoreV1().Pods(ns).Patch(ctx, "llama-0", types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	waitReady(2)
	mark = counts.get()
	sendAll(30)
	after = counts.get()
	if after["llama-0"] != mark["llama-0"] {
		t.Errorf("the not Ready pod llama-0 got %d requests", after["llama-0"]-mark["llama-0"])
	}

	// llama-1 is deleted: Terminating, it gets none either.
	if err := testCluster.Client.CoreV1().Pods(ns).Delete(ctx, "llama-1", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitReady(1)
	mark = counts.get()
	sendAll(20)
	after = counts.get()
	for _, pod := range []string{"llama-0", "llama-1"} {
		if after[pod] != mark[pod] {
			t.Errorf("pod %s got %d requests after it left the pool", pod, after[pod]-mark[pod])
		}
	}
	if got := after["llama-2"] - mark["llama-2"]; got != 20 {
		t.Errorf("the one routable pod got %d of 20 requests", got)
	}

	// The pool whose picker cannot be reached (its Service has no pod;
	// failureMode FailClose by default) gets 503s that name the picker,
	// and no pod sees them.
	mark = counts.get()
	res := send(ctx, "POST", addr, "picked.example.com", "/v1/completions", completion(0))
	if res.status != http.StatusServiceUnavailable || !strings.Contains(res.body, "Service "+ns+"/epp:9002") || !strings.Contains(res.body, "unreachable") {
		t.Errorf("a FailClose pool: %d %s", res.status, res.body)
	}
	if res := send(ctx, "POST", addr, "missing.example.com", "/v1/completions", completion(0)); res.status != http.StatusInternalServerError {
		t.Errorf("a route to a missing pool: %d %s", res.status, res.body)
	}
	if after := counts.get(); after["llama-2"] != mark["llama-2"] {
		t.Errorf("requests for a FailClose pool or a missing one reached a pod")
	}
}

// llamaPool is an InferencePool, as a YAML document to append to others, of
// the pods labelled app=llama, port 8000, with pickerRef (YAML) as its
// endpointPickerRef unless it is "".
func llamaPool(name, pickerRef string) string {
	pool := fmt.Sprintf(`---
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: %s}
spec:
  selector: {matchLabels: {app: llama}}
  targetPorts: [{number: 8000}]
`, name)
	if pickerRef != "" {
		pool += "  endpointPickerRef: " + pickerRef + "\n"
	}
	return pool
}

// poolRoute is an HTTPRoute, as a YAML document to append to others, that
// sends the requests for host through the Gateway "inference" to the
// InferencePool pool.
func poolRoute(name, host, pool string) string {
	return fmt.Sprintf(`---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: %s}
spec:
  parentRefs: [{name: inference}]
  hostnames: [%s]
  rules:
  - backendRefs: [{group: inference.networking.k8s.io, kind: InferencePool, name: %s}]
`, name, host, pool)
}

// installInferencePools installs the InferencePool CRD for the test and
// returns a client for pools. Call it before starting a router: the CRD
// is removed when the test ends, after the router has stopped, so that the
// other tests' routers find no InferencePool API, as on a cluster without
// the CRD.
func installInferencePools(t *testing.T, ctx context.Context) inferenceclient.Interface {
	t.Helper()
	setup(t)
	uninstall, err := components.InstallInferencePoolCRD(ctx, testCluster)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := uninstall(ctx); err != nil {
			t.Errorf("uninstalling the InferencePool CRD: %v", err)
		}
	})
	pools, err := inferenceclient.NewForConfig(testCluster.RESTConfig)
	if err != nil {
		t.Fatal(err)
	}
	return pools
}

// modelPods creates n bare model-server pods llama-0… with the label
// app=llama (no ReplicaSet replaces one a test deletes) and waits until
// they are Ready. A deleted pod stays Terminating, and answering, for a
// minute: a request it got would be served, and counted.
func modelPods(t *testing.T, ctx context.Context, ns string, n int) []corev1.Pod {
	t.Helper()
	template := cluster.ModelServer{Namespace: ns, Name: "llama", Model: "llama-3-8b",
		Annotations: map[string]string{"sim.capstan.dev/terminate-after": "60s"}}.Deployment().Spec.Template
	for i := range n {
		pod := &corev1.Pod{ObjectMeta: *template.ObjectMeta.DeepCopy(), Spec: *template.Spec.DeepCopy()}
		pod.Namespace, pod.Name = ns, fmt.Sprintf("llama-%d", i)
		if _, err := testCluster.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	pods, err := testCluster.WaitForReadyPods(ctx, ns, "app=llama", n, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return pods
}

// wantPoolParent waits until a pool's status has the router's parent entry
// for a Gateway with the conditions, for the pool's current generation.
func wantPoolParent(t *testing.T, ctx context.Context, client inferenceclient.Interface, ns, name, gateway string, wants ...want) {
	t.Helper()
	var last string
	err := testCluster.WaitFor(ctx, 15*time.Second, fmt.Sprintf("InferencePool %s/%s: parent %s %v", ns, name, gateway, wants), func(ctx context.Context) (bool, error) {
		pool, err := client.InferenceV1().InferencePools(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		for _, p := range pool.Status.Parents {
			if p.ControllerName != inferencev1.ControllerName(controllerName) || string(p.ParentRef.Name) != gateway {
				continue
			}
			if p.ParentRef.Kind != "Gateway" || p.ParentRef.Group == nil || *p.ParentRef.Group != "gateway.networking.k8s.io" || string(p.ParentRef.Namespace) != ns {
				last = fmt.Sprintf("parentRef %+v", p.ParentRef)
				return false, nil
			}
			ok, got := hasAll(p.Conditions, pool.Generation, wants...)
			last = got
			return ok, nil
		}
		last = fmt.Sprintf("no parent of %s among %d", controllerName, len(pool.Status.Parents))
		return false, nil
	})
	if err != nil {
		t.Fatalf("%v; last seen: %s", err, last)
	}
}

// TestInferencePoolAppProtocol serves the Inference Extension conformance
// suite's appProtocol backend (echo-basic with HTTP_PORT and H2C_PORT, as in
// its resources/base.yaml) through three pools: appProtocol
// kubernetes.io/h2c on the h2c port is spoken to in HTTP/2, as the backends
// report; no appProtocol on the HTTP port is HTTP/1.1; appProtocol http on
// the h2c port gets the backend's own answer to an HTTP/1.1 request there,
// echo-basic's 400 "Expected h2c request", passed on as the pod's answer
// (the pod answered: the router neither hides nor retries it), until the
// pool's appProtocol is changed to kubernetes.io/h2c.
func TestInferencePoolAppProtocol(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	pools := installInferencePools(t, ctx)
	ns := namespace(t, ctx, "appprotocol")
	simulate(t, ctx, ns, nil)
	apply(t, ctx, ns, httpGateway(ns, "inference")+`
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo}
spec:
  replicas: 2
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      containers:
      - name: echoserver
        image: gcr.io/k8s-staging-gateway-api/echo-basic:v20251106-v1.3.0-263-g47c3435c
        ports: [{containerPort: 3000}, {containerPort: 3001}]
        env:
        - {name: HTTP_PORT, value: "3000"}
        - {name: H2C_PORT, value: "3001"}
---
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: h2c}
spec:
  selector: {matchLabels: {app: echo}}
  targetPorts: [{number: 3001}]
  appProtocol: kubernetes.io/h2c
---
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: http}
spec:
  selector: {matchLabels: {app: echo}}
  targetPorts: [{number: 3000}]
---
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: mismatched}
spec:
  selector: {matchLabels: {app: echo}}
  targetPorts: [{number: 3001}]
  appProtocol: http
`+poolRoute("h2c", "h2c.example.com", "h2c")+poolRoute("http", "http.example.com", "http")+poolRoute("mismatched", "mismatched.example.com", "mismatched"))
	pods, err := testCluster.WaitForReadyPods(ctx, ns, "app=echo", 2, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	r := startRouter(t, ctx, "router-appprotocol", "--namespaces="+ns)
	addr := gatewayAddress(t, ctx, ns, "inference")
	for _, pool := range []string{"h2c", "http", "mismatched"} {
		wantPoolParent(t, ctx, pools, ns, pool, "inference", accepted, resolved)
		err := testCluster.WaitFor(ctx, 10*time.Second, "the router to count 2 ready endpoints in pool "+pool, func(context.Context) (bool, error) {
			return r.metricValue(t, "capstan_router_inferencepool_ready_endpoints", map[string]string{"namespace": ns, "inferencepool": pool}) == 2, nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}

	// echo is one request through a route, and what the backend saw.
	type echo struct {
		Proto string `json:"proto"`
		Pod   string `json:"pod"`
	}
	request := func(host string, i int) (result, echo) {
		t.Helper()
		res := send(ctx, "POST", addr, host, "/v1/completions", fmt.Sprintf(`{"model":"echo","prompt":"%d"}`, i))
		var e echo
		if res.status == http.StatusOK {
			if err := json.Unmarshal([]byte(res.body), &e); err != nil {
				t.Fatalf("%s: %v in %s", host, err, res.body)
			}
		}
		return res, e
	}
	// wantProto sends n requests through a route: all are served, in
	// proto, by the pool's pods, each pod getting some.
	wantProto := func(host, proto string, n int) {
		t.Helper()
		served := map[string]int{}
		for i := range n {
			res, e := request(host, i)
			if res.err != nil || res.status != http.StatusOK || e.Proto != proto || res.header.Get("X-Capstan-Pod") != ns+"/"+e.Pod {
				t.Fatalf("%s, request %d: %d %v %s (pod header %q); want 200 from a pod that saw %s",
					host, i, res.status, res.err, res.body, res.header.Get("X-Capstan-Pod"), proto)
			}
			served[e.Pod]++
		}
		for _, p := range pods {
			if served[p.Name] == 0 {
				t.Errorf("%s: pod %s got none of %d requests: %v", host, p.Name, n, served)
			}
		}
	}
	wantProto("h2c.example.com", "HTTP/2.0", 20)
	wantProto("http.example.com", "HTTP/1.1", 20)

	res, _ := request("mismatched.example.com", 0)
	if res.err != nil || res.status != http.StatusBadRequest || res.body != "Expected h2c request" || !strings.HasPrefix(res.header.Get("X-Capstan-Pod"), ns+"/echo-") {
		t.Errorf("appProtocol http to the h2c port: %d %v %q from %q; want the pod's 400 Expected h2c request",
			res.status, res.err, res.body, res.header.Get("X-Capstan-Pod"))
	}

	// The pool's appProtocol is corrected: the router speaks HTTP/2 to it
	// from its next snapshot on, with no route retranslated.
	patch := `{"spec":{"appProtocol":"kubernetes.io/h2c"}}`
	if _, err := pools.InferenceV1().InferencePools(ns).Patch(ctx, "mismatched", types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	err = testCluster.WaitFor(ctx, 10*time.Second, "the router to speak h2c to the corrected pool", func(context.Context) (bool, error) {
		res, e := request("mismatched.example.com", 0)
		return res.status == http.StatusOK && e.Proto == "HTTP/2.0", nil
	})
	if err != nil {
		t.Fatal(err)
	}
	wantProto("mismatched.example.com", "HTTP/2.0", 20)
}
