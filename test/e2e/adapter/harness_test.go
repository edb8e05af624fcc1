// Package adapter tests capstan-metrics-adapter against a real control plane:
// the binary runs as its ServiceAccount with the RBAC of
// manifests/metricsadapter, kube-apiserver's aggregation layer reaches it
// through its APIServices (verified with the cluster CA, no
// insecureSkipTLSVerify), the real HPA controller scales on its answers, and
// the fleet simulator plays the model servers, faults included.
package adapter

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	corev1 "k8s.io/api/core/v1"
	yamlutil "k8s.io/apimachinery/pkg/util/yaml"
	apiregistrationv1 "k8s.io/kube-aggregator/pkg/apis/apiregistration/v1"
	"k8s.io/metrics/pkg/apis/custom_metrics/v1beta2"
	"sigs.k8s.io/yaml"

	"github.com/capstan-dev/capstan/test/cluster"
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

// manifestsDir is manifests/metricsadapter in the checkout under test.
func manifestsDir(t *testing.T) string {
	t.Helper()
	root, err := cluster.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(root, "manifests", "metricsadapter")
}

// startAdapter starts capstan-metrics-adapter once: its namespace,
// ServiceAccount and RBAC come from the manifests, it authenticates as that
// ServiceAccount, and the manifests' APIServices point at it through an
// ExternalName Service, with the cluster CA as their caBundle.
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
	adapterOnce.Do(func() { theAdapter, adapterErr = doStartAdapter(t, manifestsDir(t), flags) })
	if adapterErr != nil {
		t.Fatal(adapterErr)
	}
	if exited, err := theAdapter.proc.Exited(); exited {
		t.Fatal(theAdapter.proc.Failure("exited (" + err.Error() + ")"))
	}
	return theAdapter
}

func doStartAdapter(t *testing.T, dir string, flags []string) (*running, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := testCluster
	for _, f := range []string{"namespace.yaml", "serviceaccount.yaml", "rbac.yaml"} {
		if err := c.ApplyFile(ctx, adapterNamespace, filepath.Join(dir, f)); err != nil {
			return nil, err
		}
	}
	certFile, keyFile, err := c.IssueServingCert(adapterName, adapterName+"."+adapterNamespace+".svc", "localhost", "127.0.0.1")
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	kubeconfig, err := c.ServiceAccountKubeconfig(ctx, adapterNamespace, adapterName)
	if err != nil {
		return nil, err
	}
	bin, err := cluster.Binary(adapterName)
	if err != nil {
		return nil, err
	}
	proc, err := c.Run(adapterName, bin, append([]string{
		"--kubeconfig=" + kubeconfig,
		"--bind-address=127.0.0.1", "--secure-port=" + strconv.Itoa(port),
		"--tls-cert-file=" + certFile, "--tls-private-key-file=" + keyFile,
		"--scrape-interval=" + scrapeInterval.String(), "--v=2"}, flags...)...)
	if err != nil {
		return nil, err
	}
	base := "https://127.0.0.1:" + strconv.Itoa(port)
	if err := proc.WaitHealthy(ctx, base+"/readyz", time.Minute); err != nil {
		return nil, err
	}

	// The aggregator reaches the process through an ExternalName Service
	// of the manifests' name, and checks it against the cluster CA.
	svc := fmt.Sprintf(`apiVersion: v1
kind: Service
metadata: {name: %s, namespace: %s}
spec: {type: ExternalName, externalName: localhost}
`, adapterName, adapterNamespace)
	if err := c.Apply(ctx, adapterNamespace, strings.NewReader(svc)); err != nil {
		return nil, err
	}
	services, err := apiServices(dir)
	if err != nil {
		return nil, err
	}
	for _, s := range services {
		s.Spec.CABundle = c.CABundle()
		p := int32(port)
		s.Spec.Service.Port = &p
		obj, err := yaml.Marshal(s)
		if err != nil {
			return nil, err
		}
		if err := c.Apply(ctx, "", bytes.NewReader(obj)); err != nil {
			return nil, err
		}
	}
	for _, s := range services {
		if err := waitAvailable(ctx, s.Name); err != nil {
			return nil, fmt.Errorf("%w\nadapter log:\n%s", err, proc.LogTail(30))
		}
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
	return &running{proc: proc, url: base, client: client}, nil
}

// apiServices reads the manifests' APIServices.
func apiServices(dir string) ([]*apiregistrationv1.APIService, error) {
	data, err := os.ReadFile(filepath.Join(dir, "apiservice.yaml"))
	if err != nil {
		return nil, err
	}
	var out []*apiregistrationv1.APIService
	dec := yamlutil.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	for {
		s := &apiregistrationv1.APIService{}
		if err := dec.Decode(s); err != nil {
			if err == io.EOF {
				return out, nil
			}
			return nil, err
		}
		if s.Name != "" {
			s.APIVersion, s.Kind = "apiregistration.k8s.io/v1", "APIService"
			out = append(out, s)
		}
	}
}

func waitAvailable(ctx context.Context, name string) error {
	c := testCluster
	return c.WaitFor(ctx, time.Minute, "APIService "+name+" to be Available", func(ctx context.Context) (bool, error) {
		s, err := getAPIService(ctx, name)
		if err != nil {
			return false, err
		}
		return availableCondition(s) == "True", nil
	})
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

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
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
	var wg sync.WaitGroup
	client := &http.Client{}
	body := fmt.Sprintf(`{"model":%q,"prompt":"tell me a long story about autoscaling","max_tokens":4}`, modelName)
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

// kubectl runs the kubectl on PATH, if there is one.
func kubectl(args ...string) ([]byte, error) {
	if _, err := exec.LookPath("kubectl"); err != nil {
		return nil, err
	}
	cmd := exec.Command("kubectl", args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, stderr.String())
	}
	return out, nil
}

// podIPs returns each pod's IP by name.
func podIPs(pods []corev1.Pod) map[string]string {
	out := map[string]string{}
	for _, p := range pods {
		out[p.Name] = p.Status.PodIP
	}
	return out
}
