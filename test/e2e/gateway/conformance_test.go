package gateway

import (
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

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/klog/v2"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/gateway-api/apis/v1alpha2"
	"sigs.k8s.io/gateway-api/apis/v1alpha3"
	"sigs.k8s.io/gateway-api/conformance"
	confv1 "sigs.k8s.io/gateway-api/conformance/apis/v1"
	"sigs.k8s.io/gateway-api/conformance/tests"
	"sigs.k8s.io/gateway-api/conformance/utils/config"
	"sigs.k8s.io/gateway-api/conformance/utils/suite"
	"sigs.k8s.io/gateway-api/pkg/features"
	"sigs.k8s.io/yaml"

	"github.com/capstan-dev/capstan/router/gateway"
)

// reportEnv names a file to write the conformance results to (a summary and
// the suite's own report); without it they go to the cluster's folder and
// the test log.
const reportEnv = "CAPSTAN_CONFORMANCE_REPORT"

// implementation is what both conformance suites' reports say Capstan is.
var implementation = confv1.Implementation{
	Organization: "capstan-dev",
	Project:      "capstan",
	URL:          "https://github.com/capstan-dev/capstan",
	Version:      "v0.1.0",
	Contact:      []string{"https://github.com/capstan-dev/capstan/issues"},
}

// outcome is a finished conformance test's result, as the reports name it.
func outcome(t *testing.T) string {
	switch {
	case t.Failed():
		return "FAIL"
	case t.Skipped():
		return "SKIP"
	}
	return "PASS"
}

// TestConformance runs the Gateway API conformance suite's tests for the
// features the router declares (its GatewayClass reports the same list)
// against GatewayClass capstan, with the fleet simulator as the suite's
// echo backends, and reports which tests passed, failed, or were skipped
// as not supported.
func TestConformance(t *testing.T) {
	if testing.Short() {
		t.Skip("the conformance suite takes minutes")
	}
	ctx := testContext(t, 20*time.Minute)
	setup(t)
	ctrllog.SetLogger(klog.Background().V(4))
	simulate(t, ctx, "", nil)
	startRouter(t, ctx, "router-conformance")

	cl, err := client.New(testCluster.RESTConfig, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, install := range []func() error{
		func() error { return gatewayv1.Install(cl.Scheme()) },
		func() error { return v1alpha2.Install(cl.Scheme()) },
		func() error { return v1alpha3.Install(cl.Scheme()) },
		func() error { return apiextensionsv1.AddToScheme(cl.Scheme()) },
	} {
		if err := install(); err != nil {
			t.Fatal(err)
		}
	}

	// The suite's defaults wait minutes for things that happen here in
	// milliseconds or not at all; these bounds keep a failing run short
	// while leaving the router ample time.
	timeouts := config.DefaultTimeoutConfig()
	for _, d := range []*time.Duration{&timeouts.GatewayMustHaveAddress, &timeouts.GatewayMustHaveCondition,
		&timeouts.GatewayStatusMustHaveListeners, &timeouts.GatewayListenersMustHaveConditions, &timeouts.GWCMustBeAccepted,
		&timeouts.HTTPRouteMustNotHaveParents, &timeouts.HTTPRouteMustHaveCondition, &timeouts.RouteMustHaveParents,
		&timeouts.LatestObservedGenerationSet, &timeouts.NamespacesMustBeReady} {
		*d = 30 * time.Second
	}

	var mu sync.Mutex
	results := map[string]string{}
	var supported []features.FeatureName
	supported = append(supported, gateway.SupportedFeatures...)
	opts := suite.ConformanceOptions{
		ConfigurableOptions: suite.ConfigurableOptions{
			GatewayClassName:     className,
			CleanupBaseResources: true,
			CleanupTestResources: true,
			SupportedFeatures:    supported,
			TimeoutConfig:        timeouts,
			ConformanceProfiles:  []suite.ConformanceProfileName{suite.GatewayHTTPConformanceProfileName},
			// For GatewayStaticAddresses: one address of the router's pool,
			// one outside it.
			UsableNetworkAddresses:   []gatewayv1.GatewaySpecAddress{{Type: ptrTo(gatewayv1.IPAddressType), Value: "198.18.254.200"}},
			UnusableNetworkAddresses: []gatewayv1.GatewaySpecAddress{{Type: ptrTo(gatewayv1.IPAddressType), Value: "203.0.113.200"}},
			Implementation:           implementation,
		},
		Client:     cl,
		Clientset:  testCluster.Client,
		RestConfig: testCluster.RESTConfig,
		ManifestFS: []fs.FS{&conformance.Manifests},
		Hook: func(t *testing.T, test suite.ConformanceTest, _ *suite.ConformanceTestSuite) {
			res := outcome(t)
			mu.Lock()
			results[test.ShortName] = res
			mu.Unlock()
		},
	}
	s, err := suite.NewConformanceTestSuite(opts)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	// The suite reports only once its own cleanup has run; cleanups run
	// last-registered first, so this one, registered before the suite's,
	// runs after them.
	t.Cleanup(func() {
		report, err := s.Report()
		if err != nil {
			t.Errorf("the conformance report: %v", err)
			return
		}
		mu.Lock()
		defer mu.Unlock()
		writeReport(t, results, report, time.Since(start))
	})
	s.Setup(t, tests.ConformanceTests)
	if err := s.Run(t, tests.ConformanceTests); err != nil {
		t.Fatal(err)
	}
}

// coreFeatures are the features of the Core HTTPRoute tests: a test that
// needs no other is Core.
var coreFeatures = []features.FeatureName{features.SupportGateway, features.SupportHTTPRoute, features.SupportReferenceGrant}

// writeReport logs and writes the results: every test by outcome, Core
// (needing only Gateway, HTTPRoute and ReferenceGrant) apart from
// Extended, and the suite's own report.
func writeReport(t *testing.T, results map[string]string, report *confv1.ConformanceReport, elapsed time.Duration) {
	byName := map[string]suite.ConformanceTest{}
	for _, ct := range tests.ConformanceTests {
		byName[ct.ShortName] = ct
	}
	isCore := func(name string) bool {
		for _, f := range byName[name].Features {
			if !slices.Contains(coreFeatures, f) {
				return false
			}
		}
		return true
	}
	var b strings.Builder
	fmt.Fprintf(&b, "Gateway API conformance (sigs.k8s.io/gateway-api/conformance %s), %s, %s\n",
		report.GatewayAPIVersion, time.Now().UTC().Format("2006-01-02"), elapsed.Round(time.Second))
	for _, group := range []struct {
		title string
		core  bool
	}{{"Core", true}, {"Extended", false}} {
		counts := map[string][]string{}
		for _, name := range slices.Sorted(maps.Keys(results)) {
			if isCore(name) == group.core {
				counts[results[name]] = append(counts[results[name]], name)
			}
		}
		fmt.Fprintf(&b, "%s: %d passed, %d failed, %d skipped\n", group.title, len(counts["PASS"]), len(counts["FAIL"]), len(counts["SKIP"]))
		for _, res := range []string{"PASS", "FAIL", "SKIP"} {
			for _, name := range counts[res] {
				var feats []string
				for _, f := range byName[name].Features {
					feats = append(feats, string(f))
				}
				fmt.Fprintf(&b, "  %s %s [%s]\n", res, name, strings.Join(feats, ","))
			}
		}
	}
	raw, err := yaml.Marshal(report)
	if err != nil {
		t.Fatal(err)
	}
	summary := b.String()
	t.Logf("conformance results:\n%s", summary)
	path := os.Getenv(reportEnv)
	if path == "" {
		path = filepath.Join(testCluster.Dir, "conformance.txt")
	}
	if err := os.WriteFile(path, []byte(summary+"\n"+string(raw)), 0o644); err != nil {
		t.Errorf("writing the conformance report: %v", err)
	}
	t.Logf("conformance report written to %s", path)
}

func ptrTo[T any](v T) *T { return &v }
