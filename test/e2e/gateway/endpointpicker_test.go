package gateway

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/fleet"
)

// Headers of lwepp, the Gateway API Inference Extension's lightweight
// endpoint picker (pkg/lwepp, v1.6.0), for its conformance tests.
const (
	// servedHeader is the response header lwepp sets to the endpoint the
	// gateway reported as having served the request.
	servedHeader = "x-conformance-test-served-endpoint"
	// steerHeader restricts lwepp's choice to the pods with these IPs.
	steerHeader = "test-epp-endpoint-selection"
)

// arrivals records, by X-Request-Id, the pod each request reached.
type arrivals struct {
	mu   sync.Mutex
	byID map[string]fleet.Arrival
}

func (a *arrivals) add(x fleet.Arrival) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.byID[x.Header.Get("X-Request-Id")] = x
}

func (a *arrivals) get(id string) (fleet.Arrival, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	x, ok := a.byID[id]
	return x, ok
}

// to counts the requests that reached a pod.
func (a *arrivals) to(pod string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for _, x := range a.byID {
		if x.Pod.Name == pod {
			n++
		}
	}
	return n
}

// lwepp is one lwepp process.
type lwepp struct {
	proc     *cluster.Process
	grpcPort int
}

// startLWEPP runs lwepp (bin, built from the module go.mod pins: make build
// puts it beside Capstan's binaries) for an InferencePool, with the test
// cluster's admin kubeconfig. lwepp binds all interfaces, so every port is
// its own; inside the test's network namespace its gRPC port is then
// reachable at any pod IP. It waits until lwepp's gRPC health service says
// the pool is synced and its ext_proc port accepts connections, and stops
// it when the test ends.
func startLWEPP(t *testing.T, ctx context.Context, bin, ns, pool string) *lwepp {
	t.Helper()
	var ports []int
	for len(ports) < 3 {
		port, err := cluster.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Contains(ports, port) {
			ports = append(ports, port)
		}
	}
	grpcPort, healthPort, metricsPort := ports[0], ports[1], ports[2]
	proc, err := testCluster.Run("lwepp-"+ns, bin,
		"--pool-name="+pool, "--pool-namespace="+ns, "--kubeconfig="+testCluster.Kubeconfig,
		"--grpc-port="+strconv.Itoa(grpcPort), "--grpc-health-port="+strconv.Itoa(healthPort),
		"--metrics-port="+strconv.Itoa(metricsPort), "--secure-serving=true")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proc.Stop(5 * time.Second) })

	conn, err := grpc.NewClient(net.JoinHostPort("127.0.0.1", strconv.Itoa(healthPort)),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	health := healthpb.NewHealthClient(conn)
	extProc := net.JoinHostPort("127.0.0.1", strconv.Itoa(grpcPort))
	err = testCluster.WaitFor(ctx, 30*time.Second, "lwepp to have synced its pool and to listen", func(ctx context.Context) (bool, error) {
		if exited, err := proc.Exited(); exited {
			return false, proc.Failure("exited (" + err.Error() + ")")
		}
		ctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		resp, err := health.Check(ctx, &healthpb.HealthCheckRequest{Service: "inference-extension"})
		if err != nil {
			return false, err
		}
		if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			return false, nil
		}
		c, err := (&net.Dialer{}).DialContext(ctx, "tcp", extProc)
		if err != nil {
			return false, err
		}
		c.Close()
		return true, nil
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, proc.LogTail(20))
	}
	return &lwepp{proc: proc, grpcPort: grpcPort}
}

// lweppBinary returns the path of lwepp as built for the test run.
func lweppBinary(t *testing.T) string {
	t.Helper()
	bin, err := cluster.Binary("lwepp")
	if err != nil {
		t.Fatalf("%v: make build builds lwepp, the Inference Extension's lightweight endpoint picker, into bin/ "+
			"(or: go build -o $CAPSTAN_BIN_DIR/ sigs.k8s.io/gateway-api-inference-extension/cmd/lwepp)", err)
	}
	return bin
}

// TestEndpointPicker runs the router against the Inference Extension's own
// endpoint picker, lwepp, as a process watching the real control plane,
// for two InferencePools of three simulated model servers that name it
// (a kwok pod whose IP reaches lwepp's gRPC port) as their
// endpointPickerRef, one FailOpen and one FailClose. Every request is
// served by the pod lwepp picked (the served endpoint lwepp reports in
// x-conformance-test-served-endpoint is the pod the fleet saw the request
// at), lwepp's steering header sends requests to the pod it names, a pod
// that is not Ready gets no request even when lwepp is asked for it, and
// when lwepp is killed under load the FailOpen pool loses no request (the
// router balances them and counts fail-open decisions) while the FailClose
// pool answers 503 naming the picker Service.
func TestEndpointPicker(t *testing.T) {
	ctx := testContext(t, 4*time.Minute)
	bin := lweppBinary(t)
	installInferencePools(t, ctx)
	ns := namespace(t, ctx, "picker")
	seen := &arrivals{byID: map[string]fleet.Arrival{}}
	simulate(t, ctx, ns, seen.add)
	pods := modelPods(t, ctx, ns, 3)
	podByIP := map[string]string{}
	for _, p := range pods {
		podByIP[p.Status.PodIP] = p.Name
	}

	apply(t, ctx, ns, httpGateway(ns, "inference")+`
---
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: llama}
spec:
  selector: {matchLabels: {app: llama}}
  targetPorts: [{number: 8000}]
  endpointPickerRef: {name: epp, port: {number: 9002}, failureMode: FailOpen}
---
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: llama-strict}
spec:
  selector: {matchLabels: {app: llama}}
  targetPorts: [{number: 8000}]
  endpointPickerRef: {name: epp, port: {number: 9002}, failureMode: FailClose}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: open}
spec:
  parentRefs: [{name: inference}]
  hostnames: [open.example.com]
  rules:
  - backendRefs: [{group: inference.networking.k8s.io, kind: InferencePool, name: llama}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: strict}
spec:
  parentRefs: [{name: inference}]
  hostnames: [strict.example.com]
  rules:
  - backendRefs: [{group: inference.networking.k8s.io, kind: InferencePool, name: llama-strict}]
`)
	// One lwepp serves both pools: they select the same pods, and lwepp
	// picks among the pods of the pool it watches.
	epp := startLWEPP(t, ctx, bin, ns, "llama")
	apply(t, ctx, ns, fmt.Sprintf(`
apiVersion: v1
kind: Service
metadata: {name: epp}
spec:
  selector: {app: epp}
  ports: [{name: grpc, port: 9002, targetPort: %d}]
---
apiVersion: v1
kind: Pod
metadata: {name: epp, labels: {app: epp}}
spec:
  containers:
  - name: epp
    image: registry.k8s.io/gateway-api-inference-extension/lwepp:v1.6.0
    ports: [{name: grpc, containerPort: %d}]
`, epp.grpcPort, epp.grpcPort))
	if _, err := testCluster.WaitForReadyPods(ctx, ns, "app=epp", 1, 30*time.Second); err != nil {
		t.Fatal(err)
	}

	r := startRouter(t, ctx, "router-picker", "--namespaces="+ns)
	addr := gatewayAddress(t, ctx, ns, "inference")
	for _, route := range []string{"open", "strict"} {
		wantRouteCondition(t, ctx, types.NamespacedName{Namespace: ns, Name: route}, "inference", "ResolvedRefs", metav1.ConditionTrue, "ResolvedRefs")
	}

	var seq atomic.Int64
	// completion sends one completion, each prompt its own.
	completion := func(host string, header ...string) result {
		body := fmt.Sprintf(`{"model":"llama-3-8b","prompt":"%d: hello there","max_tokens":4}`, seq.Add(1))
		return send(ctx, "POST", addr, host, "/v1/completions", body, header...)
	}
	// pickedAndServed checks that a response came from the pod lwepp
	// picked: lwepp's served-endpoint header, the router's pod header and
	// the pod the fleet saw the request at agree. It returns the pod.
	pickedAndServed := func(res result) (string, error) {
		if res.err != nil || res.status != http.StatusOK {
			return "", fmt.Errorf("%d %v %s", res.status, res.err, res.body)
		}
		served := res.header.Get(servedHeader)
		host, port, err := net.SplitHostPort(served)
		if err != nil || port != "8000" || podByIP[host] == "" {
			return "", fmt.Errorf("%s is %q, not a model pod's endpoint", servedHeader, served)
		}
		id := res.header.Get("X-Request-Id")
		got, ok := seen.get(id)
		if !ok {
			return "", fmt.Errorf("request %s reached no pod the fleet knows", id)
		}
		if got.IP != host || got.Pod.Name != podByIP[host] {
			return "", fmt.Errorf("lwepp says %s (%s) served request %s, the fleet saw it at %s (%s)", served, podByIP[host], id, got.IP, got.Pod)
		}
		if pod := res.header.Get("X-Capstan-Pod"); pod != got.Pod.String() {
			return "", fmt.Errorf("X-Capstan-Pod is %q, the fleet saw request %s at %s", pod, id, got.Pod)
		}
		// lwepp also sets a request header naming its pick (for the
		// conformance suite's echo backends): the router applied the
		// mutation, and the pod that got the request is the one picked.
		if echo, want := got.Header.Get("X-Echo-Set-Header"), servedHeader+":"+served; echo != want {
			return "", fmt.Errorf("request %s reached %s with X-Echo-Set-Header %q, want %q", id, got.Pod, echo, want)
		}
		return got.Pod.Name, nil
	}

	// The router dials lwepp once the EPP pod is one of the Service's
	// Ready endpoints, and lwepp picks once it has seen the pool's pods.
	var last string
	err := testCluster.WaitFor(ctx, 30*time.Second, "a request through the FailClose pool to be served through lwepp", func(context.Context) (bool, error) {
		res := completion("strict.example.com")
		_, err := pickedAndServed(res)
		if err != nil {
			last = err.Error()
		}
		return err == nil, nil
	})
	if err != nil {
		t.Fatalf("%v; last: %s\nlwepp:\n%s", err, last, epp.proc.LogTail(20))
	}

	// lwepp balances round-robin: every pod serves, each request at the
	// pod lwepp picked.
	byPod := map[string]int{}
	for i := range 30 {
		host := "open.example.com"
		if i%2 == 1 {
			host = "strict.example.com"
		}
		pod, err := pickedAndServed(completion(host))
		if err != nil {
			t.Fatalf("request %d to %s: %v", i, host, err)
		}
		byPod[pod]++
	}
	t.Logf("30 requests picked by lwepp: %v", byPod)
	for _, p := range pods {
		if byPod[p.Name] == 0 {
			t.Errorf("lwepp picked pod %s for none of 30 requests: %v", p.Name, byPod)
		}
	}

	// lwepp's steering header: each request reaches the pod it names.
	for _, p := range pods {
		for range 3 {
			pod, err := pickedAndServed(completion("open.example.com", steerHeader, p.Status.PodIP))
			if err != nil {
				t.Fatalf("steered to %s: %v", p.Name, err)
			}
			if pod != p.Name {
				t.Errorf("a request steered to %s (%s) was served by %s", p.Name, p.Status.PodIP, pod)
			}
		}
	}

	// llama-0 stops being Ready. Requests steered to it never reach it:
	// lwepp's own view drops non-Ready pods (it then has no candidate and
	// fails the stream), and when its view is staler than the router's,
	// the router skips the endpoint it names as not Ready. Either way the
	// picker has failed: the FailOpen pool is balanced over the Ready pods,
	// the FailClose pool answers 503.
	unready := pods[0]
	patch := `{"metadata":{"annotations":{"sim.capstan.dev/unready":"true"}}}`
	if _, err := testCluster.Client.CoreV1().Pods(ns).Patch(ctx, unready.Name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	err = testCluster.WaitFor(ctx, 10*time.Second, "the router to count 2 ready endpoints in each pool", func(context.Context) (bool, error) {
		for _, pool := range []string{"llama", "llama-strict"} {
			if r.metricValue(t, "capstan_router_inferencepool_ready_endpoints", map[string]string{"namespace": ns, "inferencepool": pool}) != 2 {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	mark := seen.to(unready.Name)
	failuresBefore := pickerFailures(t, r, ns)
	for i := range 10 {
		res := completion("open.example.com", steerHeader, unready.Status.PodIP)
		if res.err != nil || res.status != http.StatusOK {
			t.Fatalf("FailOpen request %d steered to the not Ready pod: %d %v %s", i, res.status, res.err, res.body)
		}
		if pod := res.header.Get("X-Capstan-Pod"); pod == ns+"/"+unready.Name {
			t.Errorf("FailOpen request %d steered to the not Ready pod was served by it", i)
		}
	}
	res := completion("strict.example.com", steerHeader, unready.Status.PodIP)
	if res.status != http.StatusServiceUnavailable {
		t.Errorf("a FailClose request steered to the not Ready pod: %d %s", res.status, res.body)
	}
	t.Logf("a FailClose request steered to the not Ready pod: %d %s", res.status, strings.TrimSpace(res.body))
	if got := seen.to(unready.Name) - mark; got != 0 {
		t.Errorf("the not Ready pod %s got %d requests", unready.Name, got)
	}
	t.Logf("picker failures while steered to the not Ready pod, by kind: %v", diffCounts(pickerFailures(t, r, ns), failuresBefore))
	// Unsteered, lwepp picks among the Ready pods.
	for i := range 6 {
		pod, err := pickedAndServed(completion("strict.example.com"))
		if err != nil {
			t.Fatalf("FailClose request %d after %s lost readiness: %v", i, unready.Name, err)
		}
		if pod == unready.Name {
			t.Errorf("lwepp picked the not Ready pod %s", pod)
		}
	}

	// lwepp is killed (SIGKILL, no drain) while four clients send
	// requests to the FailOpen pool without pause: none of them fails,
	// neither those sent before, nor those in flight at the kill, nor
	// those sent after it.
	failOpen := func() float64 {
		return r.metricValue(t, "capstan_router_endpoint_picker_fail_open_total", map[string]string{"pool": ns + "/llama"})
	}
	// timed is a result and when its request was sent and answered.
	type timed struct {
		result
		start, end time.Time
	}
	var (
		mu       sync.Mutex
		results  []timed
		stopLoad = make(chan struct{})
		wg       sync.WaitGroup
	)
	count := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(results)
	}
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stopLoad:
					return
				default:
				}
				start := time.Now()
				res := completion("open.example.com")
				mu.Lock()
				results = append(results, timed{res, start, time.Now()})
				mu.Unlock()
			}
		})
	}
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			close(stopLoad)
			wg.Wait()
		}
	}
	defer stop()
	waitCount := func(n int, what string) {
		t.Helper()
		if err := testCluster.WaitFor(ctx, 30*time.Second, what, func(context.Context) (bool, error) { return count() >= n, nil }); err != nil {
			t.Fatal(err)
		}
	}
	waitCount(40, "40 requests before the kill")
	openBefore := failOpen()
	atKill, killAt := count(), time.Now()
	epp.proc.Kill()
	err = testCluster.WaitFor(ctx, 30*time.Second, "the router to count fail-open decisions and 80 requests after the kill", func(context.Context) (bool, error) {
		return failOpen() > openBefore && count() >= atKill+80, nil
	})
	stop()
	if err != nil {
		t.Fatal(err)
	}
	var failed []string
	inFlight, withHeader := 0, 0
	for i, res := range results {
		if res.err != nil || res.status != http.StatusOK {
			failed = append(failed, fmt.Sprintf("#%d: %d %v %s", i, res.status, res.err, strings.TrimSpace(res.body)))
		}
		if res.start.Before(killAt) && res.end.After(killAt) {
			inFlight++
			if res.header.Get(servedHeader) != "" {
				withHeader++
			}
		}
	}
	if len(failed) > 0 {
		t.Errorf("%d of %d requests to the FailOpen pool failed across lwepp's kill (%d before it): %v", len(failed), len(results), atKill, failed)
	}
	if inFlight == 0 {
		t.Errorf("no request was in flight when lwepp was killed")
	}
	t.Logf("FailOpen: %d requests across lwepp's kill, %d answered before it, %d in flight at it (%d of them still with lwepp's header), all 200; fail-open decisions %v -> %v",
		len(results), atKill, inFlight, withHeader, openBefore, failOpen())

	// The FailClose pool: 503 naming the picker's Service, and no pod
	// sees the request.
	marks := map[string]int{}
	for _, p := range pods {
		marks[p.Name] = seen.to(p.Name)
	}
	res = completion("strict.example.com")
	if res.status != http.StatusServiceUnavailable || !strings.Contains(res.body, "Service "+ns+"/epp:9002") || res.header.Get("Retry-After") == "" {
		t.Errorf("FailClose with lwepp killed: %d %s (Retry-After %q)", res.status, res.body, res.header.Get("Retry-After"))
	}
	t.Logf("FailClose with lwepp killed: %d %s", res.status, strings.TrimSpace(res.body))
	for _, p := range pods {
		if n := seen.to(p.Name) - marks[p.Name]; n != 0 {
			t.Errorf("a FailClose request with lwepp killed reached pod %s", p.Name)
		}
	}
}

// pickerFailures returns the router's endpoint-picker failures for the
// test's pools, by kind.
func pickerFailures(t *testing.T, r *router, ns string) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	for _, kind := range []string{"unreachable", "timeout", "protocol", "not_ready"} {
		out[kind] = r.metricValue(t, "capstan_router_endpoint_picker_failures_total", map[string]string{"kind": kind})
	}
	return out
}

func diffCounts(after, before map[string]float64) map[string]float64 {
	out := map[string]float64{}
	for k, v := range after {
		if d := v - before[k]; d != 0 {
			out[k] = d
		}
	}
	return out
}
