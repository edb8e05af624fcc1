package scheduler

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
	watchtools "k8s.io/client-go/tools/watch"
	componentbaseconfigv1alpha1 "k8s.io/component-base/config/v1alpha1"
	schedv1 "k8s.io/kube-scheduler/config/v1"
	"k8s.io/utils/ptr"

	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/components"
)

// baselineProfile is the benchmark's profile without ModelSlots: the same
// binary and the same default plugins.
const baselineProfile = "capstan-baseline"

// TestSchedulingThroughput measures how fast capstan-scheduler binds model
// servers with ModelSlots and without it, in one run on one cluster, and
// reports the ratio. It runs only under hack/bench-scheduler.sh ($benchEnv).
//
// Each round creates the pods while no scheduler runs, then starts
// capstan-scheduler (both profiles in one configuration) and times the
// bindings from the first to the last as the API server reports them, so the
// scheduler's start-up is not counted. Rounds alternate the profiles
// (ABBA...) so that drift on a shared machine hits both alike.
func TestSchedulingThroughput(t *testing.T) {
	if os.Getenv(benchEnv) == "" {
		t.Skipf("set %s=1 (hack/bench-scheduler.sh) to run the throughput benchmark", benchEnv)
	}
	nodes, pods, rounds := envInt(t, "CAPSTAN_BENCH_NODES", 500), envInt(t, "CAPSTAN_BENCH_PODS", 1000), envInt(t, "CAPSTAN_BENCH_ROUNDS", 4)
	const slotsPerNode = 4
	if nodes*slotsPerNode < pods {
		t.Fatalf("%d nodes of %d slots cannot hold %d pods", nodes, slotsPerNode, pods)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	c := testCluster

	start := time.Now()
	var specs []cluster.Node
	for i := range nodes {
		specs = append(specs, slotNode(fmt.Sprintf("bench-%04d", i), "bench", slotsPerNode))
	}
	if err := c.CreateNodes(ctx, specs...); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d nodes Ready and untainted in %s", nodes, time.Since(start).Round(time.Second))

	configPath := benchConfig(t)
	ns, err := c.CreateNamespace(ctx, "bench")
	if err != nil {
		t.Fatal(err)
	}

	// One unrecorded round per profile first: the API server, etcd and kwok
	// are still settling after creating the nodes.
	for _, profile := range []string{schedulerName, baselineProfile} {
		res := benchRound(ctx, t, ns, profile, configPath, pods, -1)
		t.Logf("warm-up %-17s %4d pods: %6.1f pods/s (not counted)", profile, pods, res.throughput())
	}
	results := map[string][]roundResult{}
	for r := range rounds {
		// A B B A A B ...: each profile goes first and last equally often.
		order := []string{schedulerName, baselineProfile}
		if r%2 == 1 {
			order[0], order[1] = order[1], order[0]
		}
		for _, profile := range order {
			res := benchRound(ctx, t, ns, profile, configPath, pods, len(results[profile]))
			t.Logf("round %d %-17s %4d pods: %6.1f pods/s first→last binding (%s), %6.1f pods/s from scheduler start, %.2fs scheduler CPU",
				r+1, profile, pods, res.throughput(), res.lastBind.Sub(res.firstBind).Round(time.Millisecond), res.fromStart(), res.cpu.Seconds())
			results[profile] = append(results[profile], res)
			if profile == schedulerName && res.overfilled != "" {
				t.Errorf("round %d: %s", r+1, res.overfilled)
			}
		}
	}
	report(t, nodes, pods, results)
}

type roundResult struct {
	started, firstBind, lastBind time.Time
	pods                         int
	// cpu is the scheduler process's CPU time (user+system) over the round,
	// start-up included: what the profile cost, whatever else ran.
	cpu        time.Duration
	overfilled string // a node with more pods than slots, if any
}

func (r roundResult) throughput() float64 {
	return float64(r.pods-1) / r.lastBind.Sub(r.firstBind).Seconds()
}

func (r roundResult) fromStart() float64 {
	return float64(r.pods) / r.lastBind.Sub(r.started).Seconds()
}

// benchConfig is the manifests' configuration (profile capstan-scheduler with
// ModelSlots) plus the baseline profile, without leader election, as the
// admin, and with client rate limits high enough that neither profile is
// throttled by its API client.
func benchConfig(t *testing.T) string {
	t.Helper()
	resources, err := components.Render("scheduler")
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := components.SchedulerConfig(resources)
	if err != nil {
		t.Fatal(err)
	}
	cfg.LeaderElection.LeaderElect = ptr.To(false)
	cfg.ClientConnection = componentbaseconfigv1alpha1.ClientConnectionConfiguration{Kubeconfig: testCluster.Kubeconfig, QPS: 5000, Burst: 5000}
	cfg.Profiles = append(cfg.Profiles, schedv1.KubeSchedulerProfile{SchedulerName: ptr.To(baselineProfile)})
	path, err := writeConfig(cfg, "capstan-scheduler-bench.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return path
}

// benchRound creates the pods for profile, runs capstan-scheduler until all
// are bound, stops it and deletes the pods.
func benchRound(ctx context.Context, t *testing.T, ns, profile, configPath string, count, round int) roundResult {
	t.Helper()
	c := testCluster
	pods := c.Client.CoreV1().Pods(ns)
	prefix := fmt.Sprintf("%s-%d", strings.TrimPrefix(profile, "capstan-"), round)
	if round < 0 {
		prefix = strings.TrimPrefix(profile, "capstan-") + "-warmup"
	}
	createPods(ctx, t, ns, prefix, profile, count)

	// Watch bound pods only: a pod appears when its binding is committed.
	bound := fields.OneTermNotEqualSelector("spec.nodeName", "").String()
	list, err := pods.List(ctx, metav1.ListOptions{FieldSelector: bound})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Items) != 0 {
		t.Fatalf("%d pods bound before the scheduler started", len(list.Items))
	}
	w, err := watchtools.NewRetryWatcherWithContext(ctx, list.ResourceVersion, &cache.ListWatch{
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			o.FieldSelector = bound
			return pods.Watch(ctx, o)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()

	bin, err := cluster.Binary("capstan-scheduler")
	if err != nil {
		t.Fatal(err)
	}
	port, err := cluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	res := roundResult{pods: count, started: time.Now()}
	p, err := c.Run(fmt.Sprintf("capstan-scheduler-bench-%s", prefix), bin, "--config="+configPath,
		"--bind-address=127.0.0.1", "--secure-port="+strconv.Itoa(port), "-v=1",
		// The admin may read /debug/pprof (CAPSTAN_BENCH_PROFILES).
		"--authentication-kubeconfig="+c.Kubeconfig, "--authorization-kubeconfig="+c.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Stop(10 * time.Second)
	var profiled <-chan struct{}
	if dir := os.Getenv("CAPSTAN_BENCH_PROFILES"); dir != "" {
		profiled = profileCPU(ctx, t, fmt.Sprintf("https://127.0.0.1:%d", port), filepath.Join(dir, prefix+".pprof"))
	}

	perNode := map[string]int{}
	seen := map[string]bool{}
	deadline := time.After(5 * time.Minute)
	for len(seen) < count {
		select {
		case ev, ok := <-w.ResultChan():
			if !ok {
				t.Fatal("the pod watch ended")
			}
			pod, isPod := ev.Object.(*corev1.Pod)
			if !isPod || ev.Type == watch.Deleted || seen[pod.Name] {
				continue
			}
			now := time.Now()
			if len(seen) == 0 {
				res.firstBind = now
			}
			res.lastBind = now
			seen[pod.Name] = true
			perNode[pod.Spec.NodeName]++
			if perNode[pod.Spec.NodeName] > 4 && res.overfilled == "" {
				res.overfilled = fmt.Sprintf("node %s got %d model servers, more than its 4 slots", pod.Spec.NodeName, perNode[pod.Spec.NodeName])
			}
		case <-deadline:
			t.Fatalf("%s: %d of %d pods bound after 5m; scheduler log:\n%s", profile, len(seen), count, p.LogTail(20))
		}
	}
	if profiled != nil {
		<-profiled
	}
	p.Stop(10 * time.Second)
	var ok bool
	if res.cpu, ok = p.CPUTime(); !ok {
		t.Fatal("no CPU time for the stopped scheduler")
	}

	if err := pods.DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}, metav1.ListOptions{}); err != nil {
		t.Fatal(err)
	}
	err = c.WaitFor(ctx, 5*time.Minute, "the round's pods to be gone", func(ctx context.Context) (bool, error) {
		l, err := pods.List(ctx, metav1.ListOptions{})
		return err == nil && len(l.Items) == 0, err
	})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// profileCPU saves a CPU profile of the scheduler at url over the next
// $CAPSTAN_BENCH_PROFILE_SECONDS (15), taken in the background, and closes
// the returned channel when done. The round's scheduler runs until then, so
// its CPU time includes idle seconds.
func profileCPU(ctx context.Context, t *testing.T, url, path string) <-chan struct{} {
	done := make(chan struct{})
	seconds := strconv.Itoa(envInt(t, "CAPSTAN_BENCH_PROFILE_SECONDS", 15))
	client := insecureClient(t, testCluster.RESTConfig.CertFile, testCluster.RESTConfig.KeyFile)
	client.Timeout = time.Minute
	go func() {
		defer close(done)
		var resp *http.Response
		// The scheduler needs a moment before it serves.
		err := testCluster.WaitFor(ctx, 10*time.Second, "the scheduler's profile", func(context.Context) (bool, error) {
			var err error
			resp, err = client.Get(url + "/debug/pprof/profile?seconds=" + seconds)
			if err == nil && resp.StatusCode != http.StatusOK {
				resp.Body.Close()
				return false, fmt.Errorf("%s", resp.Status)
			}
			return err == nil, err
		})
		if err != nil {
			t.Errorf("profiling: %v", err)
			return
		}
		defer resp.Body.Close()
		f, err := os.Create(path)
		if err == nil {
			_, err = io.Copy(f, resp.Body)
			f.Close()
		}
		if err != nil {
			t.Errorf("saving the profile: %v", err)
		}
	}()
	return done
}

// createPods creates count model-server pods for the profile, 16 at a time.
func createPods(ctx context.Context, t *testing.T, ns, prefix, profile string, count int) {
	t.Helper()
	errs := make(chan error, count)
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Go(func() {
			for i := w; i < count; i += 16 {
				pod := modelPod(ns, fmt.Sprintf("%s-%04d", prefix, i), "llama-3-8b", nil)
				pod.Spec.SchedulerName = profile
				if _, err := testCluster.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("creating pods: %v", err)
	}
}

// report prints the medians and their ratio as a Markdown table, on stdout
// and into $CAPSTAN_BENCH_OUT if set.
func report(t *testing.T, nodes, pods int, results map[string][]roundResult) {
	median := func(profile string, f func(roundResult) float64) float64 {
		var v []float64
		for _, r := range results[profile] {
			v = append(v, f(r))
		}
		slices.Sort(v)
		if len(v)%2 == 1 {
			return v[len(v)/2]
		}
		return (v[len(v)/2-1] + v[len(v)/2]) / 2
	}
	all := func(profile string, f func(roundResult) float64) string {
		var s []string
		for _, r := range results[profile] {
			s = append(s, fmt.Sprintf("%.0f", f(r)))
		}
		return strings.Join(s, ", ")
	}
	var b strings.Builder
	fmt.Fprintf(&b, "Scheduling throughput, %d model-server pods on %d kwok nodes (4 slots each), %d rounds per profile, median:\n\n",
		pods, nodes, len(results[schedulerName]))
	cpu := func(r roundResult) float64 { return r.cpu.Seconds() }
	fmt.Fprintf(&b, "| profile | pods/s, first→last binding | each round | pods/s, from scheduler start | scheduler CPU s per round |\n|---|---|---|---|---|\n")
	for _, profile := range []string{baselineProfile, schedulerName} {
		what := profile + " (default plugins)"
		if profile == schedulerName {
			what = profile + " (default plugins + ModelSlots)"
		}
		fmt.Fprintf(&b, "| %s | %.0f | %s | %.0f | %.2f |\n", what,
			median(profile, roundResult.throughput), all(profile, roundResult.throughput), median(profile, roundResult.fromStart), median(profile, cpu))
	}
	ratio := median(schedulerName, roundResult.throughput) / median(baselineProfile, roundResult.throughput)
	verdict := "meets"
	if ratio < 0.9 {
		verdict = "MISSES"
	}
	fmt.Fprintf(&b, "\nThroughput with ModelSlots / without: %.2f× (%s the ≥ 0.90× target). Scheduler CPU with / without: %.2f×.\n",
		ratio, verdict, median(schedulerName, cpu)/median(baselineProfile, cpu))
	fmt.Print("\n" + b.String())
	if out := os.Getenv("CAPSTAN_BENCH_OUT"); out != "" {
		if err := os.WriteFile(out, []byte(b.String()), 0o644); err != nil {
			t.Error(err)
		}
	}
}

func envInt(t *testing.T, name string, def int) int {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		t.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}
