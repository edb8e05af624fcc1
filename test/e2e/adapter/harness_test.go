// Package adapter tests capstan-metrics-adapter against a real control plane:
// the binary runs as its ServiceAccount with the RBAC of
// manifests/metricsadapter, kube-apiserver's aggregation layer reaches it
// through its APIServices (verified with the cluster CA, no
// insecureSkipTLSVerify), the real HPA controller scales on its answers, and
// the fleet simulator plays the model servers, faults included.
package adapter

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	corev1 "k8s.io/api/core/v1"
	apiregistrationv1 "k8s.io/kube-aggregator/pkg/apis/apiregistration/v1"
	"k8s.io/metrics/pkg/apis/custom_metrics/v1beta2"

	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/components"
)

var testCluster *cluster.Cluster

func TestMain(m *testing.M) { os.Exit(cluster.RunTests(m, cluster.Config{}, &testCluster)) }

const (
	adapterNamespace = "capstan-system"
	adapterName      = "capstan-metrics-adapter"
	// The adapter's scrape interval and timeout in these tests: the
	// defaults.
	scrapeInterval = time.Second
	scrapeTimeout  = 750 * time.Millisecond // 3/4 of the interval, the default
)

// running is the adapter under test, started once for the package.
type running struct {
	proc *cluster.Process
	url  string // https://127.0.0.1:<port>
	// client trusts the adapter's serving certificate and presents the
	// cluster admin's client certificate.
	client *http.Client
}

var (
	adapterOnce sync.Once
	theAdapter  *running
	adapterErr  error

	nodesOnce sync.Once
	nodesErr  error
)

// startAdapter starts capstan-metrics-adapter once, as components.StartAdapter
// installs it from manifests/metricsadapter: as its ServiceAccount with the
// manifests' RBAC, reached by the aggregator through the manifests'
// APIServices with the cluster CA as their caBundle.
func startAdapter(t *testing.T) *running {
	t.Helper()
	// The defaults, but a shorter window so that rates and quantiles
	// settle within a test.
	return startAdapterWith(t, "--window=10s")
}

// startAdapterWith starts the adapter with these flags, unless a test already
// started it.
func startAdapterWith(t *testing.T, flags ...string) *running {
	t.Helper()
	adapterOnce.Do(func() { theAdapter, adapterErr = doStartAdapter(flags) })
	if adapterErr != nil {
		t.Fatal(adapterErr)
	}
	if exited, err := theAdapter.proc.Exited(); exited {
		t.Fatal(theAdapter.proc.Failure("exited (" + err.Error() + ")"))
	}
	return theAdapter
}

func doStartAdapter(flags []string) (*running, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := testCluster
	a, err := components.StartAdapter(ctx, c, append([]string{"--scrape-interval=" + scrapeInterval.String(), "--v=2"}, flags...)...)
	if err != nil {
		return nil, err
	}
	// An HTTPS client for the adapter itself, as the cluster admin.
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(c.CABundle())
	cert, err := tls.LoadX509KeyPair(c.RESTConfig.CertFile, c.RESTConfig.KeyFile)
	if err != nil {
		return nil, err
	}
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}},
	}}
	return &running{proc: a.Process, url: a.URL, client: client}, nil
}

func getAPIService(ctx context.Context, name string) (*apiregistrationv1.APIService, error) {
	raw, err := testCluster.Client.Discovery().RESTClient().Get().
		AbsPath("/apis/apiregistration.k8s.io/v1/apiservices", name).DoRaw(ctx)
	if err != nil {
		return nil, err
	}
	s := &apiregistrationv1.APIService{}
	return s, json.Unmarshal(raw, s)
}

func availableCondition(s *apiregistrationv1.APIService) string {
	for _, c := range s.Status.Conditions {
		if c.Type == apiregistrationv1.Available {
			return string(c.Status)
		}
	}
	return "Unknown"
}

// getRaw is kubectl get --raw: a GET through kube-apiserver (and so the
// aggregator) as the cluster admin.
func getRaw(ctx context.Context, pathAndQuery string) ([]byte, error) {
	u, err := url.Parse(pathAndQuery)
	if err != nil {
		return nil, err
	}
	req := testCluster.Client.Discovery().RESTClient().Get().AbsPath(u.Path)
	for k, vs := range u.Query() {
		for _, v := range vs {
			req = req.Param(k, v)
		}
	}
	return req.DoRaw(ctx)
}

// metricValues GETs a custom metrics path and returns value by object name.
func metricValues(ctx context.Context, path string) (map[string]string, *v1beta2.MetricValueList, error) {
	raw, err := getRaw(ctx, path)
	if err != nil {
		return nil, nil, err
	}
	list := &v1beta2.MetricValueList{}
	if err := json.Unmarshal(raw, list); err != nil {
		return nil, nil, fmt.Errorf("decoding %s: %w", raw, err)
	}
	out := map[string]string{}
	for _, v := range list.Items {
		out[v.DescribedObject.Name] = v.Value.String()
	}
	return out, list, nil
}

// podGauge reads one sample straight from a pod's metrics endpoint: what the
// pod itself serves, parsed independently of the adapter.
func podGauge(ctx context.Context, ip, family string, labels map[string]string) (float64, bool, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+ip+":8000/metrics", nil)
	if err != nil {
		return 0, false, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, false, err
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		return 0, false, err
	}
	f := families[family]
	if f == nil {
		return 0, false, nil
	}
	sum, found := 0.0, false
metrics:
	for _, m := range f.Metric {
		have := map[string]string{}
		for _, l := range m.Label {
			have[l.GetName()] = l.GetValue()
		}
		for k, v := range labels {
			if have[k] != v {
				continue metrics
			}
		}
		sum += m.GetGauge().GetValue() + m.GetUntyped().GetValue()
		found = true
	}
	return sum, found, nil
}

// adapterMetrics returns the adapter's own /metrics page.
func (a *running) metrics(ctx context.Context) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.url+"/metrics", nil)
	if err != nil {
		return "", err
	}
	resp, err := a.client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET /metrics: %s: %s", resp.Status, body)
	}
	return string(body), err
}

// load keeps n requests in flight to a pod until ctx ends. With a long
// time to first token they stay running or waiting in the simulated engine.
func load(ctx context.Context, t *testing.T, ip, modelName string, n int) *sync.WaitGroup {
	t.Helper()
	return loadBody(ctx, t, ip, fmt.Sprintf(`{"model":%q,"prompt":"tell me a long story about autoscaling","max_tokens":4}`, modelName), n)
}

// loadBody keeps n completion requests with this body in flight to a pod
// until ctx ends.
func loadBody(ctx context.Context, t *testing.T, ip, body string, n int) *sync.WaitGroup {
	t.Helper()
	var wg sync.WaitGroup
	client := &http.Client{}
	for range n {
		wg.Go(func() {
			req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+ip+":8000/v1/completions", strings.NewReader(body))
			if err != nil {
				return
			}
			req.Header.Set("Content-Type", "application/json")
			if resp, err := client.Do(req); err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		})
	}
	return &wg
}

// podIPs returns each pod's IP by name.
func podIPs(pods []corev1.Pod) map[string]string {
	out := map[string]string{}
	for _, p := range pods {
		out[p.Name] = p.Status.PodIP
	}
	return out
}
