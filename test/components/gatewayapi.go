package components

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiextensionsclient "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/capstan-dev/capstan/test/cluster"
)

// gatewayAPICRDsEnv carries the Gateway API CRD folder into the network
// namespace, where the go command is better left alone.
const gatewayAPICRDsEnv = "CAPSTAN_GATEWAY_API_CRDS"

// LocateGatewayAPICRDs finds the standard-channel CRDs of the gateway-api
// module version go.mod pins, in the module cache, for
// InstallGatewayAPICRDs. A TestMain calls it before cluster.RunTests re-runs
// the tests inside the network namespace.
func LocateGatewayAPICRDs() error {
	return locateInModule(gatewayAPICRDsEnv, "sigs.k8s.io/gateway-api", "config/crd/standard")
}

// locateInModule finds path in the module cache's copy of the module
// version go.mod pins and puts it in the environment variable env, for the
// tests the harness re-runs inside the network namespace; it does nothing
// when env is already set.
func locateInModule(env, module, path string) error {
	if os.Getenv(env) != "" {
		return nil
	}
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", module).Output()
	if err != nil {
		return fmt.Errorf("locating the %s module: %w", module, err)
	}
	found := filepath.Join(strings.TrimSpace(string(out)), filepath.FromSlash(path))
	if _, err := os.Stat(found); err != nil {
		return fmt.Errorf("the %s module has no %s: %w", module, path, err)
	}
	return os.Setenv(env, found)
}

// InstallGatewayAPICRDs applies the standard-channel CRDs LocateGatewayAPICRDs
// found and waits until they are established.
func InstallGatewayAPICRDs(ctx context.Context, c *cluster.Cluster) error {
	dir := os.Getenv(gatewayAPICRDsEnv)
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil || len(files) == 0 {
		return fmt.Errorf("no Gateway API CRDs in %q (call LocateGatewayAPICRDs from TestMain): %v", dir, err)
	}
	for _, f := range files {
		if err := c.ApplyFile(ctx, "", f); err != nil {
			return err
		}
	}
	ext, err := apiextensionsclient.NewForConfig(c.RESTConfig)
	if err != nil {
		return err
	}
	return c.WaitFor(ctx, time.Minute, "the Gateway API CRDs to be established", func(ctx context.Context) (bool, error) {
		list, err := ext.ApiextensionsV1().CustomResourceDefinitions().List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		crds := 0
		for _, crd := range list.Items {
			if crd.Spec.Group != gatewayv1.GroupName {
				continue
			}
			crds++
			if !slices.ContainsFunc(crd.Status.Conditions, func(cond apiextensionsv1.CustomResourceDefinitionCondition) bool {
				return cond.Type == apiextensionsv1.Established && cond.Status == apiextensionsv1.ConditionTrue
			}) {
				return false, nil
			}
		}
		return crds > 0, nil
	})
}
