package adapter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/fleet"
)

// Issue #16: a pod serving an endless page, a million series or 10,000
// buckets is marked failed with a clear reason in the adapter's own metrics
// and logs, the healthy pods beside it are still served, and the adapter's
// resident set stays under the memory limit of the Deployment the manifests
// install, over several scrape rounds of the hostile pods.
func TestHostilePagesFailInBoundedMemory(t *testing.T) {
	ctx, ns, a := setup(t, "hostile", 4*time.Minute)
	c := testCluster
	limitMiB := deploymentMemoryLimitMiB(t)
	pid, err := cluster.PidOf(mustBinary(t, adapterName))
	if err != nil {
		t.Fatal(err)
	}

	m := cluster.ModelServer{Namespace: ns, Name: "hostile", Model: "hostile", Replicas: 2}
	if err := c.Deploy(ctx, m); err != nil {
		t.Fatal(err)
	}
	// Bare pods with the Deployment's labels, each serving one hostile
	// page, and the reason the adapter must give for each. With the
	// adapter's default limits (4 MiB a page, 4096 series a family, 200
	// buckets a histogram) the endless page and the million series are
	// cut off at the page limit; 10,000 series fit in it and hit the
	// series limit; 10,000 buckets hit the bucket limit.
	hostile := map[string]struct {
		annotations map[string]string
		reason      string
	}{
		"endless":       {map[string]string{fleet.FaultAnnotation: string(fleet.FaultEndlessMetrics)}, "too_large"},
		"million":       {map[string]string{fleet.FaultAnnotation: string(fleet.FaultSeriesFlood)}, "too_large"},
		"series-flood":  {map[string]string{fleet.FaultAnnotation: string(fleet.FaultSeriesFlood), fleet.FaultSeriesAnnotation: "10000"}, "too_many_series"},
		"buckets-flood": {map[string]string{fleet.FaultAnnotation: string(fleet.FaultBucketFlood)}, "too_many_buckets"},
	}
	tmpl := m.Deployment().Spec.Template
	for name, h := range hostile {
		p := &corev1.Pod{ObjectMeta: *tmpl.ObjectMeta.DeepCopy(), Spec: *tmpl.Spec.DeepCopy()}
		p.Name, p.Namespace = name, ns
		p.Annotations = h.annotations
		if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	var healthy []corev1.Pod
	err = c.WaitFor(ctx, time.Minute, "the pods to be Ready", func(ctx context.Context) (bool, error) {
		pods, err := c.Pods(ctx, ns, "app=hostile")
		if err != nil {
			return false, err
		}
		healthy = healthy[:0]
		ready := 0
		for _, p := range pods {
			if modelserver.IsReady(&p) {
				ready++
				if _, bad := hostile[p.Name]; !bad {
					healthy = append(healthy, p)
				}
			}
		}
		return ready == len(hostile)+2 && len(healthy) == 2, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range healthy {
		waitServing(ctx, t, p.Status.PodIP)
	}

	// Sample the adapter's resident set throughout, every 100 ms.
	var maxRSS float64
	sample := func() {
		rss, err := currentRSS(pid)
		if err != nil {
			t.Fatal(err)
		}
		maxRSS = max(maxRSS, rss)
	}
	logRSS(t, pid, "the pods started")
	sample()

	// The adapter's metrics say why each hostile pod fails, and count it
	// among the failing targets; the healthy ones succeed.
	want := map[string]string{}
	for name, h := range hostile {
		want[name] = h.reason
	}
	for _, p := range healthy {
		want[p.Name] = "success"
	}
	var page string
	err = c.WaitFor(ctx, 30*time.Second, "the adapter to report each hostile pod failed with its reason", func(ctx context.Context) (bool, error) {
		sample()
		if page, err = a.metrics(ctx); err != nil {
			return false, err
		}
		for pod, result := range want {
			re := regexp.MustCompile(`capstan_scrape_target_scrapes_total\{namespace="` + ns + `",pod="` + regexp.QuoteMeta(pod) + `",result="` + result + `"\} [1-9]`)
			if !re.MatchString(page) {
				return false, nil
			}
		}
		for pod := range hostile {
			if !strings.Contains(page, `capstan_scrape_target_up{namespace="`+ns+`",pod="`+pod+`"} 0`) {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		var lines []string
		for l := range strings.Lines(page) {
			if strings.Contains(l, ns) || strings.HasPrefix(l, "capstan_scrape_targets_by_state") {
				lines = append(lines, strings.TrimSpace(l))
			}
		}
		t.Fatalf("%v\n%s", err, strings.Join(lines, "\n"))
	}
	failing := regexp.MustCompile(`capstan_scrape_targets_by_state\{state="failing"\} (\d+)`).FindStringSubmatch(page)
	if failing == nil || failing[1] == "0" {
		t.Errorf("capstan_scrape_targets_by_state{state=\"failing\"} is %v, want at least %d", failing, len(hostile))
	} else {
		t.Logf("targets failing: %s", failing[1])
	}

	// And its log says so, pod by pod, with the reason.
	log, err := os.ReadFile(a.proc.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	for pod, h := range hostile {
		found := false
		for l := range strings.Lines(string(log)) {
			if strings.Contains(l, "Scrape failing") && strings.Contains(l, ns) &&
				(strings.Contains(l, ns+"/"+pod+`"`) || strings.Contains(l, `"`+pod+`"`)) && strings.Contains(l, h.reason) {
				found = true
				t.Logf("log: %s", strings.TrimSpace(l))
				break
			}
		}
		if !found {
			t.Errorf("no %q line in the adapter's log for %s with reason=%q", "Scrape failing", pod, h.reason)
		}
	}

	// For several scrape rounds of the hostile pods (they back off, 1 s
	// doubling), the healthy pods are served through the custom metrics
	// API and the adapter's resident set stays under the limit.
	path := "/apis/custom.metrics.k8s.io/v1beta2/namespaces/" + ns + "/pods/*/requests_waiting?labelSelector=app%3Dhostile"
	wantValues := map[string]string{}
	for _, p := range healthy {
		wantValues[p.Name] = "0"
	}
	rounds := 0
	end := time.Now().Add(15 * time.Second)
	err = c.WaitFor(ctx, 30*time.Second, "15 s of sampling beside the hostile pods", func(ctx context.Context) (bool, error) {
		sample()
		got, _, err := metricValues(ctx, path)
		if err != nil {
			return false, err
		}
		if diff := cmp.Diff(wantValues, got); diff != "" {
			return false, fmt.Errorf("pods (-want +got):\n%s", diff)
		}
		rounds++
		return time.Now().After(end), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	page, err = a.metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var counts []string
	for pod, h := range hostile {
		m := regexp.MustCompile(`capstan_scrape_target_scrapes_total\{namespace="` + ns + `",pod="` + regexp.QuoteMeta(pod) + `",result="` + h.reason + `"\} (\d+)`).FindStringSubmatch(page)
		if m != nil {
			counts = append(counts, pod+"="+m[1])
		}
	}
	logRSS(t, pid, "the hostile scrapes")
	peak, err := peakRSS(pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("max adapter RSS sampled while scraping the hostile pods: %.0f MiB (limit %.0f MiB; process peak %.0f MiB); %d API reads; failed scrapes: %s",
		maxRSS, limitMiB, peak, rounds, strings.Join(counts, " "))
	if maxRSS >= limitMiB {
		t.Errorf("the adapter's RSS reached %.0f MiB, not under the Deployment's memory limit of %.0f MiB", maxRSS, limitMiB)
	}
}

// deploymentMemoryLimitMiB reads the adapter container's memory limit from
// the base Deployment manifest.
func deploymentMemoryLimitMiB(t *testing.T) float64 {
	t.Helper()
	root, err := cluster.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(root, "manifests", "metricsadapter", "base", "deployment.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var d appsv1.Deployment
	if err := yaml.Unmarshal(raw, &d); err != nil {
		t.Fatal(err)
	}
	for _, ctr := range d.Spec.Template.Spec.Containers {
		if lim, ok := ctr.Resources.Limits[corev1.ResourceMemory]; ok {
			return float64(lim.Value()) / (1 << 20)
		}
	}
	t.Fatal("the Deployment sets no memory limit")
	return 0
}
