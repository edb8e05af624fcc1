package gateway

import (
	"context"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientsetscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/klog/v2"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"
	inferencev1 "sigs.k8s.io/gateway-api-inference-extension/api/v1"
	inference "sigs.k8s.io/gateway-api-inference-extension/conformance"
	"sigs.k8s.io/gateway-api-inference-extension/conformance/resources"
	inferencetests "sigs.k8s.io/gateway-api-inference-extension/conformance/tests"
	inferenceconfig "sigs.k8s.io/gateway-api-inference-extension/conformance/utils/config"
	"sigs.k8s.io/gateway-api-inference-extension/version"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/gateway-api/conformance/utils/suite"

	"github.com/capstan-dev/capstan/test/fleet"
)

// inferenceReportEnv names the file to write the Inference Extension
// conformance suite's report to; without it the report goes to the
// cluster's folder. (Not reportEnv: one run of the package writes both
// suites' reports.)
const inferenceReportEnv = "CAPSTAN_INFERENCE_CONFORMANCE_REPORT"

// TestInferenceConformance runs the Gateway API Inference Extension's
// conformance suite (sigs.k8s.io/gateway-api-inference-extension/conformance,
// the version go.mod pins), all of its tests, profile "Gateway", through the
// suite's own entry point, against GatewayClass capstan with the
// InferencePool CRD installed. The fleet simulator plays the suite's
// echo-basic model servers and, by running lwepp itself for each of them,
// its lwepp endpoint-picker Deployments (each as its pod's ServiceAccount,
// with the RBAC the suite's manifests grant). It logs every test's result
// and writes the suite's report.
func TestInferenceConformance(t *testing.T) {
	if testing.Short() {
		t.Skip("the conformance suite takes minutes")
	}
	ctx := testContext(t, 15*time.Minute)
	bin := lweppBinary(t)
	installInferencePools(t, ctx)
	ctrllog.SetLogger(klog.Background().V(4))
	var kubeconfigs serviceAccountKubeconfigs
	runFleet(t, ctx, fleet.Options{Echo: true, LWEPP: &fleet.LWEPP{
		Binary:     bin,
		Kubeconfig: kubeconfigs.get,
		LogDir:     testCluster.Dir,
	}})
	startRouter(t, ctx, "router-inference-conformance")

	// The suite's own scheme (its DefaultOptions): core, Gateway API, CRDs
	// and the Inference Extension's types.
	scheme := runtime.NewScheme()
	for _, install := range []func(*runtime.Scheme) error{clientsetscheme.AddToScheme, gatewayv1.Install,
		apiextensionsv1.AddToScheme, inferencev1.Install} {
		if err := install(scheme); err != nil {
			t.Fatal(err)
		}
	}
	clientOptions := client.Options{Scheme: scheme}
	cl, err := client.New(testCluster.RESTConfig, clientOptions)
	if err != nil {
		t.Fatal(err)
	}

	// The suite's defaults wait up to five minutes for what happens here in
	// milliseconds or not at all; these bounds keep a failing test short
	// while leaving the router and lwepp ample time. (Its status helpers
	// keep their own fixed bounds.) MaxTimeToConsistency keeps the suite's
	// five minutes: GatewayWeightedAcrossTwoInferencePools warms each pod up
	// with requests steered to it, a second apart, until three in a row
	// succeed, and a request steered to a pod of the pool weighted 30
	// succeeds only when the weighted pick sends it there, three times
	// running: about 50 requests on average, a minute at the suite's pace.
	timeouts := inferenceconfig.DefaultInferenceExtensionTimeoutConfig().TimeoutConfig
	for _, d := range []*time.Duration{&timeouts.GatewayMustHaveAddress, &timeouts.GatewayMustHaveCondition,
		&timeouts.GWCMustBeAccepted, &timeouts.HTTPRouteMustHaveCondition, &timeouts.RouteMustHaveParents,
		&timeouts.NamespacesMustBeReady, &timeouts.LatestObservedGenerationSet} {
		*d = 30 * time.Second
	}

	gatewayNamespacePod(t, ctx)

	report := os.Getenv(inferenceReportEnv)
	if report == "" {
		report = filepath.Join(testCluster.Dir, "inference-conformance-report.yaml")
	}
	var (
		mu      sync.Mutex
		results = map[string]string{}
		ran     *suite.ConformanceTestSuite
	)
	start := time.Now()
	// The suite's RunConformanceWithOptions asks for its report right after
	// running the tests, which the Gateway API suite this module pins
	// (v1.6.3) refuses until the run's own cleanup has marked it finished:
	// so the report is taken here, in a cleanup registered before the
	// suite's and so run after them, from the suite the hook saw, in the
	// suite's own report type.
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		logInferenceResults(t, results, time.Since(start))
		if ran != nil {
			writeInferenceReport(t, cl, ran, report)
		}
	})
	inference.RunConformanceWithOptions(t, suite.ConformanceOptions{
		ConfigurableOptions: suite.ConfigurableOptions{
			GatewayClassName:     className,
			CleanupBaseResources: true,
			CleanupTestResources: true,
			Mode:                 "default",
			SupportedFeatures:    inference.GatewayLayerProfile.CoreFeatures.UnsortedList(),
			TimeoutConfig:        timeouts,
			ConformanceProfiles:  []suite.ConformanceProfileName{inference.GatewayLayerProfileName},
			Implementation:       implementation,
		},
		Client:        cl,
		ClientOptions: clientOptions,
		Clientset:     testCluster.Client,
		RestConfig:    testCluster.RESTConfig,
		BaseManifests: "resources/base.yaml",
		ManifestFS:    []fs.FS{&inference.Manifests},
		Hook: func(t *testing.T, test suite.ConformanceTest, s *suite.ConformanceTestSuite) {
			res := outcome(t)
			mu.Lock()
			results[test.ShortName] = res
			ran = s
			mu.Unlock()
		},
	})
}

// logInferenceResults logs every test of the suite with its result; a test
// the suite did not run (it stopped early) is listed as not run.
func logInferenceResults(t *testing.T, results map[string]string, elapsed time.Duration) {
	var b strings.Builder
	fmt.Fprintf(&b, "Gateway API Inference Extension conformance, profile Gateway, %s, %s\n",
		time.Now().UTC().Format("2006-01-02"), elapsed.Round(time.Second))
	counts := map[string]int{}
	for _, test := range inferencetests.ConformanceTests {
		res, ok := results[test.ShortName]
		if !ok {
			res = "NOT RUN"
		}
		counts[res]++
		fmt.Fprintf(&b, "  %-7s %s\n", res, test.ShortName)
	}
	for _, res := range slices.Sorted(maps.Keys(counts)) {
		fmt.Fprintf(&b, "%s: %d  ", res, counts[res])
	}
	t.Logf("inference conformance results:\n%s", b.String())
}

// writeInferenceReport writes the suite's report, as its
// RunConformanceWithOptions does: the Gateway API suite's report with the
// Inference Extension version of the installed CRDs.
func writeInferenceReport(t *testing.T, cl client.Client, s *suite.ConformanceTestSuite, path string) {
	report, err := s.Report()
	if err != nil {
		t.Errorf("the conformance report: %v", err)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var crd apiextensionsv1.CustomResourceDefinition
	if err := cl.Get(ctx, client.ObjectKey{Name: "inferencepools.inference.networking.k8s.io"}, &crd); err != nil {
		t.Errorf("the InferencePool CRD's version: %v", err)
		return
	}
	r := inference.GatewayAPIInferenceExtensionConformanceReport{
		GatewayAPIInferenceExtensionVersion: crd.Annotations[version.BundleVersionAnnotation],
		ConformanceReport:                   *report,
	}
	if err := r.WriteReport(t.Logf, path); err != nil {
		t.Error(err)
	}
}

// serviceAccountKubeconfigs gives each pod's lwepp a kubeconfig of the
// pod's ServiceAccount, as the kubelet would mount its token, written once
// per ServiceAccount.
type serviceAccountKubeconfigs struct {
	mu    sync.Mutex
	paths map[string]string
}

func (k *serviceAccountKubeconfigs) get(ctx context.Context, pod *corev1.Pod) (string, error) {
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	key := pod.Namespace + "/" + sa
	if p, ok := k.paths[key]; ok {
		return p, nil
	}
	p, err := testCluster.ServiceAccountKubeconfig(ctx, pod.Namespace, sa)
	if err != nil {
		return "", err
	}
	if k.paths == nil {
		k.paths = map[string]string{}
	}
	k.paths[key] = p
	return p, nil
}

// gatewayNamespacePod creates the suite's Gateway namespace with one Ready
// pod in it. The suite's setup waits for at least one Ready pod in each of
// its namespaces, assuming that the implementation deploys its proxy next
// to each Gateway (Istio and NGINX Gateway Fabric do); capstan-router serves
// every Gateway from its own namespace, so the Gateway namespace would have
// none and the setup would wait forever. The pod stands in for a router
// replica; nothing is sent to it. The suite adopts the namespace (it
// updates what exists) and deletes it when it ends.
func gatewayNamespacePod(t *testing.T, ctx context.Context) {
	t.Helper()
	ns := resources.InfraNamespace
	if _, err := testCluster.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = testCluster.Client.CoreV1().Namespaces().Delete(context.Background(), ns, metav1.DeleteOptions{})
	})
	apply(t, ctx, ns, `
apiVersion: v1
kind: Pod
metadata:
  name: capstan-router-stand-in
  annotations:
    capstan.dev/why: "the suite waits for a Ready pod in the Gateways' namespace; capstan-router runs elsewhere"
spec:
  containers:
  - name: pause
    image: registry.k8s.io/pause:3.10
`)
	if _, err := testCluster.WaitForReadyPods(ctx, ns, "", 1, 30*time.Second); err != nil {
		t.Fatal(err)
	}
}
