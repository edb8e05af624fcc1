package fleet

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"
	"k8s.io/klog/v2/ktesting"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

func testPod(engine modelserver.Engine, annotations map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "llama-0", Namespace: "ml", UID: "uid-1",
			Labels:      map[string]string{modelserver.ModelLabel: "llama", modelserver.EngineLabel: string(engine)},
			Annotations: annotations},
		Status: corev1.PodStatus{PodIP: "198.18.0.10"},
	}
}

func testServer(t *testing.T, pod *corev1.Pod, opts Options) (*podServer, *httptest.Server) {
	t.Helper()
	logger, _ := ktesting.NewTestContext(t)
	s := newPodServer(pod, opts.withDefaults(), new(atomic.Int64), logger)
	ts := httptest.NewServer(s.srv.Handler)
	t.Cleanup(ts.Close)
	return s, ts
}

func scrape(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("metrics page does not parse: %v", err)
	}
	return families
}

func gauge(t *testing.T, families map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	t.Helper()
	f, ok := families[name]
	if !ok {
		t.Fatalf("metric %s missing", name)
	}
	for _, m := range f.GetMetric() {
		if hasLabels(m, labels) {
			return m.GetGauge().GetValue()
		}
	}
	t.Fatalf("metric %s has no series with labels %v", name, labels)
	return 0
}

func hasLabels(m *dto.Metric, want map[string]string) bool {
	for k, v := range want {
		found := false
		for _, l := range m.GetLabel() {
			if l.GetName() == k && l.GetValue() == v {
				found = true
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// Each engine's page carries its real names for running, waiting and KV-cache
// gauges, and the waiting gauge follows requests queued beyond the batch.
func TestMetricsFollowLoad(t *testing.T) {
	cases := map[modelserver.Engine]struct {
		running, waiting string
		labels           map[string]string
		waitingLabels    map[string]string
		kv               string
	}{
		modelserver.VLLM:   {running: "vllm:num_requests_running", waiting: "vllm:num_requests_waiting", labels: map[string]string{"model_name": "llama"}, kv: "vllm:kv_cache_usage_perc"},
		modelserver.SGLang: {running: "sglang:num_running_reqs", waiting: "sglang:num_queue_reqs", labels: map[string]string{"model_name": "llama"}, kv: "sglang:token_usage"},
		modelserver.TGI:    {running: "tgi_batch_current_size", waiting: "tgi_queue_size"},
		modelserver.Triton: {running: "nv_trt_llm_request_metrics", waiting: "nv_trt_llm_request_metrics",
			labels: map[string]string{"request_type": "scheduled", "model": "llama"}, waitingLabels: map[string]string{"request_type": "waiting"}},
	}
	for engine, tc := range cases {
		t.Run(string(engine), func(t *testing.T) {
			pod := testPod(engine, map[string]string{MaxRunningAnnotation: "2", TTFTAnnotation: "10s"})
			s, ts := testServer(t, pod, Options{})
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var wg sync.WaitGroup
			for range 5 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					req, _ := http.NewRequestWithContext(ctx, http.MethodPost, ts.URL+"/v1/completions",
						strings.NewReader(`{"model":"llama","prompt":"hello there"}`))
					if resp, err := http.DefaultClient.Do(req); err == nil {
						resp.Body.Close()
					}
				}()
			}
			deadline := time.Now().Add(5 * time.Second)
			for s.engine.Waiting() != 3 && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
			families := scrape(t, ts.URL)
			if got := gauge(t, families, tc.running, tc.labels); got != 2 {
				t.Errorf("%s = %v, want 2", tc.running, got)
			}
			wl := tc.waitingLabels
			if wl == nil {
				wl = tc.labels
			}
			if got := gauge(t, families, tc.waiting, wl); got != 3 {
				t.Errorf("%s = %v, want 3", tc.waiting, got)
			}
			if tc.kv != "" {
				if got := gauge(t, families, tc.kv, tc.labels); got != 1 {
					t.Errorf("%s = %v, want 1 (full batch)", tc.kv, got)
				}
			}
			cancel()
			wg.Wait()
		})
	}
}

// Completed requests move the token counters and latency histograms.
func TestCountersAndHistograms(t *testing.T) {
	_, ts := testServer(t, testPod(modelserver.VLLM, map[string]string{OutputTokensAnnotation: "4"}), Options{})
	for range 3 {
		resp, err := http.Post(ts.URL+"/v1/completions", "application/json",
			strings.NewReader(`{"model":"llama","prompt":"one two three"}`))
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d", resp.StatusCode)
		}
	}
	families := scrape(t, ts.URL)
	counter := func(name string) float64 { return families[name].GetMetric()[0].GetCounter().GetValue() }
	if got := counter("vllm:prompt_tokens_total"); got != 9 {
		t.Errorf("prompt tokens = %v, want 9", got)
	}
	if got := counter("vllm:generation_tokens_total"); got != 12 {
		t.Errorf("generation tokens = %v, want 12", got)
	}
	h := families["vllm:time_to_first_token_seconds"].GetMetric()[0].GetHistogram()
	if h.GetSampleCount() != 3 || h.GetSampleSum() < 0.03 {
		t.Errorf("TTFT histogram count=%d sum=%v, want 3 samples of at least 10ms", h.GetSampleCount(), h.GetSampleSum())
	}
}

func TestLegacyVLLMNames(t *testing.T) {
	_, ts := testServer(t, testPod(modelserver.VLLM, map[string]string{EngineVersionAnnotation: "legacy"}), Options{})
	families := scrape(t, ts.URL)
	if _, ok := families["vllm:gpu_cache_usage_perc"]; !ok {
		t.Error("legacy vLLM page lacks vllm:gpu_cache_usage_perc")
	}
	if _, ok := families["vllm:kv_cache_usage_perc"]; ok {
		t.Error("legacy vLLM page has the new name vllm:kv_cache_usage_perc")
	}
}

// The OpenMetrics format is served when asked for, as engines using the
// Python or Go clients do.
func TestOpenMetricsNegotiation(t *testing.T) {
	_, ts := testServer(t, testPod(modelserver.SGLang, nil), Options{})
	req, _ := http.NewRequest(http.MethodGet, ts.URL+"/metrics", nil)
	req.Header.Set("Accept", "application/openmetrics-text;version=1.0.0")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/openmetrics-text") || !strings.HasSuffix(string(body), "# EOF\n") {
		t.Errorf("not OpenMetrics: %s, ends %q", resp.Header.Get("Content-Type"), body[max(0, len(body)-20):])
	}
}

// A streamed chat completion arrives chunk by chunk and ends with [DONE].
func TestStreamingChat(t *testing.T) {
	_, ts := testServer(t, testPod(modelserver.VLLM, map[string]string{OutputTokensAnnotation: "5", TPOTAnnotation: "20ms"}), Options{})
	resp, err := http.Post(ts.URL+"/v1/chat/completions", "application/json",
		strings.NewReader(`{"model":"llama","stream":true,"messages":[{"role":"user","content":"hi"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("Content-Type %q", ct)
	}
	sc := bufio.NewScanner(resp.Body)
	var events []string
	var firstAt time.Time
	start := time.Now()
	for sc.Scan() {
		if line := sc.Text(); strings.HasPrefix(line, "data: ") {
			if firstAt.IsZero() {
				firstAt = time.Now()
			}
			events = append(events, strings.TrimPrefix(line, "data: "))
		}
	}
	total := time.Since(start)
	if len(events) != 7 || events[len(events)-1] != "[DONE]" {
		t.Fatalf("got %d events ending %q, want 5 tokens + finish + [DONE]", len(events), events[len(events)-1])
	}
	if firstAt.Sub(start) > total/2 {
		t.Errorf("first chunk came at %s of %s: the stream was buffered", firstAt.Sub(start), total)
	}
}

func TestFaults(t *testing.T) {
	pod := testPod(modelserver.VLLM, map[string]string{FaultAnnotation: "http-500,garbage-metrics"})
	_, ts := testServer(t, pod, Options{})
	resp, err := http.Post(ts.URL+"/v1/completions", "application/json", strings.NewReader(`{"model":"llama","prompt":"x"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusInternalServerError {
		t.Errorf("http-500 fault: status %d", resp.StatusCode)
	}
	resp, err = http.Get(ts.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	if _, err := parser.TextToMetricFamilies(resp.Body); err == nil {
		t.Error("garbage-metrics fault served a page that parses")
	}
}

func TestUnknownModel(t *testing.T) {
	_, ts := testServer(t, testPod(modelserver.VLLM, nil), Options{})
	resp, err := http.Post(ts.URL+"/v1/completions", "application/json", strings.NewReader(`{"model":"other","prompt":"x"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("status %d, want 404", resp.StatusCode)
	}
}

// An echo pod listens where each of its echo-basic containers would: on
// HTTP_PORT and H2C_PORT (the latter h2c), 3000 and 3001 by default.
func TestEchoPorts(t *testing.T) {
	const image = "gcr.io/k8s-staging-gateway-api/echo-basic:v20251106-v1.3.0-263-g47c3435c"
	env := func(httpPort, h2cPort string) []corev1.EnvVar {
		return []corev1.EnvVar{{Name: "HTTP_PORT", Value: httpPort}, {Name: "H2C_PORT", Value: h2cPort}}
	}
	pod := testPod(modelserver.VLLM, nil)
	pod.Labels = nil
	pod.Spec.Containers = []corev1.Container{
		{Name: "a", Image: image, Env: env("3000", "3001")},
		{Name: "b", Image: image, Env: env("3002", "3003")},
		{Name: "c", Image: image, Env: []corev1.EnvVar{{Name: "HTTP_PORT", Value: "3004"}}},
	}
	want := map[int32]bool{3000: false, 3001: true, 3002: false, 3003: true, 3004: false}
	if diff := cmp.Diff(want, echoPorts(pod)); diff != "" {
		t.Errorf("echo ports (-want +got):\n%s", diff)
	}

	// HTTP/1.1 is echoed on an HTTP port and refused on an h2c port, as
	// echo-basic does.
	s, _ := testServer(t, pod, Options{})
	for port, status := range map[int]int{3002: http.StatusOK, 3003: http.StatusBadRequest} {
		req := httptest.NewRequest(http.MethodGet, "/", nil)
		req = req.WithContext(context.WithValue(req.Context(), http.LocalAddrContextKey, &net.TCPAddr{IP: net.ParseIP(pod.Status.PodIP), Port: port}))
		rec := httptest.NewRecorder()
		s.srv.Handler.ServeHTTP(rec, req)
		if rec.Code != status {
			t.Errorf("HTTP/1.1 on port %d: %d, want %d", port, rec.Code, status)
		}
	}
}

// An echo backend answers the way the conformance suite's echo-basic does.
func TestEchoBackend(t *testing.T) {
	pod := testPod(modelserver.VLLM, nil)
	pod.Labels = nil
	pod.Spec.Containers = []corev1.Container{{Name: "echo", Image: "registry.k8s.io/gateway-api/echo-basic:v1.5.1"}}
	s, ts := testServer(t, pod, Options{})
	if want := []int32{3000, 3001}; !slices.Equal(s.ports, want) {
		t.Errorf("echo ports %v, want %v", s.ports, want)
	}
	req, _ := http.NewRequest(http.MethodGet, ts.URL+"/some//path?x=1", nil)
	req.Host = "example.com"
	req.Header.Set("X-Custom", "v")
	req.Header.Set("X-Echo-Set-Header", "X-Foo: bar, X-Baz: qux")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var got echoed
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
		t.Fatal(err)
	}
	if got.Path != "/some//path?x=1" || got.Host != "example.com" || got.Method != "GET" ||
		got.Namespace != "ml" || got.Pod != "llama-0" || got.Headers["X-Custom"][0] != "v" {
		t.Errorf("echo = %+v", got)
	}
	if resp.Header.Get("X-Foo") != "bar" || resp.Header.Get("X-Baz") != "qux" {
		t.Errorf("X-Echo-Set-Header not honoured: %v", resp.Header)
	}
	resp, err = http.Get(ts.URL + "/status/418")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusTeapot {
		t.Errorf("/status/418 answered %d", resp.StatusCode)
	}
}

// loopbackPod is a model pod whose IP is 127.0.0.1 and whose port is a free
// one, so that a test can serve it as the fleet serves a pod IP.
func loopbackPod(t *testing.T, annotations map[string]string) (*corev1.Pod, string) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	pod := testPod(modelserver.VLLM, annotations)
	pod.Status.PodIP = "127.0.0.1"
	pod.Spec.Containers = []corev1.Container{{Name: "engine", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: int32(port)}}}}
	return pod, net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
}

// listening starts a pod server on its own loopback port, as the fleet does
// on a pod IP.
func listening(t *testing.T, annotations map[string]string) (*podServer, *corev1.Pod, string) {
	t.Helper()
	pod, addr := loopbackPod(t, annotations)
	logger, _ := ktesting.NewTestContext(t)
	s := newPodServer(pod, Options{}.withDefaults(), new(atomic.Int64), logger)
	s.update(pod)
	t.Cleanup(s.kill)
	return s, pod, addr
}

func withFault(pod *corev1.Pod, fault Fault) *corev1.Pod {
	p := pod.DeepCopy()
	if p.Annotations == nil {
		p.Annotations = map[string]string{}
	}
	if fault == "" {
		delete(p.Annotations, FaultAnnotation)
	} else {
		p.Annotations[FaultAnnotation] = string(fault)
	}
	return p
}

// dialOutcome says what connecting to addr does: "ok", "refused" or
// "timeout".
func dialOutcome(t *testing.T, addr string) string {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 300*time.Millisecond)
	switch {
	case err == nil:
		c.Close()
		return "ok"
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET):
		// A reset is a connection caught in the backlog as the listener closed.
		return "refused"
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "timeout"
	}
	t.Fatalf("dialling %s: %v", addr, err)
	return ""
}

func waitDial(t *testing.T, addr, want string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := dialOutcome(t, addr)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("connecting to %s: %s, want %s", addr, got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func complete(c *http.Client, addr string) (int, error) {
	resp, err := c.Post("http://"+addr+"/v1/completions", "application/json", strings.NewReader(`{"model":"llama","prompt":"x"}`))
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	_, err = io.ReadAll(resp.Body)
	return resp.StatusCode, err
}

// The refuse and black-hole faults change what connecting to the pod does
// at once, and removing them serves the pod again.
func TestRefuseAndBlackHole(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the black-hole fault is simulated on Linux only")
	}
	s, pod, addr := listening(t, nil)
	waitDial(t, addr, "ok")
	keptAlive := &http.Client{Transport: &http.Transport{Proxy: nil}, Timeout: 500 * time.Millisecond}
	defer keptAlive.CloseIdleConnections()
	if code, err := complete(keptAlive, addr); err != nil || code != http.StatusOK {
		t.Fatalf("before any fault: %d %v", code, err)
	}
	served := s.served.Load()

	s.update(withFault(pod, FaultBlackHole))
	for range 3 { // every SYN is dropped, not only the first
		if got := dialOutcome(t, addr); got != "timeout" {
			t.Fatalf("connecting to a black-holed pod: %s, want timeout", got)
		}
	}
	// The kept-alive connection from before gets no answer either.
	if code, err := complete(keptAlive, addr); err == nil {
		t.Errorf("a request on a connection opened before the black hole was answered %d", code)
	}
	if got := s.served.Load(); got != served {
		t.Errorf("the black-holed pod counted %d requests", got-served)
	}

	s.update(withFault(pod, FaultRefuse))
	waitDial(t, addr, "refused")
	s.update(withFault(pod, FaultBlackHole))
	waitDial(t, addr, "timeout")
	s.update(withFault(pod, ""))
	waitDial(t, addr, "ok")
	fresh := &http.Client{Transport: &http.Transport{Proxy: nil}, Timeout: 5 * time.Second}
	defer fresh.CloseIdleConnections()
	if code, err := complete(fresh, addr); err != nil || code != http.StatusOK {
		t.Errorf("after the black hole: %d %v", code, err)
	}
}

// Fleet.Kill cuts a stream off mid-way, without [DONE] or the chunked
// terminator, and the pod refuses connections from then on, whatever its
// annotations say later.
func TestKillCutsStreams(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	f := New(nil, Options{})
	f.logger = klog.FromContext(ctx)
	pod, addr := loopbackPod(t, map[string]string{OutputTokensAnnotation: "100", TPOTAnnotation: "20ms"})
	f.sync(pod)
	t.Cleanup(f.stopAll)
	if !f.Serving(pod) {
		t.Fatal("the fleet does not serve the pod")
	}
	waitDial(t, addr, "ok")
	resp, err := http.Post("http://"+addr+"/v1/completions", "application/json", strings.NewReader(`{"model":"llama","prompt":"x","stream":true}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	if _, err := br.ReadString('\n'); err != nil {
		t.Fatalf("no first chunk: %v", err)
	}
	if !f.Kill(types.NamespacedName{Namespace: pod.Namespace, Name: pod.Name}) {
		t.Fatal("Kill found no server for the pod")
	}
	rest, err := io.ReadAll(br)
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("reading the rest of the killed stream: %v, want an unexpected EOF", err)
	}
	if strings.Contains(string(rest), "[DONE]") {
		t.Error("the killed stream ended with [DONE]")
	}
	if f.Serving(pod) {
		t.Error("the fleet still says it serves the killed pod")
	}
	waitDial(t, addr, "refused")
	f.sync(withFault(pod, "")) // an update of the pod does not bring it back
	if got := dialOutcome(t, addr); got != "refused" {
		t.Errorf("connecting to the killed pod after an update: %s", got)
	}
	if f.Kill(types.NamespacedName{Namespace: pod.Namespace, Name: pod.Name}) {
		t.Error("a second Kill found a server")
	}
}

// A deleted pod with a preStop sleep keeps serving, kept-alive connections
// included, until the sleep ends and only then drains, as the kubelet runs
// it; without one it drains at once; the pod object's removal ends the sleep
// early.
func TestPreStopSleepDelaysDrain(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	f := New(nil, Options{})
	f.logger = klog.FromContext(ctx)
	t.Cleanup(f.stopAll)
	deleting := func(pod *corev1.Pod, sleep int64) *corev1.Pod {
		p := pod.DeepCopy()
		p.DeletionTimestamp = &metav1.Time{Time: time.Now()}
		if sleep > 0 {
			p.Spec.Containers[0].Lifecycle = &corev1.Lifecycle{PreStop: &corev1.LifecycleHandler{Sleep: &corev1.SleepAction{Seconds: sleep}}}
		}
		return p
	}

	pod, addr := loopbackPod(t, nil)
	f.sync(pod)
	waitDial(t, addr, "ok")
	keptAlive := &http.Client{Transport: &http.Transport{Proxy: nil}, Timeout: 5 * time.Second}
	defer keptAlive.CloseIdleConnections()
	if code, err := complete(keptAlive, addr); err != nil || code != http.StatusOK {
		t.Fatalf("before the deletion: %d %v", code, err)
	}
	deleted := time.Now()
	f.sync(deleting(pod, 1))
	f.sync(deleting(pod, 1)) // a later update does not start the sleep again
	if !f.Serving(pod) {
		t.Fatal("a pod in its preStop sleep is no longer served")
	}
	if code, err := complete(keptAlive, addr); err != nil || code != http.StatusOK {
		t.Errorf("on a kept-alive connection during the preStop sleep: %d %v", code, err)
	}
	waitDial(t, addr, "refused")
	if d := time.Since(deleted); d < time.Second {
		t.Errorf("the pod drained %s after its deletion, before its 1s preStop sleep ended", d)
	}

	pod, addr = loopbackPod(t, nil)
	pod.UID = "uid-2"
	f.sync(pod)
	waitDial(t, addr, "ok")
	f.sync(deleting(pod, 0))
	if f.Serving(pod) {
		t.Error("a deleted pod without a preStop sleep is still served")
	}
	waitDial(t, addr, "refused")

	pod, addr = loopbackPod(t, nil)
	pod.UID = "uid-3"
	f.sync(pod)
	waitDial(t, addr, "ok")
	f.sync(deleting(pod, 60))
	f.remove(pod.UID) // the pod object is gone: the kubelet killed it
	if f.Serving(pod) {
		t.Error("a removed pod in its preStop sleep is still served")
	}
	waitDial(t, addr, "refused")
}
