package adapter

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2/ktesting"
	apiregistrationv1 "k8s.io/kube-aggregator/pkg/apis/apiregistration/v1"
	aggregator "k8s.io/kube-aggregator/pkg/client/clientset_generated/clientset"
	"k8s.io/utils/ptr"
	kresource "sigs.k8s.io/kustomize/api/resource"
	"sigs.k8s.io/yaml"

	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/components"
	"github.com/capstan-dev/capstan/test/fleet"
)

// Two adapter replicas run behind the APIServices, as manifests/metricsadapter
// installs them, and one is SIGKILLed while the real HPA controller is
// scaling a model up on a Capstan metric. The HPA keeps scaling to its
// target, its ScalingActive condition never turns False, and it records no
// event saying it could not read its metric.
//
// How the API server reaches the replicas. Without
// --enable-aggregator-routing (which the local cluster never sets, like most
// clusters) kube-apiserver resolves an APIService's Service to its cluster IP
// (k8s.io/apiserver/pkg/util/proxy.ResolveCluster) and kube-proxy picks one
// Ready endpoint per new connection; the aggregator keeps that connection
// (HTTP/2) for every later request. The local cluster has no kube-proxy, so
// the test plays it: an ExternalName Service sends the API server to a local
// TCP balancer that, like kube-proxy, picks a random endpoint per new
// connection among the replicas it holds Ready, and never retries a dial.
// Like the kubelet and the EndpointSlice controller, it learns whether a
// replica is Ready from a readiness probe (/readyz every second).
//
// What the test does not cover: here the killed replica leaves the
// balancer's endpoints at the moment it is killed. On a real cluster the
// endpoint goes one to three seconds later, and a connection the API server
// opens in that window still reaches the dead replica: one query fails
// (503), the HPA records FailedGetPodsMetric and ScalingActive is False
// until its next sync. With the removal left to the one-second probe, that
// happened in about 1 run in 17; docs/metricsadapter.md ("Losing a
// replica") says so. Neither kube-apiserver nor kube-proxy retries a
// refused connection, so the adapter cannot close that window itself.
func TestHPAKeepsScalingWhenAnAdapterReplicaIsKilled(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithTimeout(ctx, 85*time.Second)
	defer cancel()
	c := testCluster
	start := time.Now()

	nodesOnce.Do(func() {
		nodesErr = c.CreateNodes(ctx, cluster.Node{Name: "adapter-0"}, cluster.Node{Name: "adapter-1"})
	})
	if nodesErr != nil {
		t.Fatal(nodesErr)
	}

	// The manifests run two replicas.
	resources, err := components.Render("metricsadapter")
	if err != nil {
		t.Fatal(err)
	}
	deployments, err := components.Decode[appsv1.Deployment](resources, "Deployment")
	if err != nil {
		t.Fatal(err)
	}
	replicas := int(ptr.Deref(deployments[0].Spec.Replicas, 1))
	if replicas != 2 {
		t.Fatalf("manifests/metricsadapter runs %d replicas, want 2", replicas)
	}

	// Both replicas, started as components.StartAdapter starts one.
	reps := startReplicas(ctx, t, resources, replicas)
	lb := newBalancer(t, reps)
	go lb.probe(ctx, time.Second)
	restore := pointAPIServicesAt(ctx, t, resources, lb.port)
	t.Cleanup(restore)

	ns, err := c.CreateNamespace(ctx, "replicas")
	if err != nil {
		t.Fatal(err)
	}
	sim := fleet.New(c.Client, fleet.Options{Namespace: ns})
	simCtx, stopSim := context.WithCancel(ctx)
	if err := sim.Start(simCtx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stopSim(); sim.Wait() })
	t.Cleanup(func() {
		if t.Failed() {
			for _, r := range reps {
				t.Logf("%s log:\n%s", r.name, r.LogTail(30))
			}
		}
	})

	m := cluster.ModelServer{Namespace: ns, Name: "llama", Model: "llama", Replicas: 1,
		Annotations: map[string]string{fleet.MaxRunningAnnotation: "1", fleet.TTFTAnnotation: "10m"}}
	if err := c.Deploy(ctx, m); err != nil {
		t.Fatal(err)
	}
	pods, err := c.WaitForReadyPods(ctx, ns, "app=llama", 1, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	waitServing(ctx, t, pods[0].Status.PodIP)
	// Before the HPA exists, both replicas serve the pod's metric, so that
	// every event the HPA records from now on is about the kill.
	for _, r := range reps {
		path := "/apis/custom.metrics.k8s.io/v1beta2/namespaces/" + ns + "/pods/*/requests_waiting?labelSelector=app%3Dllama"
		err := c.WaitFor(ctx, 15*time.Second, r.name+" to serve the pod's requests_waiting", func(ctx context.Context) (bool, error) {
			return r.serves(ctx, path)
		})
		if err != nil {
			t.Fatal(err)
		}
	}

	// requests_waiting per pod, target 2; one pod more per second at most,
	// so that the scale-up lasts long enough to kill a replica in it.
	const target = 6
	// How long the HPA is watched after the kill.
	const observeAfterKill = 15 * time.Second
	avg := resource.MustParse("2")
	h := hpaFor("llama", autoscalingv2.MetricSpec{Type: autoscalingv2.PodsMetricSourceType, Pods: &autoscalingv2.PodsMetricSource{
		Metric: autoscalingv2.MetricIdentifier{Name: "requests_waiting"},
		Target: autoscalingv2.MetricTarget{Type: autoscalingv2.AverageValueMetricType, AverageValue: &avg},
	}})
	h.Spec.MaxReplicas = target
	h.Spec.Behavior.ScaleUp.Policies = []autoscalingv2.HPAScalingPolicy{{Type: autoscalingv2.PodsScalingPolicy, Value: 1, PeriodSeconds: 1}}
	if _, err := c.Client.AutoscalingV2().HorizontalPodAutoscalers(ns).Create(ctx, h, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	scalingActive(ctx, t, ns, "llama")

	// From here on, ScalingActive must never be False.
	watchCtx, stopWatch := context.WithCancel(ctx)
	w := watchHPA(watchCtx, ns, "llama")

	// 14 requests on the first pod, one runs and 13 wait: the HPA wants 7,
	// capped at 6 (at 5 replicas 13/5 is 30% over the target of 2, beyond
	// the HPA's 10% tolerance).
	loadCtx, stopLoad := context.WithCancel(ctx)
	defer stopLoad()
	wg := load(loadCtx, t, pods[0].Status.PodIP, "llama", 14)
	defer wg.Wait()
	defer stopLoad()

	// Mid-scale (the Deployment at 3 of 6), kill the replica the API server
	// is connected to, so that its next request must find the other one.
	scaleTo(ctx, t, ns, "llama", 3, 30*time.Second)
	victim := lb.busiest()
	t.Logf("before the kill: %s", lb)
	openConns := lb.open(victim)
	killedAt := time.Now()
	victim.Kill()
	lb.remove(victim) // the endpoint goes at once (see the test's comment)
	t.Logf("SIGKILLed %s (%d open connections from the API server) %s after the start, at 3 of %d replicas",
		victim.name, openConns, killedAt.Sub(start).Round(100*time.Millisecond), target)

	up := scaleTo(ctx, t, ns, "llama", target, 30*time.Second)
	t.Logf("reached %d replicas %s after the kill", target, up.Round(100*time.Millisecond))
	// Keep watching for a while after the target: the HPA reads its metric
	// every second and must keep reading it from the surviving replica,
	// and the aggregator's availability checks (which also go through the
	// Service) must not take the APIService down. This is the length of
	// the observation, not a wait for anything.
	if rest := observeAfterKill - time.Since(killedAt); rest > 0 {
		select {
		case <-ctx.Done():
		case <-time.After(rest):
		}
	}
	stopWatch()
	w.wait()

	if bad := w.falseActive(); len(bad) > 0 {
		t.Errorf("ScalingActive turned False %d times, first: %s", len(bad), bad[0])
	}
	if bad := w.apiServiceUnavailable(); len(bad) > 0 {
		t.Errorf("the APIService was not Available %d times while watching (every 100ms), first: %s", len(bad), bad[0])
	}
	if w.errs > 0 {
		t.Logf("(%d HPA reads failed while watching; last: %v)", w.errs, w.lastErr)
	}
	events, err := c.Client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range events.Items {
		if e.InvolvedObject.Kind != "HorizontalPodAutoscaler" || e.InvolvedObject.Name != "llama" {
			continue
		}
		switch e.Reason {
		case "FailedGetObjectMetric", "FailedGetPodsMetric", "FailedComputeMetricsReplicas", "FailedGetExternalMetric", "FailedGetResourceMetric":
			t.Errorf("HPA event %s (x%d, last %s, %s after the kill): %s", e.Reason, e.Count,
				e.LastTimestamp.Format(time.RFC3339), e.LastTimestamp.Sub(killedAt).Round(time.Second), e.Message)
		}
	}
	t.Logf("after: %s", lb)
	dead, refused := lb.stats(victim)
	t.Logf("balancer: %d connections sent to %s after the kill before its endpoint went (refused), %d readiness failures; %d replicas ready now; whole test %s",
		refused, victim.name, dead, lb.readyCount(), time.Since(start).Round(100*time.Millisecond))
	if exited, _ := reps[1-slices.Index(reps, victim)].Exited(); exited {
		t.Error("the surviving replica exited")
	}
}

// replica is one capstan-metrics-adapter process. The harness's
// cluster.Process only stops gracefully (SIGTERM first), so the test starts
// these itself to SIGKILL one.
type replica struct {
	*cluster.Process
	name   string
	addr   string       // 127.0.0.1:<port>
	client *http.Client // trusts the serving certificate, as the cluster admin
}

// serves reports whether the replica itself answers a custom metrics GET
// with at least one value, asked as the cluster admin.
func (r *replica) serves(ctx context.Context, path string) (bool, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+r.addr+path, nil)
	if err != nil {
		return false, err
	}
	resp, err := r.client.Do(req)
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		return false, fmt.Errorf("%s: %s", resp.Status, body)
	}
	return bytes.Contains(body, []byte(`"describedObject"`)), nil
}

// startReplicas runs n adapters as components.StartAdapter runs one: the
// Deployment's arguments and environment, as the manifests' ServiceAccount,
// with a serving certificate from the cluster CA, on loopback ports.
func startReplicas(ctx context.Context, t *testing.T, resources []*kresource.Resource, n int) []*replica {
	t.Helper()
	c := testCluster
	args, env, err := components.Install(ctx, c, resources, "Deployment", "Service", "APIService")
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile, err := c.IssueServingCert(adapterName+"-replicas", adapterName+"."+adapterNamespace+".svc", "localhost", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	kubeconfig, err := c.ServiceAccountKubeconfig(ctx, adapterNamespace, adapterName)
	if err != nil {
		t.Fatal(err)
	}
	bin, err := cluster.Binary(adapterName)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(c.CABundle())
	probe := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	admin, err := tls.LoadX509KeyPair(c.RESTConfig.CertFile, c.RESTConfig.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{admin}},
	}}
	var reps []*replica
	for i := range n {
		port, err := cluster.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		name := fmt.Sprintf("%s-%d", adapterName, i)
		addr := "127.0.0.1:" + strconv.Itoa(port)
		p, err := c.RunWithEnv(name, bin, env, append(slices.Clone(args), "--kubeconfig="+kubeconfig, "--bind-address=127.0.0.1", "--secure-port="+strconv.Itoa(port),
			"--tls-cert-file="+certFile, "--tls-private-key-file="+keyFile, "--scrape-interval="+scrapeInterval.String(), "--window=10s", "--v=2")...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Kill)
		r := &replica{Process: p, name: name, addr: addr, client: client}
		reps = append(reps, r)
	}
	for _, r := range reps {
		err := cluster.WaitFor(ctx, time.Minute, r.name+" to be ready", func(ctx context.Context) (bool, error) {
			if exited, err := r.Exited(); exited {
				return false, fmt.Errorf("exited: %v", err)
			}
			resp, err := probe.Get("https://" + r.addr + "/readyz")
			if err != nil {
				return false, err
			}
			resp.Body.Close()
			return resp.StatusCode == http.StatusOK, nil
		})
		if err != nil {
			t.Fatalf("%v\n%s", err, r.LogTail(20))
		}
	}
	return reps
}

// pointAPIServicesAt points the manifests' APIServices at localhost:port
// (through the ExternalName Service components.StartAdapter uses too) and
// waits until they are Available. It returns a function that points them
// back at the package's adapter, for the other tests.
func pointAPIServicesAt(ctx context.Context, t *testing.T, resources []*kresource.Resource, port int) func() {
	t.Helper()
	c := testCluster
	svc := fmt.Sprintf("apiVersion: v1\nkind: Service\nmetadata: {name: %s, namespace: %s}\nspec: {type: ExternalName, externalName: localhost}\n", adapterName, adapterNamespace)
	if err := c.Apply(ctx, adapterNamespace, bytes.NewBufferString(svc)); err != nil {
		t.Fatal(err)
	}
	agg, err := aggregator.NewForConfig(c.RESTConfig)
	if err != nil {
		t.Fatal(err)
	}
	apiServices, err := components.Decode[apiregistrationv1.APIService](resources, "APIService")
	if err != nil {
		t.Fatal(err)
	}
	apply := func(ctx context.Context, ports map[string]int32) error {
		for _, s := range apiServices {
			p, ok := ports[s.Name]
			if !ok {
				continue
			}
			s.Spec.CABundle = c.CABundle()
			s.Spec.Service.Port = ptr.To(p)
			out, err := yaml.Marshal(&s)
			if err != nil {
				return err
			}
			if err := c.Apply(ctx, "", bytes.NewReader(out)); err != nil {
				return err
			}
			err = c.WaitFor(ctx, time.Minute, "APIService "+s.Name+" to be Available", func(ctx context.Context) (bool, error) {
				got, err := agg.ApiregistrationV1().APIServices().Get(ctx, s.Name, metav1.GetOptions{})
				if err != nil {
					return false, err
				}
				return availableCondition(got) == "True", nil
			})
			if err != nil {
				return err
			}
		}
		return nil
	}
	ours := map[string]int32{}
	for _, s := range apiServices {
		ours[s.Name] = int32(port)
	}
	if err := apply(ctx, ours); err != nil {
		t.Fatal(err)
	}
	return func() {
		// Only the package's adapter (startAdapter) is put back, if a test
		// started it; otherwise a later test's startAdapter points the
		// APIServices at it.
		if theAdapter == nil {
			return
		}
		_, portText, err := net.SplitHostPort(strings.TrimPrefix(theAdapter.url, "https://"))
		if err != nil {
			t.Error(err)
			return
		}
		p, err := strconv.Atoi(portText)
		if err != nil {
			t.Error(err)
			return
		}
		previous := map[string]int32{}
		for _, s := range apiServices {
			previous[s.Name] = int32(p)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := apply(ctx, previous); err != nil {
			t.Errorf("pointing the APIServices back at the package's adapter: %v", err)
		}
	}
}

// balancer plays kube-proxy for the adapter's Service: each new connection
// goes to a random Ready replica, as kube-proxy's iptables rules send it, and
// a replica is Ready while its /readyz answers a probe.
type balancer struct {
	t    *testing.T
	ln   net.Listener
	port int
	reps []*replica

	mu        sync.Mutex
	ready     map[*replica]bool
	conns     map[*replica]int // open now
	accepted  map[*replica]int // connections made, ever
	refused   map[*replica]int // dials that failed
	probeFail map[*replica]int
}

func newBalancer(t *testing.T, reps []*replica) *balancer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &balancer{t: t, ln: ln, port: ln.Addr().(*net.TCPAddr).Port, reps: reps,
		ready: map[*replica]bool{}, conns: map[*replica]int{}, accepted: map[*replica]int{}, refused: map[*replica]int{}, probeFail: map[*replica]int{}}
	for _, r := range reps {
		b.ready[r] = true // startReplicas waited for /readyz
	}
	t.Cleanup(func() { ln.Close() })
	go b.serve()
	return b
}

func (b *balancer) serve() {
	for {
		conn, err := b.ln.Accept()
		if err != nil {
			return
		}
		go b.forward(conn)
	}
}

func (b *balancer) forward(conn net.Conn) {
	defer conn.Close()
	b.mu.Lock()
	var ready []*replica
	for _, r := range b.reps {
		if b.ready[r] {
			ready = append(ready, r)
		}
	}
	b.mu.Unlock()
	if len(ready) == 0 {
		return // kube-proxy: no endpoints, the connection is rejected
	}
	r := ready[rand.IntN(len(ready))]
	backend, err := net.DialTimeout("tcp", r.addr, time.Second)
	if err != nil {
		// No retry on another endpoint: kube-proxy's DNAT does not either.
		b.mu.Lock()
		b.refused[r]++
		b.mu.Unlock()
		return
	}
	defer backend.Close()
	b.mu.Lock()
	b.conns[r]++
	b.accepted[r]++
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		b.conns[r]--
		b.mu.Unlock()
	}()
	done := make(chan struct{}, 2)
	go func() { io.Copy(backend, conn); backend.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
	go func() { io.Copy(conn, backend); conn.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
	<-done
	<-done
}

// probe checks every replica's /readyz each period, as a kubelet's readiness
// probe with failureThreshold 1 would, and takes a replica out of (or puts it
// back into) the balancing at once, as the EndpointSlice would follow.
func (b *balancer) probe(ctx context.Context, period time.Duration) {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(testCluster.CABundle())
	client := &http.Client{Timeout: period, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, DisableKeepAlives: true}}
	tick := time.NewTicker(period)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		for _, r := range b.reps {
			ok := false
			if resp, err := client.Get("https://" + r.addr + "/readyz"); err == nil {
				resp.Body.Close()
				ok = resp.StatusCode == http.StatusOK
			}
			b.mu.Lock()
			b.ready[r] = ok
			if !ok {
				b.probeFail[r]++
			}
			b.mu.Unlock()
		}
	}
}

// remove takes r out of the endpoints until a probe finds it Ready again.
func (b *balancer) remove(r *replica) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.ready[r] = false
}

// busiest is the replica with the most open connections (the API server's).
func (b *balancer) busiest() *replica {
	b.mu.Lock()
	defer b.mu.Unlock()
	best := b.reps[0]
	for _, r := range b.reps {
		if b.conns[r] > b.conns[best] {
			best = r
		}
	}
	return best
}

func (b *balancer) open(r *replica) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.conns[r]
}

func (b *balancer) stats(r *replica) (probeFailures, refused int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.probeFail[r], b.refused[r]
}

func (b *balancer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := ""
	for _, r := range b.reps {
		out += fmt.Sprintf("%s: ready %v, %d connections made, %d open, %d refused dials, %d failed probes; ", r.name, b.ready[r], b.accepted[r], b.conns[r], b.refused[r], b.probeFail[r])
	}
	return out
}

func (b *balancer) readyCount() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for _, ok := range b.ready {
		if ok {
			n++
		}
	}
	return n
}

// hpaWatch polls an HPA's status every 100 ms (the controller updates it at
// once a sync, every second here) and remembers every ScalingActive=False it
// sees, and every time the custom metrics APIService was not Available.
type hpaWatch struct {
	mu          sync.Mutex
	bad         []string
	unavailable []string // the APIService's Available condition, when not True
	errs        int
	lastErr     error
	done        chan struct{}
}

func watchHPA(ctx context.Context, ns, name string) *hpaWatch {
	w := &hpaWatch{done: make(chan struct{})}
	go func() {
		defer close(w.done)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			h, err := testCluster.Client.AutoscalingV2().HorizontalPodAutoscalers(ns).Get(ctx, name, metav1.GetOptions{})
			s, sErr := getAPIService(ctx, "v1beta2.custom.metrics.k8s.io")
			w.mu.Lock()
			switch {
			case err != nil && ctx.Err() == nil:
				w.errs++
				w.lastErr = err
			case err == nil:
				for _, cond := range h.Status.Conditions {
					if cond.Type == autoscalingv2.ScalingActive && cond.Status == corev1.ConditionFalse {
						w.bad = append(w.bad, fmt.Sprintf("%s: %s (%s)", cond.Reason, cond.Message, cond.LastTransitionTime.Format(time.RFC3339)))
					}
				}
			}
			if sErr == nil {
				for _, cond := range s.Status.Conditions {
					if cond.Type == apiregistrationv1.Available && cond.Status != apiregistrationv1.ConditionTrue {
						w.unavailable = append(w.unavailable, fmt.Sprintf("%s: %s", cond.Reason, cond.Message))
					}
				}
			}
			w.mu.Unlock()
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	return w
}

func (w *hpaWatch) wait() { <-w.done }

func (w *hpaWatch) falseActive() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.bad)
}

func (w *hpaWatch) apiServiceUnavailable() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.unavailable)
}
