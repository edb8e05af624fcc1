package components

import (
	"context"
	"fmt"
	"os"
	"slices"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiextensionsclient "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/capstan-dev/capstan/test/cluster"
)

// inferencePoolCRDEnv carries the InferencePool CRD's path into the network
// namespace, where the go command is better left alone.
const inferencePoolCRDEnv = "CAPSTAN_INFERENCEPOOL_CRD"

// inferencePoolCRD is the name of the Gateway API Inference Extension's
// InferencePool CRD.
const inferencePoolCRD = "inferencepools.inference.networking.k8s.io"

// LocateInferencePoolCRD finds the InferencePool CRD of the
// gateway-api-inference-extension module version go.mod pins, in the module
// cache, for InstallInferencePoolCRD. A TestMain calls it before
// cluster.RunTests re-runs the tests inside the network namespace.
func LocateInferencePoolCRD() error {
	return locateInModule(inferencePoolCRDEnv, "sigs.k8s.io/gateway-api-inference-extension",
		"config/crd/bases/inference.networking.k8s.io_inferencepools.yaml")
}

// InstallInferencePoolCRD applies the InferencePool CRD LocateInferencePoolCRD
// found and waits until it is established. The returned function deletes
// it again (and every InferencePool with it) and waits until it is gone, so
// that routers started afterwards find the API not served.
func InstallInferencePoolCRD(ctx context.Context, c *cluster.Cluster) (uninstall func(context.Context) error, err error) {
	file := os.Getenv(inferencePoolCRDEnv)
	if file == "" {
		return nil, fmt.Errorf("no InferencePool CRD (call LocateInferencePoolCRD from TestMain)")
	}
	ext, err := apiextensionsclient.NewForConfig(c.RESTConfig)
	if err != nil {
		return nil, err
	}
	if err := c.ApplyFile(ctx, "", file); err != nil {
		return nil, err
	}
	crds := ext.ApiextensionsV1().CustomResourceDefinitions()
	uninstall = func(ctx context.Context) error {
		if err := crds.Delete(ctx, inferencePoolCRD, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return err
		}
		return c.WaitFor(ctx, time.Minute, "the InferencePool CRD to be deleted", func(ctx context.Context) (bool, error) {
			_, err := crds.Get(ctx, inferencePoolCRD, metav1.GetOptions{})
			if apierrors.IsNotFound(err) {
				return true, nil
			}
			return false, err
		})
	}
	err = c.WaitFor(ctx, time.Minute, "the InferencePool CRD to be established", func(ctx context.Context) (bool, error) {
		crd, err := crds.Get(ctx, inferencePoolCRD, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		return slices.ContainsFunc(crd.Status.Conditions, func(cond apiextensionsv1.CustomResourceDefinitionCondition) bool {
			return cond.Type == apiextensionsv1.Established && cond.Status == apiextensionsv1.ConditionTrue
		}), nil
	})
	if err != nil {
		return nil, err
	}
	// The CRD is established before discovery serves its group version,
	// and the router asks discovery once, at start.
	return uninstall, c.WaitFor(ctx, time.Minute, "discovery to serve inferencepools", func(ctx context.Context) (bool, error) {
		list, err := c.Client.Discovery().ServerResourcesForGroupVersion("inference.networking.k8s.io/v1")
		if err != nil {
			return false, nil
		}
		return slices.ContainsFunc(list.APIResources, func(r metav1.APIResource) bool { return r.Name == "inferencepools" }), nil
	})
}
