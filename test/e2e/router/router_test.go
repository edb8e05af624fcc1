package router

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/klog/v2/ktesting"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/fleet"
)

// arrivals records every request the simulated pods receive.
type arrivals struct {
	mu   sync.Mutex
	list []fleet.Arrival
}

func (a *arrivals) add(x fleet.Arrival) {
	a.mu.Lock()
	a.list = append(a.list, x)
	a.mu.Unlock()
}

func (a *arrivals) all() []fleet.Arrival {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.list)
}

func (a *arrivals) count(pod string) int {
	n := 0
	for _, x := range a.all() {
		if x.Pod.Name == pod {
			n++
		}
	}
	return n
}

func testContext(t *testing.T, timeout time.Duration) context.Context {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	t.Cleanup(cancel)
	return ctx
}

func namespace(t *testing.T, ctx context.Context, prefix string) string {
	t.Helper()
	setup(t)
	ns, err := testCluster.CreateNamespace(ctx, prefix)
	if err != nil {
		t.Fatal(err)
	}
	return ns
}

func deploy(t *testing.T, ctx context.Context, m cluster.ModelServer) []corev1.Pod {
	t.Helper()
	if err := testCluster.Deploy(ctx, m); err != nil {
		t.Fatal(err)
	}
	pods, err := testCluster.WaitForReadyPods(ctx, m.Namespace, "app="+m.Name, int(m.Replicas), 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return pods
}

func annotate(t *testing.T, ctx context.Context, ns, pod, key, value string) {
	t.Helper()
	patch := fmt.Sprintf(`{"metadata":{"annotations":{%q:%q}}}`, key, value)
	if _, err := testCluster.Client.CoreV1().Pods(ns).Patch(ctx, pod, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
}

// whenUnready returns the moment a watch sees the pod's Ready condition
// turn false.
func whenUnready(t *testing.T, ctx context.Context, ns, pod string) <-chan time.Time {
	t.Helper()
	w, err := testCluster.Client.CoreV1().Pods(ns).Watch(ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("metadata.name", pod).String()})
	if err != nil {
		t.Fatal(err)
	}
	out := make(chan time.Time, 1)
	go func() {
		defer w.Stop()
		for ev := range w.ResultChan() {
			if p, ok := ev.Object.(*corev1.Pod); ok && !modelserver.IsReady(p) {
				out <- time.Now()
				return
			}
		}
	}()
	return out
}

// Test 1: only Ready endpoints get traffic, across the Services pooled for a
// model, and a pod that turns unready gets no new request within 1 s.
func TestOnlyReadyEndpointsGetTraffic(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	ns := namespace(t, ctx, "ready")
	var seen arrivals
	simulate(t, ctx, ns, seen.add)
	pods := deploy(t, ctx, cluster.ModelServer{Namespace: ns, Name: "llama", Model: "llama", Replicas: 3})
	// A second Service for the same model whose pod is up (the simulator
	// answers on its IP) but still loading: Running, never Ready.
	loading := cluster.ModelServer{Namespace: ns, Name: "llama-loading", Model: "llama", Replicas: 1,
		Annotations: map[string]string{"sim.capstan.dev/ready-after": "1h"}}
	if err := testCluster.Deploy(ctx, loading); err != nil {
		t.Fatal(err)
	}
	r := startRouter(t, ctx, "router-ready", "--namespaces="+ns, spreadEvenly)
	err := testCluster.WaitFor(ctx, 20*time.Second, "the router to pool 3 ready and 1 loading endpoint", func(ctx context.Context) (bool, error) {
		m, err := r.models(ctx)
		e := m["llama"].Endpoints
		return err == nil && e.Ready == 3 && e.NotReady == 1, err
	})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 60 {
		if res := r.post(ctx, "/v1/completions", completion("llama")); res.err != nil || res.status != http.StatusOK {
			t.Fatalf("request %d: %d %v %s", i, res.status, res.err, res.body)
		}
	}
	for _, p := range pods {
		if n := seen.count(p.Name); n < 5 {
			t.Errorf("ready pod %s got %d of 60 requests", p.Name, n)
		}
	}

	// Take readiness away from one pod under steady load.
	victim := pods[0].Name
	unready := whenUnready(t, ctx, ns, victim)
	loadCtx, stopLoad := context.WithCancel(ctx)
	results := steadyLoad(loadCtx, []*router{r}, 4, completion("llama"))
	time.Sleep(300 * time.Millisecond) // load before the change, so the victim is busy
	annotate(t, ctx, ns, victim, "sim.capstan.dev/unready", "true")
	var t0 time.Time
	select {
	case t0 = <-unready:
	case <-ctx.Done():
		t.Fatal("the pod never turned unready")
	}
	time.Sleep(2 * time.Second) // keep the load on well past the 1 s bound
	stopLoad()
	if f := failures(<-results); len(f) > 0 {
		t.Errorf("%d client requests failed: %v", len(f), f[:min(len(f), 5)])
	}
	var before, late int
	var last time.Time
	for _, a := range seen.all() {
		if a.Pod.Name != victim {
			continue
		}
		if a.At.Before(t0) {
			before++
		}
		if a.At.After(last) {
			last = a.At
		}
		if a.At.After(t0.Add(time.Second)) {
			late++
		}
	}
	if before == 0 {
		t.Fatal("the victim got no traffic before it turned unready; the test proves nothing")
	}
	if late > 0 {
		t.Errorf("the unready pod got %d requests more than 1 s after it turned unready (last %s after)", late, last.Sub(t0))
	}
	t.Logf("last request to the unready pod arrived %s after it turned unready", last.Sub(t0).Round(time.Millisecond))
	if n := seen.count(podOf(t, ctx, ns, "app=llama-loading")); n != 0 {
		t.Errorf("the loading pod got %d requests", n)
	}
}

func podOf(t *testing.T, ctx context.Context, ns, selector string) string {
	t.Helper()
	pods, err := testCluster.Pods(ctx, ns, selector)
	if err != nil || len(pods) != 1 {
		t.Fatalf("pods %s: %d, %v", selector, len(pods), err)
	}
	return pods[0].Name
}

// sliceTracker watches a Service's EndpointSlices and records, per pod, when
// its endpoint last went from routable (ready, not terminating) to not, and
// when it left the slices altogether.
type sliceTracker struct {
	mu       sync.Mutex
	slices   map[string]*discoveryv1.EndpointSlice
	present  map[string]bool
	routable map[string]bool
	// notRoutableAt is when a routable endpoint last stopped being routable.
	notRoutableAt map[string]time.Time
	leftAt        map[string]time.Time
}

func trackSlices(t *testing.T, ctx context.Context, ns, service string) *sliceTracker {
	t.Helper()
	st := &sliceTracker{slices: map[string]*discoveryv1.EndpointSlice{}, present: map[string]bool{}, routable: map[string]bool{},
		notRoutableAt: map[string]time.Time{}, leftAt: map[string]time.Time{}}
	w, err := testCluster.Client.DiscoveryV1().EndpointSlices(ns).Watch(ctx,
		metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + service})
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		defer w.Stop()
		for ev := range w.ResultChan() {
			s, ok := ev.Object.(*discoveryv1.EndpointSlice)
			if !ok {
				continue
			}
			now := time.Now()
			st.mu.Lock()
			if ev.Type == watch.Deleted {
				delete(st.slices, s.Name)
			} else {
				st.slices[s.Name] = s
			}
			st.update(now)
			st.mu.Unlock()
		}
	}()
	return st
}

func (st *sliceTracker) update(now time.Time) {
	current := map[string]bool{}
	for _, s := range st.slices {
		for _, e := range s.Endpoints {
			if e.TargetRef == nil {
				continue
			}
			pod := e.TargetRef.Name
			routable := (e.Conditions.Ready == nil || *e.Conditions.Ready) && !(e.Conditions.Terminating != nil && *e.Conditions.Terminating)
			current[pod] = current[pod] || routable
		}
	}
	for pod, routable := range current {
		st.present[pod] = true
		if routable {
			st.routable[pod] = true
		} else if st.routable[pod] {
			st.routable[pod] = false
			st.notRoutableAt[pod] = now
		}
	}
	for pod := range st.present {
		if _, ok := current[pod]; ok {
			continue
		}
		if st.routable[pod] {
			st.routable[pod] = false
			st.notRoutableAt[pod] = now
		}
		if _, ok := st.leftAt[pod]; !ok {
			st.leftAt[pod] = now
		}
	}
}

func (st *sliceTracker) times() (notRoutable, left map[string]time.Time) {
	st.mu.Lock()
	defer st.mu.Unlock()
	return mapsClone(st.notRoutableAt), mapsClone(st.leftAt)
}

func mapsClone(m map[string]time.Time) map[string]time.Time {
	out := make(map[string]time.Time, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// Test 2: a rolling update under steady load through two router replicas
// fails no client request, and no request reaches a pod after its endpoint
// left the slice (nor more than 1 s after it stopped being Ready).
func TestRollingUpdateUnderLoad(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	ns := namespace(t, ctx, "roll")
	var seen arrivals
	simulate(t, ctx, ns, seen.add)
	ms := cluster.ModelServer{Namespace: ns, Name: "roll", Model: "roll", Replicas: 4, PreStopSleepSeconds: 1,
		Annotations: map[string]string{"sim.capstan.dev/terminate-after": "2s", "sim.capstan.dev/ttft": "5ms"}}
	oldPods := deploy(t, ctx, ms)
	routers := []*router{
		startRouter(t, ctx, "router-roll-0", "--namespaces="+ns, spreadEvenly),
		startRouter(t, ctx, "router-roll-1", "--namespaces="+ns, spreadEvenly),
	}
	for _, r := range routers {
		r.waitReady(t, ctx, "roll", 4)
	}
	tracker := trackSlices(t, ctx, ns, "roll")

	loadCtx, stopLoad := context.WithCancel(ctx)
	results := steadyLoad(loadCtx, routers, 8, completion("roll"))
	err := testCluster.WaitFor(ctx, 10*time.Second, "load on every old pod", func(ctx context.Context) (bool, error) {
		for _, p := range oldPods {
			if seen.count(p.Name) == 0 {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	rollOut(t, ctx, ns, "roll", oldPods, 4)
	rolled := time.Since(start)
	// Keep the load on until the routers have seen the old endpoints leave.
	for _, r := range routers {
		err := testCluster.WaitFor(ctx, 10*time.Second, "the routers to forget the old endpoints", func(ctx context.Context) (bool, error) {
			m, err := r.models(ctx)
			return err == nil && m["roll"].Endpoints.Total == 4 && m["roll"].Endpoints.Ready == 4, err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(500 * time.Millisecond)
	stopLoad()
	all := <-results
	if f := failures(all); len(f) > 0 {
		t.Errorf("%d of %d client requests failed during the rollout: %v", len(f), len(all), f[:min(len(f), 5)])
	}
	checkArrivals(t, &seen, tracker, oldPods)
	t.Logf("rollout of 4 pods took %s; %d requests, %d failed", rolled.Round(time.Millisecond), len(all), len(failures(all)))
}

// rollOut changes the pod template of Deployment name and waits until
// none of oldPods is left and replicas new pods are Ready.
func rollOut(t *testing.T, ctx context.Context, ns, name string, oldPods []corev1.Pod, replicas int) {
	t.Helper()
	patch := `{"spec":{"template":{"metadata":{"annotations":{"e2e.capstan.dev/rollout":"1"}}}}}`
	if _, err := testCluster.Client.AppsV1().Deployments(ns).Patch(ctx, name, types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	err := testCluster.WaitFor(ctx, 90*time.Second, "the rollout to finish and the old pods to go", func(ctx context.Context) (bool, error) {
		pods, err := testCluster.Pods(ctx, ns, "app="+name)
		if err != nil {
			return false, err
		}
		ready := 0
		for _, p := range pods {
			if slices.ContainsFunc(oldPods, func(o corev1.Pod) bool { return o.Name == p.Name }) {
				return false, nil
			}
			if modelserver.IsReady(&p) && p.DeletionTimestamp == nil {
				ready++
			}
		}
		return ready == replicas, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// checkArrivals fails the test if a client's request reached one of
// oldPods after its endpoint left the slice, or more than 1 s after it
// stopped being Ready, as the tracker saw them. (The adapter loader's calls
// are not clients' requests.)
func checkArrivals(t *testing.T, seen *arrivals, tracker *sliceTracker, oldPods []corev1.Pod) {
	t.Helper()
	notRoutable, left := tracker.times()
	var afterLeft, lateAfterUnready []string
	for _, a := range seen.all() {
		if strings.HasSuffix(a.Path, "_lora_adapter") {
			continue
		}
		if at, ok := left[a.Pod.Name]; ok && a.At.After(at) {
			afterLeft = append(afterLeft, fmt.Sprintf("%s %s after it left", a.Pod.Name, a.At.Sub(at)))
		}
		if at, ok := notRoutable[a.Pod.Name]; ok && a.At.After(at.Add(time.Second)) {
			lateAfterUnready = append(lateAfterUnready, fmt.Sprintf("%s %s after it stopped being ready", a.Pod.Name, a.At.Sub(at)))
		}
	}
	if len(afterLeft) > 0 {
		t.Errorf("%d requests reached a pod after its endpoint left the slice: %v", len(afterLeft), afterLeft[:min(len(afterLeft), 5)])
	}
	if len(lateAfterUnready) > 0 {
		t.Errorf("%d requests reached a pod more than 1 s after its endpoint stopped being ready: %v", len(lateAfterUnready), lateAfterUnready[:min(len(lateAfterUnready), 5)])
	}
	for _, p := range oldPods {
		if _, ok := left[p.Name]; !ok {
			t.Errorf("the slice watch never saw old pod %s leave; the check above proves nothing for it", p.Name)
		}
	}
}

// Test 3: a Ready pod that refuses connections costs the clients nothing: the
// router retries on another endpoint and ejects the pod.
func TestRefusingPodIsRetriedAndEjected(t *testing.T) {
	ctx := testContext(t, 2*time.Minute)
	ns := namespace(t, ctx, "refuse")
	sim := simulate(t, ctx, ns, nil)
	pods := deploy(t, ctx, cluster.ModelServer{Namespace: ns, Name: "refuse", Model: "refuse", Replicas: 3})
	r := startRouter(t, ctx, "router-refuse", "--namespaces="+ns, spreadEvenly)
	r.waitReady(t, ctx, "refuse", 3)

	victim := pods[0]
	annotate(t, ctx, ns, victim.Name, fleet.FaultAnnotation, string(fleet.FaultRefuse))
	err := testCluster.WaitFor(ctx, 10*time.Second, "the pod to refuse connections", func(ctx context.Context) (bool, error) {
		conn, err := net.DialTimeout("tcp", victim.Status.PodIP+":8000", time.Second)
		if err == nil {
			conn.Close()
			return false, nil
		}
		return errors.Is(err, syscall.ECONNREFUSED), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	servedBefore := sim.Served(types.NamespacedName{Namespace: ns, Name: victim.Name})
	loadCtx, stopLoad := context.WithCancel(ctx)
	results := steadyLoad(loadCtx, []*router{r}, 6, completion("refuse"))
	time.Sleep(3 * time.Second)
	stopLoad()
	all := <-results
	if f := failures(all); len(f) > 0 {
		t.Errorf("%d of %d requests failed with one pod refusing connections: %v", len(f), len(all), f[:min(len(f), 5)])
	}
	if len(all) < 100 {
		t.Errorf("only %d requests in 3 s", len(all))
	}
	if got := sim.Served(types.NamespacedName{Namespace: ns, Name: victim.Name}); got != servedBefore {
		t.Errorf("the refusing pod served %d requests", got-servedBefore)
	}
	ejections := r.metric(t, "capstan_router_ejections_total", map[string]string{"model": "refuse"})
	retries := r.metric(t, "capstan_router_retries_total", map[string]string{"model": "refuse", "reason": "connect"})
	if ejections < 1 || retries < 1 {
		t.Errorf("ejections %v, connect retries %v; want at least one of each", ejections, retries)
	}
	// Ejection, not luck: with a 1 s base doubling to 30 s, 3 s of load
	// tries the refusing pod a handful of times, not once per request.
	if retries > 10 {
		t.Errorf("%v retries for %d requests: the refusing pod was not ejected", retries, len(all))
	}
	t.Logf("%d requests, %v retried, %v ejections", len(all), retries, ejections)
}

type apiError struct {
	Error struct {
		Message string `json:"message"`
		Type    string `json:"type"`
		Code    string `json:"code"`
	} `json:"error"`
}

// Test 4: the error answers, against real EndpointSlices.
func TestErrorAnswers(t *testing.T) {
	ctx := testContext(t, 2*time.Minute)
	ns := namespace(t, ctx, "errors")
	simulate(t, ctx, ns, nil)
	deploy(t, ctx, cluster.ModelServer{Namespace: ns, Name: "served", Model: "served", Replicas: 1})
	loading := cluster.ModelServer{Namespace: ns, Name: "loading", Model: "llama-3-8b", Replicas: 2,
		Annotations: map[string]string{"sim.capstan.dev/ready-after": "1h"}}
	if err := testCluster.Deploy(ctx, loading); err != nil {
		t.Fatal(err)
	}
	// A short hold: the model still loading is answered 503 after it.
	r := startRouter(t, ctx, "router-errors", "--namespaces="+ns, "--max-body-size=64Ki", "--retry-after=3s", "--hold-timeout=1s")
	r.waitReady(t, ctx, "served", 1)
	err := testCluster.WaitFor(ctx, 20*time.Second, "the loading pods' endpoints", func(ctx context.Context) (bool, error) {
		m, err := r.models(ctx)
		return err == nil && m["llama-3-8b"].Endpoints.NotReady == 2, err
	})
	if err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		body       string
		status     int
		code       string
		message    string
		retryAfter string
	}{
		"unknown model":  {`{"model":"gpt-9","prompt":"x"}`, 404, "model_not_found", `model "gpt-9" is not served here`, ""},
		"still loading":  {`{"model":"llama-3-8b","prompt":"x"}`, 503, "no_ready_endpoints", "model llama-3-8b has 0 ready of 2 endpoints: 2 not ready", "3"},
		"malformed JSON": {`{"model":"served","prompt":`, 400, "invalid_json", "not valid JSON", ""},
		"missing model":  {`{"prompt":"x"}`, 400, "missing_model", `no "model"`, ""},
		"oversized body": {`{"model":"served","prompt":"` + strings.Repeat("x", 70<<10) + `"}`, 413, "request_too_large", "65536 bytes", ""},
	} {
		t.Run(name, func(t *testing.T) {
			res := r.post(ctx, "/v1/completions", tc.body)
			var e apiError
			if err := json.Unmarshal([]byte(res.body), &e); err != nil || res.err != nil {
				t.Fatalf("answer %q is not an OpenAI error (%v, %v)", res.body, err, res.err)
			}
			if res.status != tc.status || e.Error.Code != tc.code || !strings.Contains(e.Error.Message, tc.message) {
				t.Errorf("got %d %s %q, want %d %s containing %q", res.status, e.Error.Code, e.Error.Message, tc.status, tc.code, tc.message)
			}
			if tc.retryAfter != "" {
				req, _ := http.NewRequestWithContext(ctx, http.MethodPost, r.url+"/v1/completions", strings.NewReader(tc.body))
				resp, err := client.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if got := resp.Header.Get("Retry-After"); got != tc.retryAfter {
					t.Errorf("Retry-After %q, want %q", got, tc.retryAfter)
				}
			}
		})
	}
	if res := r.post(ctx, "/v1/completions", completion("served")); res.status != http.StatusOK {
		t.Errorf("a good request after the bad ones: %d %s", res.status, res.body)
	}
}

// Test 5: a streamed chat completion reaches the client chunk by chunk: the
// first chunk arrives long before the model server has finished.
func TestStreamArrivesChunkByChunk(t *testing.T) {
	ctx := testContext(t, 2*time.Minute)
	ns := namespace(t, ctx, "stream")
	simulate(t, ctx, ns, nil)
	deploy(t, ctx, cluster.ModelServer{Namespace: ns, Name: "stream", Model: "stream", Replicas: 1,
		Annotations: map[string]string{"sim.capstan.dev/tpot": "300ms", "sim.capstan.dev/output-tokens": "5", "sim.capstan.dev/ttft": "10ms"}})
	r := startRouter(t, ctx, "router-stream", "--namespaces="+ns)
	r.waitReady(t, ctx, "stream", 1)

	start := time.Now()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, r.url+"/v1/chat/completions",
		strings.NewReader(`{"model":"stream","stream":true,"messages":[{"role":"user","content":"count to five"}]}`))
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
		t.Errorf("Content-Type %q", ct)
	}
	var firstChunk, done time.Duration
	chunks := 0
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "data: [DONE]":
			done = time.Since(start)
		case strings.HasPrefix(line, "data: "):
			if chunks == 0 {
				firstChunk = time.Since(start)
			}
			chunks++
		}
	}
	if done == 0 || chunks < 5 {
		t.Fatalf("stream ended after %d chunks without [DONE] (%v)", chunks, sc.Err())
	}
	// Four more tokens at 300 ms each come after the first one.
	if done-firstChunk < 900*time.Millisecond {
		t.Errorf("first chunk at %s, [DONE] at %s: the stream was buffered", firstChunk, done)
	}
	t.Logf("first chunk after %s, [DONE] after %s", firstChunk.Round(time.Millisecond), done.Round(time.Millisecond))
}

// Test 6: with the API server gone for 30 s the router keeps routing with
// what it knew, and catches up when the API server returns.
func TestAPIServerOutage(t *testing.T) {
	ctx := testContext(t, 4*time.Minute)
	ns := namespace(t, ctx, "outage")
	var seen arrivals
	sim := simulate(t, ctx, ns, seen.add)
	ms := cluster.ModelServer{Namespace: ns, Name: "steady", Model: "steady", Replicas: 2}
	deploy(t, ctx, ms)
	r := startRouter(t, ctx, "router-outage", "--namespaces="+ns, spreadEvenly)
	r.waitReady(t, ctx, "steady", 2)

	testCluster.StopAPIServer()
	restarted := false
	defer func() {
		if !restarted {
			if err := testCluster.StartAPIServer(context.WithoutCancel(ctx)); err != nil {
				t.Errorf("restarting the API server: %v", err)
			}
		}
	}()
	down := time.Now()
	loadCtx, stopLoad := context.WithTimeout(ctx, 30*time.Second)
	results := steadyLoad(loadCtx, []*router{r}, 2, completion("steady"))
	notReady := 0
	for loadCtx.Err() == nil {
		resp, err := http.Get(r.admin + "/readyz")
		if err != nil || resp.StatusCode != http.StatusOK {
			notReady++
		}
		if resp != nil {
			resp.Body.Close()
		}
		time.Sleep(time.Second)
	}
	stopLoad()
	all := <-results
	if f := failures(all); len(f) > 0 {
		t.Errorf("%d of %d requests failed while the API server was down: %v", len(f), len(all), f[:min(len(f), 5)])
	}
	if notReady > 0 {
		t.Errorf("/readyz failed %d times while the API server was down", notReady)
	}
	t.Logf("%d requests answered during %s without an API server", len(all), time.Since(down).Round(time.Second))

	if err := testCluster.StartAPIServer(ctx); err != nil {
		t.Fatal(err)
	}
	restarted = true
	// Catch up: a new replica appears in the router and gets traffic.
	scale, err := testCluster.Client.AppsV1().Deployments(ns).GetScale(ctx, "steady", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	scale.Spec.Replicas = 3
	if _, err := testCluster.Client.AppsV1().Deployments(ns).UpdateScale(ctx, "steady", scale, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	pods, err := testCluster.WaitForReadyPods(ctx, ns, "app=steady", 3, 60*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	caughtUp := time.Now()
	// client-go's informers retry with a backoff that has grown to 30–60 s
	// by the end of the outage, so that is how long catching up may take.
	r.waitReadyWithin(t, ctx, "steady", 3, 90*time.Second)
	t.Logf("the router saw the new replica %s after it was Ready", time.Since(caughtUp).Round(time.Millisecond))
	// The simulator's own watch recovers from the outage at its own pace;
	// a request to a pod it does not serve yet would be refused.
	err = testCluster.WaitFor(ctx, 90*time.Second, "the simulator to serve every replica", func(context.Context) (bool, error) {
		return !slices.ContainsFunc(pods, func(p corev1.Pod) bool { return !sim.Serving(&p) }), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for range 30 {
		if res := r.post(ctx, "/v1/completions", completion("steady")); res.status != http.StatusOK {
			t.Fatalf("after the outage: %d %s", res.status, res.body)
		}
	}
	for _, p := range pods {
		if seen.count(p.Name) == 0 {
			t.Errorf("pod %s got no traffic after the API server came back", p.Name)
		}
	}
}

// A terminating router fails /readyz at once, finishes the streams it is
// serving, and exits cleanly.
func TestGracefulShutdownDrainsStreams(t *testing.T) {
	ctx := testContext(t, 2*time.Minute)
	ns := namespace(t, ctx, "drain")
	simulate(t, ctx, ns, nil)
	deploy(t, ctx, cluster.ModelServer{Namespace: ns, Name: "drain", Model: "drain", Replicas: 1,
		Annotations: map[string]string{"sim.capstan.dev/tpot": "200ms", "sim.capstan.dev/output-tokens": "10"}})
	r := startRouter(t, ctx, "router-drain", "--namespaces="+ns, "--shutdown-delay=1s", "--shutdown-timeout=20s")
	r.waitReady(t, ctx, "drain", 1)

	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, r.url+"/v1/completions", strings.NewReader(`{"model":"drain","prompt":"x","stream":true}`))
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	if !sc.Scan() {
		t.Fatal("no first chunk")
	}
	stopped := make(chan struct{})
	go func() { r.proc.Stop(30 * time.Second); close(stopped) }()
	err = testCluster.WaitFor(ctx, 5*time.Second, "/readyz to fail", func(ctx context.Context) (bool, error) {
		resp, err := http.Get(r.admin + "/readyz")
		if err != nil {
			return false, err
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusServiceUnavailable, nil
	})
	if err != nil {
		t.Error(err)
	}
	gotDone := false
	for sc.Scan() {
		if sc.Text() == "data: [DONE]" {
			gotDone = true
		}
	}
	if !gotDone {
		t.Errorf("the stream in flight at shutdown was cut off: %v", sc.Err())
	}
	<-stopped
	if exited, err := r.proc.Exited(); !exited || err == nil || err.Error() != "exited with status 0" {
		t.Errorf("router exit: %v %v, want status 0", exited, err)
	}
}

// The manifests are valid for the API server and grant exactly what the
// router needs.
func TestManifests(t *testing.T) {
	ctx := testContext(t, time.Minute)
	setup(t)
	c := testCluster
	d, err := c.Client.AppsV1().Deployments(systemNamespace).Get(ctx, "capstan-router", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	spec := d.Spec.Template.Spec
	container := spec.Containers[0]
	switch {
	case *d.Spec.Replicas != 2:
		t.Errorf("replicas %d, want 2", *d.Spec.Replicas)
	case spec.SecurityContext.RunAsNonRoot == nil || !*spec.SecurityContext.RunAsNonRoot:
		t.Error("the pod may run as root")
	case container.SecurityContext.ReadOnlyRootFilesystem == nil || !*container.SecurityContext.ReadOnlyRootFilesystem:
		t.Error("the root filesystem is writable")
	case container.ReadinessProbe == nil || container.ReadinessProbe.HTTPGet.Path != "/readyz":
		t.Error("no /readyz readiness probe")
	case container.LivenessProbe == nil || container.LivenessProbe.HTTPGet.Path != "/livez":
		t.Error("no /livez liveness probe")
	case container.Resources.Requests.Cpu().IsZero() || container.Resources.Requests.Memory().IsZero():
		t.Error("no resource requests")
	case container.Image != "ghcr.io/capstan-dev/capstan-router:v0.1.0":
		t.Errorf("image %s", container.Image)
	}
	if _, err := c.Client.PolicyV1().PodDisruptionBudgets(systemNamespace).Get(ctx, "capstan-router", metav1.GetOptions{}); err != nil {
		t.Errorf("PodDisruptionBudget: %v", err)
	}
	if _, err := c.Client.CoreV1().Services(systemNamespace).Get(ctx, "capstan-router", metav1.GetOptions{}); err != nil {
		t.Errorf("Service: %v", err)
	}
	// Least privilege: ask the API server what the ServiceAccount may do.
	user := "system:serviceaccount:" + systemNamespace + ":" + serviceAccount
	for _, check := range []struct {
		group, resource, verb string
		allowed               bool
	}{
		{"", "services", "watch", true},
		{"discovery.k8s.io", "endpointslices", "list", true},
		{"", "pods", "list", true},
		{"apps", "deployments", "watch", true},
		{"apps", "statefulsets", "watch", true},
		{"autoscaling", "horizontalpodautoscalers", "watch", true},
		{"apps", "deployments", "update", false},
		{"autoscaling", "horizontalpodautoscalers", "update", false},
		{"", "services", "update", false},
		{"", "secrets", "get", false},
		{"discovery.k8s.io", "endpointslices", "delete", false},
		{"", "events", "create", true},
		{"", "events", "delete", false},
	} {
		if got := can(t, ctx, user, check.group, check.resource, check.verb); got != check.allowed {
			t.Errorf("%s %s.%s: allowed=%v, want %v", check.verb, check.resource, check.group, got, check.allowed)
		}
	}
}

// can asks the API server whether user may do verb on resource, cluster-wide.
func can(t *testing.T, ctx context.Context, user, group, resource, verb string) bool {
	t.Helper()
	review, err := testCluster.Client.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authorizationv1.SubjectAccessReview{
		Spec: authorizationv1.SubjectAccessReviewSpec{User: user, Groups: []string{"system:serviceaccounts"},
			ResourceAttributes: &authorizationv1.ResourceAttributes{Group: group, Resource: resource, Verb: verb}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return review.Status.Allowed
}

// The load-aware balancer reads the engines' own queues through the metrics
// adapter's scraper: a pod swamped by clients that bypass the router (so the
// router's in-flight counts cannot see it) gets no new requests.
func TestLoadAwareAvoidsABusyEngine(t *testing.T) {
	ctx := testContext(t, 2*time.Minute)
	ns := namespace(t, ctx, "loadaware")
	var seen arrivals
	simulate(t, ctx, ns, seen.add)
	pods := deploy(t, ctx, cluster.ModelServer{Namespace: ns, Name: "la", Model: "la", Replicas: 2,
		Annotations: map[string]string{"sim.capstan.dev/max-running": "1", "sim.capstan.dev/ttft": "20ms"}})
	r := startRouter(t, ctx, "router-loadaware", "--namespaces="+ns, "--balancer=load-aware", "--scrape-interval=200ms", "--scrape-timeout=150ms")
	r.waitReady(t, ctx, "la", 2)

	// Swamp pod 0 directly: one runs, the rest queue in its engine.
	busy, idle := pods[0], pods[1]
	swampCtx, stopSwamp := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for swampCtx.Err() == nil {
				req, _ := http.NewRequestWithContext(swampCtx, http.MethodPost, "http://"+busy.Status.PodIP+":8000/v1/completions",
					strings.NewReader(completion("la")))
				if resp, err := client.Do(req); err == nil {
					resp.Body.Close()
				}
			}
		}()
	}
	defer func() { stopSwamp(); wg.Wait() }()
	// Wait until the router's scraper has seen the queue (five requests in
	// a row to the idle pod): then a request goes there every time.
	inARow := 0
	err := testCluster.WaitFor(ctx, 15*time.Second, "the router to prefer the idle pod", func(ctx context.Context) (bool, error) {
		res := r.post(ctx, "/v1/completions", completion("la"))
		if res.pod == ns+"/"+idle.Name {
			inARow++
		} else {
			inARow = 0
		}
		return inARow == 5, res.err
	})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		res := r.post(ctx, "/v1/completions", completion("la"))
		if res.status != http.StatusOK || res.pod != ns+"/"+idle.Name {
			t.Fatalf("request %d went to %q (%d); want the idle pod %s", i, res.pod, res.status, idle.Name)
		}
	}
	if scraped := r.metric(t, "capstan_router_endpoints", map[string]string{"model": "la", "state": "ready"}); scraped != 2 {
		t.Errorf("ready endpoints %v, want 2", scraped)
	}
}
