package adapter

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2/ktesting"
	cmv1beta2 "k8s.io/metrics/pkg/apis/custom_metrics/v1beta2"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/fleet"
)

// The adapter benchmark (hack/bench-adapter.sh, make bench-adapter): a fleet
// of simulated vLLM pods scraped every second, measured from outside the
// adapter: CPU and peak RSS from /proc, sample freshness and API latency of
// 1,000-pod selector queries, and the time from a pod's metric changing to
// the API showing it. With CAPSTAN_PROMETHEUS and CAPSTAN_PROMETHEUS_ADAPTER
// set it measures Prometheus + prometheus-adapter at their default settings
// on the same pods, side by side. It runs only when CAPSTAN_BENCH_ADAPTER is
// set.
//
// Knobs (environment): CAPSTAN_BENCH_PODS (default 2000), CAPSTAN_BENCH_STEADY
// (the CPU measurement span, default 30s), CAPSTAN_BENCH_OUT (write the
// results table there as Markdown).

const benchProbes = 20 // pods whose metric is changed to time its visibility

// The rows of the results table.
const (
	rowCPU     = "CPU (cores)"
	rowRSS     = "peak RSS"
	rowScrapes = "scrapes per second"
	rowViaAPI  = "API latency, 1,000-pod selector, via kube-apiserver (p50 / p99)"
	rowDirect  = "API latency, 1,000-pod selector, adapter queried directly (p50 / p99)"
	rowAge     = "sample age at query time (p50 / p99)"
	rowAgeAPI  = "age of the API's value timestamps at query time (whole seconds; p50 / p99)"
	rowChange  = "metric change to visible in the API (p50 / p99 / max)"
)

var rows = []string{rowCPU, rowRSS, rowScrapes, rowViaAPI, rowDirect, rowAge, rowAgeAPI, rowChange}

type benchResult struct {
	capstan, peer map[string]string
	notes         []string
}

func (r *benchResult) table() string {
	var b strings.Builder
	b.WriteString("| measure | capstan-metrics-adapter | Prometheus + prometheus-adapter |\n|---|---|---|\n")
	for _, row := range rows {
		peer := r.peer[row]
		if peer == "" {
			peer = "-"
		}
		fmt.Fprintf(&b, "| %s | %s | %s |\n", row, r.capstan[row], peer)
	}
	for _, n := range r.notes {
		b.WriteString("\n" + n + "\n")
	}
	return b.String()
}

func envInt(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n > 0 {
		return n
	}
	return def
}

func envDuration(name string, def time.Duration) time.Duration {
	if d, err := time.ParseDuration(os.Getenv(name)); err == nil && d > 0 {
		return d
	}
	return def
}

func TestBenchmarkAdapter(t *testing.T) {
	if os.Getenv("CAPSTAN_BENCH_ADAPTER") == "" {
		t.Skip("the adapter benchmark runs through hack/bench-adapter.sh (CAPSTAN_BENCH_ADAPTER=1)")
	}
	nPods := envInt("CAPSTAN_BENCH_PODS", 2000)
	steady := envDuration("CAPSTAN_BENCH_STEADY", 30*time.Second)
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	c := testCluster
	a := startAdapterWith(t) // with its default flags
	pid, err := cluster.PidOf(mustBinary(t, adapterName))
	if err != nil {
		t.Fatal(err)
	}
	logRSS(t, pid, "start-up")
	idleRSS, err := currentRSS(pid)
	if err != nil {
		t.Fatal(err)
	}
	res := &benchResult{capstan: map[string]string{}, peer: map[string]string{}}
	res.notes = append(res.notes, fmt.Sprintf("%d simulated vLLM pods; the adapter at its defaults (scrape interval %s, window 30s, so histograms read every 5s); %d CPUs; %s.",
		nPods, scrapeInterval, runtime.NumCPU(), time.Now().UTC().Format("2006-01-02 15:04 MST")))

	// Nodes with room for the fleet, and the pods bound to them directly:
	// scheduling 2,000 pods is not what is measured.
	var nodes []cluster.Node
	for i := range (nPods + 499) / 500 {
		nodes = append(nodes, cluster.Node{Name: fmt.Sprintf("bench-%d", i),
			Allocatable: corev1.ResourceList{corev1.ResourcePods: resource.MustParse("600")}})
	}
	if err := c.CreateNodes(ctx, nodes...); err != nil {
		t.Fatal(err)
	}
	ns, err := c.CreateNamespace(ctx, "bench")
	if err != nil {
		t.Fatal(err)
	}
	arrivals := &arrivalLog{at: map[types.NamespacedName]time.Time{}}
	sim := fleet.New(c.Client, fleet.Options{Namespace: ns, OnRequest: arrivals.record})
	simCtx, stopSim := context.WithCancel(ctx)
	if err := sim.Start(simCtx); err != nil {
		t.Fatal(err)
	}
	defer func() { stopSim(); sim.Wait() }()

	start := time.Now()
	createPods(ctx, t, ns, nPods, nodes)
	var pods []corev1.Pod
	err = c.WaitFor(ctx, 10*time.Minute, fmt.Sprintf("%d Ready pods", nPods), func(ctx context.Context) (bool, error) {
		all, err := c.Pods(ctx, ns, "app=bench")
		if err != nil {
			return false, err
		}
		pods = pods[:0]
		for _, p := range all {
			if modelserver.IsReady(&p) && p.Status.PodIP != "" {
				pods = append(pods, p)
			}
		}
		return len(pods) == nPods, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d pods Ready in %s", nPods, time.Since(start).Round(time.Second))
	half := "/apis/custom.metrics.k8s.io/v1beta2/namespaces/" + ns + "/pods/*/requests_running?labelSelector=group%3Da"
	err = c.WaitFor(ctx, 5*time.Minute, "the adapter to serve every pod", func(ctx context.Context) (bool, error) {
		got, _, err := metricValues(ctx, half)
		return len(got) == nPods/2, client404(err)
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("every pod served by the adapter %s after creation began", time.Since(start).Round(time.Second))
	logRSS(t, pid, "every pod served")

	// Steady state: scraping only.
	scrapesBefore, failuresBefore := scrapeCounts(ctx, t, a)
	cpu0, wall0 := cpuSeconds(t, pid), time.Now()
	if dir := os.Getenv("CAPSTAN_BENCH_PROFILE_DIR"); dir != "" {
		// A CPU profile of the steady state, for whoever wants to see
		// where the time goes; it spans the measurement.
		long := &running{url: a.url, client: &http.Client{Transport: a.client.Transport}}
		raw, err := long.get(ctx, fmt.Sprintf("/debug/pprof/profile?seconds=%d", int(steady.Seconds())))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "adapter-cpu.pprof"), raw, 0o644); err != nil {
			t.Fatal(err)
		}
	} else {
		time.Sleep(steady) // the measurement span
	}
	cores := (cpuSeconds(t, pid) - cpu0) / time.Since(wall0).Seconds()
	scrapesAfter, failuresAfter := scrapeCounts(ctx, t, a)
	rate := (scrapesAfter - scrapesBefore) / time.Since(wall0).Seconds()
	t.Logf("steady state: %.3f cores, %.0f scrapes/s, %.0f failed scrapes", cores, rate, failuresAfter-failuresBefore)
	logRSS(t, pid, "steady state")
	res.capstan[rowCPU] = fmt.Sprintf("%.3f (scraping, over %s)", cores, steady)
	res.capstan[rowScrapes] = fmt.Sprintf("%.0f (%d pods every %s; %.0f failed)", rate, nPods, scrapeInterval, failuresAfter-failuresBefore)

	// 1,000-pod selector queries: latency through kube-apiserver (what the
	// HPA sees) and straight to the adapter, and the age of every value.
	var viaAPI, direct, ages, trueAges []float64
	for i := range 100 {
		if i%10 == 0 {
			// The adapter's own record of each sample's age, to the
			// nanosecond: the API's timestamps are whole seconds.
			trueAges = append(trueAges, sampleAges(ctx, t, a, ns)...)
		}
		t0 := time.Now()
		raw, err := getRaw(ctx, half)
		took := time.Since(t0)
		if err != nil {
			t.Fatal(err)
		}
		viaAPI = append(viaAPI, took.Seconds()*1000)
		ages = append(ages, valueAges(t, raw, time.Now())...)
	}
	for range 100 {
		t0 := time.Now()
		if _, err := a.get(ctx, half); err != nil {
			t.Fatal(err)
		}
		direct = append(direct, time.Since(t0).Seconds()*1000)
	}
	logRSS(t, pid, "selector queries")
	res.capstan[rowViaAPI] = fmt.Sprintf("%.1f / %.1f ms", quantile(viaAPI, 0.5), quantile(viaAPI, 0.99))
	res.capstan[rowDirect] = fmt.Sprintf("%.1f / %.1f ms", quantile(direct, 0.5), quantile(direct, 0.99))
	res.capstan[rowAge] = fmt.Sprintf("%.2f / %.2f s", quantile(trueAges, 0.5), quantile(trueAges, 0.99))
	res.capstan[rowAgeAPI] = fmt.Sprintf("%.2f / %.2f s", quantile(ages, 0.5), quantile(ages, 0.99))

	// Change to visible: probe pods go from 0 to 1 running request and
	// back; the time from the engine's change to the API showing it.
	probes := slices.Clone(pods[len(pods)-benchProbes:])
	for _, p := range probes {
		if _, err := c.Client.CoreV1().Pods(ns).Patch(ctx, p.Name, types.MergePatchType,
			[]byte(`{"metadata":{"labels":{"probe":"yes"}}}`), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	probePath := "/apis/custom.metrics.k8s.io/v1beta2/namespaces/" + ns + "/pods/*/requests_running?labelSelector=probe%3Dyes"
	capstanGet := func(ctx context.Context) (map[string]string, error) {
		got, _, err := metricValues(ctx, probePath)
		return got, err
	}
	var visible []float64
	for range 3 {
		visible = append(visible, changeToVisible(ctx, t, probes, arrivals, capstanGet, 20*time.Millisecond, time.Minute)...)
	}
	res.capstan[rowChange] = fmt.Sprintf("%.2f / %.2f / %.2f s", quantile(visible, 0.5), quantile(visible, 0.99), slices.Max(visible))

	// Side by side: Prometheus + prometheus-adapter at their defaults.
	if os.Getenv("CAPSTAN_PROMETHEUS") != "" && os.Getenv("CAPSTAN_PROMETHEUS_ADAPTER") != "" {
		benchPrometheus(ctx, t, res, ns, nPods, probes, arrivals)
	} else {
		res.notes = append(res.notes, "Prometheus + prometheus-adapter: not measured ("+os.Getenv("CAPSTAN_PEER_SKIPPED")+").")
	}

	memstats(ctx, t, a)
	rss, err := peakRSS(pid)
	if err != nil {
		t.Fatal(err)
	}
	if dir := os.Getenv("CAPSTAN_BENCH_PROFILE_DIR"); dir != "" {
		raw, err := a.get(ctx, "/debug/pprof/heap")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "adapter-heap.pprof"), raw, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	nowRSS, err := currentRSS(pid)
	if err != nil {
		t.Fatal(err)
	}
	res.capstan[rowRSS] = fmt.Sprintf("%.0f MiB (%.0f MiB before any pod, %.0f MiB at the end)", rss, idleRSS, nowRSS)
	out := res.table()
	t.Logf("results:\n%s", out)
	fmt.Println(out)
	if path := os.Getenv("CAPSTAN_BENCH_OUT"); path != "" {
		if err := os.WriteFile(path, []byte(out), 0o644); err != nil {
			t.Error(err)
		}
	}
}

// arrivalLog records when each pod last received an API request, from the
// simulator itself: the moment its engine's running count changes.
type arrivalLog struct {
	mu sync.Mutex
	at map[types.NamespacedName]time.Time
}

func (l *arrivalLog) record(a fleet.Arrival) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.at[a.Pod] = a.At
}

func (l *arrivalLog) get(pod types.NamespacedName) time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.at[pod]
}

func createPods(ctx context.Context, t *testing.T, ns string, n int, nodes []cluster.Node) {
	t.Helper()
	tmpl := cluster.ModelServer{Namespace: ns, Name: "bench", Model: "bench",
		Annotations: map[string]string{fleet.TTFTAnnotation: "10m"}}.Deployment().Spec.Template
	work := make(chan int)
	var wg sync.WaitGroup
	errs := make(chan error, 1)
	for range 16 {
		wg.Go(func() {
			for i := range work {
				p := &corev1.Pod{ObjectMeta: *tmpl.ObjectMeta.DeepCopy(), Spec: *tmpl.Spec.DeepCopy()}
				p.Name, p.Namespace = fmt.Sprintf("bench-%04d", i), ns
				p.Labels["group"] = map[bool]string{true: "a", false: "b"}[i < n/2]
				p.Spec.NodeName = nodes[i%len(nodes)].Name
				if _, err := testCluster.Client.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
					select {
					case errs <- err:
					default:
					}
				}
			}
		})
	}
	for i := range n {
		work <- i
	}
	close(work)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
}

// changeToVisible starts one long request on each probe pod, waits until
// get shows every pod at 1 running request, then stops them and waits until
// it shows 0. It returns each change's delay in seconds.
func changeToVisible(ctx context.Context, t *testing.T, probes []corev1.Pod, arrivals *arrivalLog,
	get func(context.Context) (map[string]string, error), every, timeout time.Duration) []float64 {
	t.Helper()
	var out []float64
	loadCtx, stop := context.WithCancel(ctx)
	defer stop()
	var wgs []*sync.WaitGroup
	for _, p := range probes {
		wgs = append(wgs, load(loadCtx, t, p.Status.PodIP, "bench", 1))
	}
	changed := func(p corev1.Pod) time.Time {
		return arrivals.get(types.NamespacedName{Namespace: p.Namespace, Name: p.Name})
	}
	out = append(out, waitAll(ctx, t, probes, "1", changed, get, every, timeout)...)
	stopped := time.Now()
	stop()
	for _, wg := range wgs {
		wg.Wait()
	}
	out = append(out, waitAll(ctx, t, probes, "0", func(corev1.Pod) time.Time { return stopped }, get, every, timeout)...)
	return out
}

func waitAll(ctx context.Context, t *testing.T, probes []corev1.Pod, want string, changedAt func(corev1.Pod) time.Time,
	get func(context.Context) (map[string]string, error), every, timeout time.Duration) []float64 {
	t.Helper()
	seen := map[string]time.Time{}
	deadline := time.Now().Add(timeout)
	for len(seen) < len(probes) && time.Now().Before(deadline) {
		got, err := get(ctx)
		now := time.Now()
		if err != nil && client404(err) != nil {
			t.Fatal(err)
		}
		for name, v := range got {
			if _, ok := seen[name]; !ok && v == want {
				seen[name] = now
			}
		}
		time.Sleep(every) // the polling period of a client watching for the change
	}
	if len(seen) < len(probes) {
		t.Fatalf("after %s only %d of %d probe pods show %s", timeout, len(seen), len(probes), want)
	}
	var out []float64
	for _, p := range probes {
		out = append(out, seen[p.Name].Sub(changedAt(p)).Seconds())
	}
	return out
}

// client404 treats NotFound (no value yet) as "not yet", not an error.
func client404(err error) error {
	if err != nil && strings.Contains(err.Error(), "could not find") {
		return nil
	}
	return err
}

func valueAges(t *testing.T, raw []byte, at time.Time) []float64 {
	t.Helper()
	list := &cmv1beta2.MetricValueList{}
	if err := json.Unmarshal(raw, list); err != nil {
		t.Fatal(err)
	}
	out := make([]float64, 0, len(list.Items))
	for _, item := range list.Items {
		out = append(out, at.Sub(item.Timestamp.Time).Seconds())
	}
	return out
}

// get GETs a path (with its query) from the adapter directly.
func (a *running) get(ctx context.Context, pathAndQuery string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.url+pathAndQuery, nil)
	if err != nil {
		return nil, err
	}
	resp, err := a.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s: %s", pathAndQuery, resp.Status, body)
	}
	return body, err
}

// sampleAges reads every pod's sample age from the adapter's /metrics.
func sampleAges(ctx context.Context, t *testing.T, a *running, ns string) []float64 {
	t.Helper()
	page, err := a.metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []float64
	prefix := `capstan_scrape_target_sample_age_seconds{namespace="` + ns + `"`
	for _, line := range strings.Split(page, "\n") {
		if !strings.HasPrefix(line, prefix) {
			continue
		}
		fields := strings.Fields(line)
		if v, err := strconv.ParseFloat(fields[len(fields)-1], 64); err == nil {
			out = append(out, v)
		}
	}
	return out
}

// memstats logs the adapter's Go memory statistics, to tell where its
// resident memory goes.
func memstats(ctx context.Context, t *testing.T, a *running) {
	t.Helper()
	page, err := a.metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, line := range strings.Split(page, "\n") {
		for _, m := range []string{"go_memstats_heap_inuse_bytes ", "go_memstats_heap_idle_bytes ", "go_memstats_heap_released_bytes ",
			"go_memstats_stack_inuse_bytes ", "go_memstats_sys_bytes ", "go_goroutines "} {
			if strings.HasPrefix(line, m) {
				fields := strings.Fields(line)
				v, _ := strconv.ParseFloat(fields[1], 64)
				if strings.HasSuffix(m, "bytes ") {
					fmt.Fprintf(&b, "%s=%.0fMiB ", strings.TrimSpace(m), v/(1<<20))
				} else {
					fmt.Fprintf(&b, "%s=%.0f ", strings.TrimSpace(m), v)
				}
			}
		}
	}
	t.Logf("adapter memory: %s", b.String())
}

func scrapeCounts(ctx context.Context, t *testing.T, a *running) (ok, failed float64) {
	t.Helper()
	page, err := a.metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(page, "\n") {
		if !strings.HasPrefix(line, "capstan_scrape_target_scrapes_total{") {
			continue
		}
		fields := strings.Fields(line)
		v, err := strconv.ParseFloat(fields[len(fields)-1], 64)
		if err != nil {
			continue
		}
		if strings.Contains(line, `result="success"`) {
			ok += v
		} else {
			failed += v
		}
	}
	return ok, failed
}

func quantile(xs []float64, q float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[min(len(s)-1, int(math.Ceil(q*float64(len(s))))-1)]
}

func mustBinary(t *testing.T, name string) string {
	t.Helper()
	p, err := cluster.Binary(name)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// cpuSeconds is the user and system CPU time a process has used. Linux
// reports it in clock ticks of 1/100 s (USER_HZ).
func cpuSeconds(t *testing.T, pid int) float64 {
	t.Helper()
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// Fields after the command name, which is in parentheses.
	fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+2:]))
	utime, _ := strconv.ParseFloat(fields[11], 64)
	stime, _ := strconv.ParseFloat(fields[12], 64)
	return (utime + stime) / 100
}

// peakRSS is the process's high-water resident set, in MiB.
func peakRSS(pid int) (float64, error) { return cluster.MemoryMiB(pid, "VmHWM") }

// logRSS logs the adapter's resident set, what of it is anonymous memory
// (the Go heap and stacks) and what mapped from the binary, and its peak so
// far, at the end of a phase, so that a report's peak can be placed.
func logRSS(t *testing.T, pid int, phase string) {
	t.Helper()
	var v [4]float64
	for i, field := range []string{"VmRSS", "RssAnon", "RssFile", "VmHWM"} {
		var err error
		if v[i], err = cluster.MemoryMiB(pid, field); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("adapter RSS after %s: %.0f MiB (%.0f anonymous, %.0f from the binary; peak so far %.0f MiB)", phase, v[0], v[1], v[2], v[3])
}

// currentRSS is the process's resident set now, in MiB.
func currentRSS(pid int) (float64, error) { return cluster.MemoryMiB(pid, "VmRSS") }

// benchPrometheus runs Prometheus and prometheus-adapter at their default
// settings over the same pods and measures the same things.
func benchPrometheus(ctx context.Context, t *testing.T, res *benchResult, ns string, nPods int, probes []corev1.Pod, arrivals *arrivalLog) {
	t.Helper()
	c := testCluster
	dir := t.TempDir()
	promPort, err := cluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	// Only the scrape job: global settings (scrape_interval 1m,
	// scrape_timeout 10s) stay at Prometheus's defaults. Targets come from a
	// file listing the Ready pods with the namespace and pod labels
	// Kubernetes service discovery would give them: Debian's Prometheus is
	// built without Kubernetes service discovery.
	var groups []map[string]any
	pods, err := c.Pods(ctx, ns, "app=bench")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pods {
		groups = append(groups, map[string]any{"targets": []string{p.Status.PodIP + ":8000"},
			"labels": map[string]string{"namespace": p.Namespace, "pod": p.Name}})
	}
	targets, err := json.Marshal(groups)
	if err != nil {
		t.Fatal(err)
	}
	targetsFile := filepath.Join(dir, "targets.json")
	if err := os.WriteFile(targetsFile, targets, 0o644); err != nil {
		t.Fatal(err)
	}
	promConfig := fmt.Sprintf("scrape_configs:\n- job_name: model-servers\n  file_sd_configs:\n  - files: [%s]\n", targetsFile)
	promFile := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(promFile, []byte(promConfig), 0o644); err != nil {
		t.Fatal(err)
	}
	promURL := "http://127.0.0.1:" + strconv.Itoa(promPort)
	promBin := os.Getenv("CAPSTAN_PROMETHEUS")
	prom, err := c.Run("prometheus", promBin, "--config.file="+promFile, "--storage.tsdb.path="+filepath.Join(dir, "tsdb"),
		"--web.listen-address=127.0.0.1:"+strconv.Itoa(promPort))
	if err != nil {
		t.Fatal(err)
	}
	defer prom.Stop(10 * time.Second)
	if err := prom.WaitHealthy(ctx, promURL+"/-/ready", time.Minute); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	err = c.WaitFor(ctx, 3*time.Minute, "Prometheus to have scraped every pod", func(ctx context.Context) (bool, error) {
		v, err := promQuery(ctx, promURL, `count(up{job="model-servers"} == 1)`)
		return v == float64(nPods), err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Prometheus scraped all %d pods %s after starting", nPods, time.Since(t0).Round(time.Second))

	// prometheus-adapter, defaults (relist every 10m), one rule for the
	// engine's running-requests gauge.
	rules := `rules:
- seriesQuery: 'vllm:num_requests_running{namespace!="",pod!=""}'
  resources: {overrides: {namespace: {resource: namespace}, pod: {resource: pod}}}
  name: {matches: "^vllm:num_requests_running$", as: "vllm_num_requests_running"}
  metricsQuery: 'sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)'
`
	rulesFile := filepath.Join(dir, "adapter.yaml")
	if err := os.WriteFile(rulesFile, []byte(rules), 0o644); err != nil {
		t.Fatal(err)
	}
	certFile, keyFile, err := c.IssueServingCert("prometheus-adapter", "localhost", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	paPort, err := cluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	paBin := os.Getenv("CAPSTAN_PROMETHEUS_ADAPTER")
	pa, err := c.Run("prometheus-adapter", paBin, "--prometheus-url="+promURL, "--config="+rulesFile,
		"--secure-port="+strconv.Itoa(paPort), "--bind-address=127.0.0.1", "--tls-cert-file="+certFile, "--tls-private-key-file="+keyFile,
		"--lister-kubeconfig="+c.Kubeconfig, "--authentication-kubeconfig="+c.Kubeconfig, "--authorization-kubeconfig="+c.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	defer pa.Stop(10 * time.Second)
	paURL := "https://127.0.0.1:" + strconv.Itoa(paPort)
	if err := pa.WaitHealthy(ctx, paURL+"/readyz", time.Minute); err != nil {
		t.Fatal(err)
	}
	peer := &running{proc: pa, url: paURL, client: theAdapter.client}
	probePath := "/apis/custom.metrics.k8s.io/v1beta2/namespaces/" + ns + "/pods/*/vllm_num_requests_running?labelSelector=probe%3Dyes"
	peerGet := func(ctx context.Context) (map[string]string, error) {
		raw, err := peer.get(ctx, probePath)
		if err != nil {
			return nil, err
		}
		list := &cmv1beta2.MetricValueList{}
		if err := json.Unmarshal(raw, list); err != nil {
			return nil, err
		}
		out := map[string]string{}
		for _, item := range list.Items {
			out[item.DescribedObject.Name] = item.Value.String()
		}
		return out, nil
	}
	err = c.WaitFor(ctx, time.Minute, "prometheus-adapter to serve the probe pods", func(ctx context.Context) (bool, error) {
		got, err := peerGet(ctx)
		return err == nil && len(got) == len(probes), nil
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, pa.LogTail(20))
	}

	var viaPeer []float64
	half := "/apis/custom.metrics.k8s.io/v1beta2/namespaces/" + ns + "/pods/*/vllm_num_requests_running?labelSelector=group%3Da"
	for range 20 {
		start := time.Now()
		if _, err := peer.get(ctx, half); err != nil {
			t.Fatal(err)
		}
		viaPeer = append(viaPeer, time.Since(start).Seconds()*1000)
	}
	res.peer[rowDirect] = fmt.Sprintf("%.1f / %.1f ms", quantile(viaPeer, 0.5), quantile(viaPeer, 0.99))
	res.peer[rowScrapes] = fmt.Sprintf("%.0f (%d pods every 1m)", float64(nPods)/60, nPods)
	res.peer[rowAge] = "not reported (values carry the query time)"

	promPid, err := cluster.PidOf(promBin)
	if err != nil {
		t.Fatal(err)
	}
	paPid, err := cluster.PidOf(paBin)
	if err != nil {
		t.Fatal(err)
	}
	cpu0, wall0 := cpuSeconds(t, promPid)+cpuSeconds(t, paPid), time.Now()
	visible := changeToVisible(ctx, t, probes, arrivals, peerGet, 250*time.Millisecond, 5*time.Minute)
	cores := (cpuSeconds(t, promPid) + cpuSeconds(t, paPid) - cpu0) / time.Since(wall0).Seconds()
	res.peer[rowCPU] = fmt.Sprintf("%.3f (over %s)", cores, time.Since(wall0).Round(time.Second))
	res.peer[rowChange] = fmt.Sprintf("%.2f / %.2f / %.2f s", quantile(visible, 0.5), quantile(visible, 0.99), slices.Max(visible))
	r1, err1 := peakRSS(promPid)
	r2, err2 := peakRSS(paPid)
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	res.peer[rowRSS] = fmt.Sprintf("%.0f MiB (Prometheus %.0f + adapter %.0f)", r1+r2, r1, r2)
	res.notes = append(res.notes, "Prometheus "+strings.TrimSpace(version(promBin))+" and prometheus-adapter v0.12.0 at their default settings "+
		"(scrape_interval 1m, metrics-relist-interval 10m); prometheus-adapter queried directly, without the aggregator; its "+
		"API latency is for the same 1,000-pod selector.")
}

func version(bin string) string {
	out, err := exec.Command(bin, "--version").CombinedOutput()
	if err != nil {
		return "(version unknown)"
	}
	line, _, _ := strings.Cut(string(out), "\n")
	return line
}

func promQuery(ctx context.Context, base, query string) (float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/api/v1/query?query="+url.QueryEscape(query), nil)
	if err != nil {
		return 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var body struct {
		Data struct {
			Result []struct {
				Value [2]any `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		return 0, err
	}
	if len(body.Data.Result) == 0 {
		return 0, nil
	}
	s, _ := body.Data.Result[0].Value[1].(string)
	return strconv.ParseFloat(s, 64)
}
