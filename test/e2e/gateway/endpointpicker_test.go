package gateway

import (
	"cmp"
	"context"
	"crypto/tls"
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

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	eppmeta "sigs.k8s.io/gateway-api-inference-extension/pkg/lwepp/metadata"

	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/fleet"
)

// Headers of lwepp, the Gateway API Inference Extension's lightweight
// endpoint picker (pkg/lwepp, v1.6.0), for its conformance tests.
const (
	// servedHeader is the response header lwepp sets to the endpoint the
	// gateway reported as having served the request.
	servedHeader = eppmeta.ConformanceTestResultHeader
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
// at), a 600 KiB prompt (several ext_proc body messages) included, lwepp's
// steering header sends requests to the pod it names, a pod
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

	apply(t, ctx, ns, pickedPools(ns))
	// One lwepp serves both pools: they select the same pods, and lwepp
	// picks among the pods of the pool it watches.
	epp := startLWEPP(t, ctx, bin, ns, "llama")
	apply(t, ctx, ns, pickerService("registry.k8s.io/gateway-api-inference-extension/lwepp:v1.6.0", epp.grpcPort))
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

	// A prompt of several ext_proc messages (the router sends a body in
	// chunks of 256 KiB, and lwepp answers each): picked, and reported
	// back, as a small one.
	for i := range 3 {
		body := fmt.Sprintf(`{"model":"llama-3-8b","prompt":"%d: %s","max_tokens":4}`, seq.Add(1), strings.Repeat("hello ", 100<<10))
		if _, err := pickedAndServed(send(ctx, "POST", addr, "strict.example.com", "/v1/completions", body)); err != nil {
			t.Errorf("a 600 KiB request %d: %v", i, err)
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

// pickedPools is a Gateway "inference" and two InferencePools of the pods
// app=llama whose endpoint picker is Service epp port 9002: llama fails
// open, llama-strict fails closed; the HTTPRoute "open" sends
// open.example.com to llama, "strict" sends strict.example.com to
// llama-strict.
func pickedPools(ns string) string {
	return httpGateway(ns, "inference") + "\n" + llamaPool("llama", "{name: epp, port: {number: 9002}, failureMode: FailOpen}") + llamaPool("llama-strict", "{name: epp, port: {number: 9002}, failureMode: FailClose}") + poolRoute("open", "open.example.com", "llama") + poolRoute("strict", "strict.example.com", "llama-strict")
}

// pickerService is the picker Service epp, port 9002 (named grpc) to the
// target port of its one pod, a kwok pod epp with the label app=epp: what
// listens on the target port of any pod IP reaches the picker.
func pickerService(image string, targetPort int) string {
	return fmt.Sprintf(`
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
    image: %s
    ports: [{name: grpc, containerPort: %d}]
`, targetPort, image, targetPort)
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

// testPicker is an endpoint picker the test serves itself, as the
// extension's protocol (docs/proposals/004-endpoint-picker-protocol,
// v1.6.0) and its lwepp have it, except for the one fault the test sets:
// it reads the request headers and body to the end of the body, answers
// each body message, then names the endpoints it picks in both the
// x-gateway-destination-endpoint header mutation and the envoy.lb dynamic
// metadata, picking round-robin among the subset hint (an ImmediateResponse
// 503 when the hint is empty); it answers the response headers by setting
// x-conformance-test-served-endpoint to the endpoint the router reports as
// served. It serves TLS with a certificate of the test cluster's CA, which
// the router's default --endpoint-picker-tls speaks without verifying.
type testPicker struct {
	extprocv3.UnimplementedExternalProcessorServer

	mu sync.Mutex
	// The faults: delay holds the answer to a request, servedDelay the
	// answer to the response headers (each until the router ends the
	// stream, if sooner); stale, when set, is the picker's own view of the
	// pool, from which it picks in this order, whatever the hint says.
	delay, servedDelay time.Duration
	stale              []string
	next               int
	// What it saw, by X-Request-Id: the subset hint, what it picked, the
	// endpoint reported as served; abandoned counts the streams the
	// router ended while the picker was holding an answer.
	hints     map[string][]string
	picked    map[string]string
	served    map[string]string
	abandoned int
}

// servePicker serves a testPicker at the IP of a Ready pod (the picker
// Service's endpoint) on port, until the test ends.
func servePicker(t *testing.T, ip string, port int) *testPicker {
	t.Helper()
	certFile, keyFile, err := testCluster.IssueServingCert("epp-"+ip, ip)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(port)))
	if err != nil {
		t.Fatal(err)
	}
	p := &testPicker{hints: map[string][]string{}, picked: map[string]string{}, served: map[string]string{}}
	s := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})))
	extprocv3.RegisterExternalProcessorServer(s, p)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = s.Serve(l)
	}()
	t.Cleanup(func() {
		s.Stop()
		<-done
	})
	return p
}

// set changes the picker's faults.
func (p *testPicker) set(delay, servedDelay time.Duration, stale ...string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.delay, p.servedDelay, p.stale = delay, servedDelay, stale
}

// saw returns what the picker saw of a request.
func (p *testPicker) saw(id string) (hint []string, picked, served string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.hints[id], p.picked[id], p.served[id]
}

// abandonedStreams counts the streams the router ended while the picker
// held an answer.
func (p *testPicker) abandonedStreams() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.abandoned
}

// hold waits d, or until the router ends the stream; it reports whether
// the picker may still answer.
func (p *testPicker) hold(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return true
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-ctx.Done():
		p.mu.Lock()
		p.abandoned++
		p.mu.Unlock()
		return false
	}
}

// pick chooses the endpoints of a request with this subset hint.
func (p *testPicker) pick(id string, hint []string) (string, time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.hints[id] = hint
	picked := strings.Join(p.stale, ",")
	if picked == "" && len(hint) > 0 {
		picked = hint[p.next%len(hint)]
		p.next++
	}
	p.picked[id] = picked
	return picked, p.delay
}

func (p *testPicker) Process(srv extprocv3.ExternalProcessor_ProcessServer) error {
	ctx := srv.Context()
	var id string
	var hint []string
	for {
		req, err := srv.Recv()
		if err != nil {
			return nil // the router ended the stream
		}
		var out []*extprocv3.ProcessingResponse
		end := false
		switch r := req.Request.(type) {
		case *extprocv3.ProcessingRequest_RequestHeaders:
			for _, h := range r.RequestHeaders.GetHeaders().GetHeaders() {
				if h.GetKey() == "x-request-id" {
					id = cmp.Or(string(h.GetRawValue()), h.GetValue())
				}
			}
			for _, v := range req.GetMetadataContext().GetFilterMetadata()[eppmeta.SubsetFilterNamespace].GetFields()[eppmeta.SubsetFilterKey].GetListValue().GetValues() {
				hint = append(hint, v.GetStringValue())
			}
			end = r.RequestHeaders.EndOfStream
		case *extprocv3.ProcessingRequest_RequestBody:
			end = r.RequestBody.EndOfStream
			if !end {
				out = append(out, bodyAnswer())
			}
		case *extprocv3.ProcessingRequest_ResponseHeaders:
			served := req.GetMetadataContext().GetFilterMetadata()[eppmeta.DestinationEndpointNamespace].GetFields()[eppmeta.DestinationEndpointServedKey].GetStringValue()
			p.mu.Lock()
			p.served[id] = served
			delay := p.servedDelay
			p.mu.Unlock()
			if !p.hold(ctx, delay) {
				return ctx.Err()
			}
			out = append(out, &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{ResponseHeaders: &extprocv3.HeadersResponse{
				Response: &extprocv3.CommonResponse{HeaderMutation: setHeader(eppmeta.ConformanceTestResultHeader, served)}}}})
		default:
			return status.Errorf(codes.InvalidArgument, "unexpected %T", r)
		}
		if end {
			picked, delay := p.pick(id, hint)
			if !p.hold(ctx, delay) {
				return ctx.Err()
			}
			out = append(out, pickAnswer(picked))
			// An immediate response ends the request; otherwise the last
			// body message is answered too, as lwepp does.
			if _, body := req.Request.(*extprocv3.ProcessingRequest_RequestBody); body && picked != "" {
				out = append(out, bodyAnswer())
			}
		}
		for _, resp := range out {
			if err := srv.Send(resp); err != nil {
				return err
			}
		}
	}
}

// pickAnswer is the answer to a request's headers that names the picked
// endpoints, or, with none, the 503 the protocol asks for.
func pickAnswer(picked string) *extprocv3.ProcessingResponse {
	if picked == "" {
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{ImmediateResponse: &extprocv3.ImmediateResponse{
			Status: &typev3.HttpStatus{Code: typev3.StatusCode_ServiceUnavailable}, Body: []byte("no endpoint to pick")}}}
	}
	return &extprocv3.ProcessingResponse{
		Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{
			Response: &extprocv3.CommonResponse{ClearRouteCache: true, HeaderMutation: setHeader(eppmeta.DestinationEndpointKey, picked)}}},
		DynamicMetadata: &structpb.Struct{Fields: map[string]*structpb.Value{eppmeta.DestinationEndpointNamespace: structpb.NewStructValue(
			&structpb.Struct{Fields: map[string]*structpb.Value{eppmeta.DestinationEndpointKey: structpb.NewStringValue(picked)}})}},
	}
}

// bodyAnswer lets a body message go on unchanged.
func bodyAnswer() *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{Response: &extprocv3.CommonResponse{}}}}
}

func setHeader(k, v string) *extprocv3.HeaderMutation {
	return &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: k, RawValue: []byte(v)}}}}
}

// pickerEnv is the picked pools (pickedPools) of three simulated model
// servers llama-0…2, whose picker Service's one pod is served by a
// testPicker, behind a router of the test's own.
type pickerEnv struct {
	ns      string
	r       *router
	addr    string
	epp     *testPicker
	pods    []corev1.Pod
	seen    *arrivals
	podByIP map[string]string
	seq     atomic.Int64
}

// startPickerEnv sets up a pickerEnv, its router run with routerArgs, and
// waits until a request to the FailClose pool is served through the
// picker.
func startPickerEnv(t *testing.T, ctx context.Context, name string, routerArgs ...string) *pickerEnv {
	t.Helper()
	installInferencePools(t, ctx)
	e := &pickerEnv{ns: namespace(t, ctx, name), seen: &arrivals{byID: map[string]fleet.Arrival{}}, podByIP: map[string]string{}}
	simulate(t, ctx, e.ns, e.seen.add)
	e.pods = modelPods(t, ctx, e.ns, 3)
	for _, p := range e.pods {
		e.podByIP[p.Status.PodIP] = p.Name
	}
	apply(t, ctx, e.ns, pickedPools(e.ns))
	apply(t, ctx, e.ns, pickerService("capstan.dev/test-endpoint-picker", 9002))
	epp, err := testCluster.WaitForReadyPods(ctx, e.ns, "app=epp", 1, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	e.epp = servePicker(t, epp[0].Status.PodIP, 9002)
	e.r = startRouter(t, ctx, "router-"+name, append([]string{"--namespaces=" + e.ns}, routerArgs...)...)
	e.addr = gatewayAddress(t, ctx, e.ns, "inference")
	for _, route := range []string{"open", "strict"} {
		wantRouteCondition(t, ctx, types.NamespacedName{Namespace: e.ns, Name: route}, "inference", "ResolvedRefs", metav1.ConditionTrue, "ResolvedRefs")
	}
	var last string
	err = testCluster.WaitFor(ctx, 30*time.Second, "a request through the FailClose pool to be served through the test picker", func(context.Context) (bool, error) {
		res, _ := e.completion(ctx, "strict.example.com")
		_, err := e.throughPicker(res)
		if err != nil {
			last = err.Error()
		}
		return err == nil, nil
	})
	if err != nil {
		t.Fatalf("%v; last: %s", err, last)
	}
	return e
}

// completion sends one completion, each prompt its own, and says how long
// the answer took.
func (e *pickerEnv) completion(ctx context.Context, host string) (result, time.Duration) {
	body := fmt.Sprintf(`{"model":"llama-3-8b","prompt":"%d: hello there","max_tokens":4}`, e.seq.Add(1))
	start := time.Now()
	res := send(ctx, "POST", e.addr, host, "/v1/completions", body)
	return res, time.Since(start)
}

// endpoint is a pod's model-server endpoint.
func endpoint(p corev1.Pod) string { return net.JoinHostPort(p.Status.PodIP, "8000") }

// servedBy returns the pod the fleet saw a request at, checking that the
// router's X-Capstan-Pod names it.
func (e *pickerEnv) servedBy(res result) (fleet.Arrival, error) {
	if res.err != nil || res.status != http.StatusOK {
		return fleet.Arrival{}, fmt.Errorf("%d %v %s", res.status, res.err, res.body)
	}
	id := res.header.Get("X-Request-Id")
	got, ok := e.seen.get(id)
	if !ok {
		return got, fmt.Errorf("request %s reached no pod the fleet knows", id)
	}
	if pod := res.header.Get("X-Capstan-Pod"); pod != got.Pod.String() {
		return got, fmt.Errorf("X-Capstan-Pod is %q, the fleet saw request %s at %s", pod, id, got.Pod)
	}
	return got, nil
}

// throughPicker checks that a response came from an endpoint the picker
// picked, which the router reported back to it as served (and whose
// answer to that, x-conformance-test-served-endpoint, the client got). It
// returns the pod.
func (e *pickerEnv) throughPicker(res result) (string, error) {
	got, err := e.servedBy(res)
	if err != nil {
		return "", err
	}
	id := res.header.Get("X-Request-Id")
	_, picked, served := e.epp.saw(id)
	at := net.JoinHostPort(got.IP, "8000")
	if !slices.Contains(strings.Split(picked, ","), at) || served != at || res.header.Get(servedHeader) != at {
		return "", fmt.Errorf("request %s: the picker picked %q, was told %q served it, the client got %s %q; the fleet saw it at %s",
			id, picked, served, servedHeader, res.header.Get(servedHeader), at)
	}
	return got.Pod.Name, nil
}

// pickerMetrics is a pool's endpoint-picker failures of a kind and its
// fail-open decisions.
func (e *pickerEnv) pickerMetrics(t *testing.T, pool, kind string) (failures, failOpen float64) {
	t.Helper()
	key := e.ns + "/" + pool
	return e.r.metricValue(t, "capstan_router_endpoint_picker_failures_total", map[string]string{"pool": key, "kind": kind}),
		e.r.metricValue(t, "capstan_router_endpoint_picker_fail_open_total", map[string]string{"pool": key})
}

// wantPickerMetrics checks that a pool's failures of a kind and fail-open
// decisions grew by these counts since before.
func (e *pickerEnv) wantPickerMetrics(t *testing.T, pool, kind string, before [2]float64, failures, failOpen float64) {
	t.Helper()
	f, o := e.pickerMetrics(t, pool, kind)
	if f-before[0] != failures || o-before[1] != failOpen {
		t.Errorf("pool %s: %v more %s failures and %v more fail-open decisions, want %v and %v", pool, f-before[0], kind, o-before[1], failures, failOpen)
	}
}

func (e *pickerEnv) metricsNow(t *testing.T, pool, kind string) [2]float64 {
	t.Helper()
	f, o := e.pickerMetrics(t, pool, kind)
	return [2]float64{f, o}
}

// TestEndpointPickerSlow runs the router with --endpoint-picker-timeout=300ms
// against a picker that answers slowly. A picker slower than usual but
// within the timeout is obeyed. One that holds its answer for 10 s is
// given up at the timeout: FailOpen requests are served by the router's
// balancer in about the timeout, FailClose ones get 503
// endpoint_picker_failed naming the picker Service and the timeout, none
// of them reaching a pod, and the router counts timeouts, fail-open
// decisions, and ends every stream it gave up. A picker that holds its
// answer to the response headers delays the response by about the timeout,
// which then goes on unchanged from the pod that served it, even for a
// FailClose pool.
func TestEndpointPickerSlow(t *testing.T) {
	const timeout = 300 * time.Millisecond
	// bound is the most a request may take: the timeout, plus a margin for
	// a shared 2-CPU machine (the simulated pods answer in 10 ms), far
	// below the picker's 10 s.
	const bound = timeout + time.Second
	ctx := testContext(t, 3*time.Minute)
	e := startPickerEnv(t, ctx, "picker-slow", "--endpoint-picker-timeout="+timeout.String())

	e.epp.set(timeout/4, 0)
	for i := range 3 {
		res, took := e.completion(ctx, "strict.example.com")
		if _, err := e.throughPicker(res); err != nil {
			t.Fatalf("request %d to a picker answering in %s: %v", i, timeout/4, err)
		}
		if took < timeout/4 {
			t.Errorf("request %d was answered in %s, before its picker did (%s)", i, took, timeout/4)
		}
	}

	e.epp.set(10*time.Second, 0)
	openBefore, strictBefore := e.metricsNow(t, "llama", "timeout"), e.metricsNow(t, "llama-strict", "timeout")
	abandoned := e.epp.abandonedStreams()
	var slowest time.Duration
	inTime := func(what string, took time.Duration) {
		t.Helper()
		slowest = max(slowest, took)
		if took < timeout || took > bound {
			t.Errorf("%s took %s, want between the timeout %s and %s", what, took, timeout, bound)
		}
	}
	for i := range 10 {
		res, took := e.completion(ctx, "open.example.com")
		inTime(fmt.Sprintf("FailOpen request %d", i), took)
		if _, err := e.servedBy(res); err != nil {
			t.Errorf("FailOpen request %d with the picker answering too late: %v", i, err)
		} else if h := res.header.Get(servedHeader); h != "" {
			t.Errorf("FailOpen request %d, which the router's balancer served, has the picker's %s %q", i, servedHeader, h)
		}
	}
	marks := map[string]int{}
	for _, p := range e.pods {
		marks[p.Name] = e.seen.to(p.Name)
	}
	for i := range 5 {
		res, took := e.completion(ctx, "strict.example.com")
		inTime(fmt.Sprintf("FailClose request %d", i), took)
		if res.status != http.StatusServiceUnavailable || res.header.Get("Retry-After") == "" {
			t.Errorf("FailClose request %d with the picker answering too late: %d (Retry-After %q) %s", i, res.status, res.header.Get("Retry-After"), res.body)
		}
		for _, want := range []string{`"code":"endpoint_picker_failed"`, "Service " + e.ns + "/epp:9002", "timeout", "no answer within " + timeout.String()} {
			if !strings.Contains(res.body, want) {
				t.Errorf("FailClose request %d: the error does not say %q: %s", i, want, res.body)
			}
		}
		if i == 0 {
			t.Logf("FailClose with a picker too slow: %d %s", res.status, strings.TrimSpace(res.body))
		}
	}
	for _, p := range e.pods {
		if n := e.seen.to(p.Name) - marks[p.Name]; n != 0 {
			t.Errorf("pod %s got %d FailClose requests whose picker answered too late", p.Name, n)
		}
	}
	t.Logf("with the picker answering after 10s and a %s timeout, the slowest answer took %s", timeout, slowest)
	e.wantPickerMetrics(t, "llama", "timeout", openBefore, 10, 10)
	e.wantPickerMetrics(t, "llama-strict", "timeout", strictBefore, 5, 0)
	e.wantAbandoned(t, ctx, abandoned+15)

	// Too slow on the response headers: the model server has answered,
	// so the request is not failed, whatever the failureMode.
	e.epp.set(0, 10*time.Second)
	strictBefore = e.metricsNow(t, "llama-strict", "timeout")
	abandoned = e.epp.abandonedStreams()
	for i := range 3 {
		res, took := e.completion(ctx, "strict.example.com")
		inTime(fmt.Sprintf("FailClose request %d with the picker slow on its response", i), took)
		got, err := e.servedBy(res)
		if err != nil {
			t.Errorf("FailClose request %d, the picker slow on its response: %v", i, err)
			continue
		}
		_, picked, served := e.epp.saw(res.header.Get("X-Request-Id"))
		at := net.JoinHostPort(got.IP, "8000")
		if picked != at || served != at {
			t.Errorf("request %d was served at %s, picked %q, reported as served at %q", i, at, picked, served)
		}
		if h := res.header.Get(servedHeader); h != "" {
			t.Errorf("request %d has the %s %q the picker set after the timeout", i, servedHeader, h)
		}
	}
	e.wantPickerMetrics(t, "llama-strict", "timeout", strictBefore, 3, 0)
	e.wantAbandoned(t, ctx, abandoned+3)
}

// wantAbandoned waits until the router has ended n streams on which the
// picker was holding an answer.
func (e *pickerEnv) wantAbandoned(t *testing.T, ctx context.Context, n int) {
	t.Helper()
	err := testCluster.WaitFor(ctx, 10*time.Second, fmt.Sprintf("the router to end the %d streams it gave up on", n), func(context.Context) (bool, error) {
		return e.epp.abandonedStreams() >= n, nil
	})
	if err != nil {
		t.Errorf("%v: %d", err, e.epp.abandonedStreams())
	}
}

// TestEndpointPickerStaleView runs the router against a picker whose view
// of the pool is staler than the router's: it picks from its own list,
// ignoring the subset hint (which the router sends with the pool's Ready
// endpoints only: the hint never has the pod that left). An endpoint the
// picker names that is not a Ready endpoint of the pool, because its pod
// is not Ready or is terminating (and still answering), gets no request:
// the router goes on to the next endpoint the picker named that is Ready,
// reports that one as served, and when none is, the picker has failed
// (not_ready): FailOpen requests are balanced over the Ready pods,
// FailClose ones get 503 naming the picker Service.
func TestEndpointPickerStaleView(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	e := startPickerEnv(t, ctx, "picker-stale")
	unready, terminating, ready := e.pods[0], e.pods[2], e.pods[1]

	patch := `{"metadata":{"annotations":{"sim.capstan.dev/unready":"true"}}}`
	if _, err := testCluster.Client.CoreV1().Pods(e.ns).Patch(ctx, unready.Name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	e.waitReadyEndpoints(t, ctx, 2)
	marks := e.marks()
	e.epp.set(0, 0, endpoint(unready), endpoint(ready))
	for i := range 6 {
		res, _ := e.completion(ctx, "strict.example.com")
		pod, err := e.throughPicker(res)
		if err != nil {
			t.Fatalf("FailClose request %d, %s then %s picked: %v", i, unready.Name, ready.Name, err)
		}
		if pod != ready.Name {
			t.Errorf("FailClose request %d, %s then %s picked, was served by %s", i, unready.Name, ready.Name, pod)
		}
		if hint, _, _ := e.epp.saw(res.header.Get("X-Request-Id")); slices.Contains(hint, endpoint(unready)) || len(hint) != 2 {
			t.Errorf("request %d: the subset hint %v is not the pool's 2 Ready endpoints", i, hint)
		}
	}
	// When the picker names no Ready endpoint, it has failed.
	e.epp.set(0, 0, endpoint(unready))
	e.noReadyPick(t, ctx, 10, 5, "")
	e.wantNone(t, marks, unready.Name)

	// llama-2 is deleted: Terminating, its simulated server answers for
	// another minute, but it is no endpoint of the pool any more.
	if err := testCluster.Client.CoreV1().Pods(e.ns).Delete(ctx, terminating.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	e.waitReadyEndpoints(t, ctx, 1)
	marks = e.marks()
	e.epp.set(0, 0, endpoint(terminating), endpoint(unready), endpoint(ready))
	for i := range 6 {
		host := "strict.example.com"
		if i%2 == 1 {
			host = "open.example.com"
		}
		res, _ := e.completion(ctx, host)
		pod, err := e.throughPicker(res)
		if err != nil || pod != ready.Name {
			t.Errorf("request %d to %s, %s, %s then %s picked: served by %q: %v", i, host, terminating.Name, unready.Name, ready.Name, pod, err)
		}
	}
	e.epp.set(0, 0, endpoint(terminating), endpoint(unready))
	e.noReadyPick(t, ctx, 10, 5, ready.Name)
	e.wantNone(t, marks, terminating.Name, unready.Name)
}

// noReadyPick sends open requests to the FailOpen pool and strict ones to
// the FailClose pool while the picker names no Ready endpoint: the first
// are balanced, each to the only pod that may serve them when only is
// set, the others get 503 naming the picker and reach no pod; each counts
// as a not_ready failure.
func (e *pickerEnv) noReadyPick(t *testing.T, ctx context.Context, open, strict int, only string) {
	t.Helper()
	openBefore, strictBefore := e.metricsNow(t, "llama", "not_ready"), e.metricsNow(t, "llama-strict", "not_ready")
	for i := range open {
		res, _ := e.completion(ctx, "open.example.com")
		got, err := e.servedBy(res)
		switch {
		case err != nil:
			t.Errorf("FailOpen request %d, no Ready endpoint picked: %v", i, err)
		case res.header.Get(servedHeader) != "":
			t.Errorf("FailOpen request %d, which the router's balancer served, has the picker's %s", i, servedHeader)
		case only != "" && got.Pod.Name != only:
			t.Errorf("FailOpen request %d, no Ready endpoint picked, was served by %s, not the one Ready pod %s", i, got.Pod.Name, only)
		}
	}
	marks := e.marks()
	for i := range strict {
		res, _ := e.completion(ctx, "strict.example.com")
		if res.status != http.StatusServiceUnavailable || !strings.Contains(res.body, "Service "+e.ns+"/epp:9002") || !strings.Contains(res.body, "not_ready") {
			t.Errorf("FailClose request %d, no Ready endpoint picked: %d %s", i, res.status, res.body)
		}
		if i == 0 {
			t.Logf("FailClose, no Ready endpoint picked: %d %s", res.status, strings.TrimSpace(res.body))
		}
	}
	e.wantNone(t, marks)
	e.wantPickerMetrics(t, "llama", "not_ready", openBefore, float64(open), float64(open))
	e.wantPickerMetrics(t, "llama-strict", "not_ready", strictBefore, float64(strict), 0)
}

// marks counts the requests each pod has received.
func (e *pickerEnv) marks() map[string]int {
	m := map[string]int{}
	for _, p := range e.pods {
		m[p.Name] = e.seen.to(p.Name)
	}
	return m
}

// wantNone checks that these pods (all when none is named) got no request
// since marks.
func (e *pickerEnv) wantNone(t *testing.T, marks map[string]int, pods ...string) {
	t.Helper()
	for name, n := range marks {
		if len(pods) > 0 && !slices.Contains(pods, name) {
			continue
		}
		if got := e.seen.to(name) - n; got != 0 {
			t.Errorf("pod %s got %d requests", name, got)
		}
	}
}

// waitReadyEndpoints waits until the router counts n ready endpoints in
// each pool.
func (e *pickerEnv) waitReadyEndpoints(t *testing.T, ctx context.Context, n float64) {
	t.Helper()
	err := testCluster.WaitFor(ctx, 10*time.Second, fmt.Sprintf("the router to count %v ready endpoints in each pool", n), func(context.Context) (bool, error) {
		for _, pool := range []string{"llama", "llama-strict"} {
			if e.r.metricValue(t, "capstan_router_inferencepool_ready_endpoints", map[string]string{"namespace": e.ns, "inferencepool": pool}) != n {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
