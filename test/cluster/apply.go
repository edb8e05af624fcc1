package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	yamlutil "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
)

// Apply creates or updates every object in a multi-document YAML stream with
// server-side apply, as `kubectl apply --server-side` would. Objects without a
// namespace that need one go into defaultNamespace.
func (c *Cluster) Apply(ctx context.Context, defaultNamespace string, manifests io.Reader) error {
	return c.apply(ctx, defaultNamespace, manifests, nil)
}

// ApplyFile is Apply for a file.
func (c *Cluster) ApplyFile(ctx context.Context, defaultNamespace, path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := c.Apply(ctx, defaultNamespace, bytes.NewReader(data)); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// DryRunApply sends every object to the API server with dryRun=All, so the
// server validates it (schema, admission, references to missing kinds)
// without storing anything.
func (c *Cluster) DryRunApply(ctx context.Context, defaultNamespace string, manifests io.Reader) error {
	return c.apply(ctx, defaultNamespace, manifests, []string{metav1.DryRunAll})
}

func (c *Cluster) apply(ctx context.Context, defaultNamespace string, manifests io.Reader, dryRun []string) error {
	dyn, err := dynamic.NewForConfig(c.RESTConfig)
	if err != nil {
		return err
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(c.Client.Discovery()))
	decoder := yamlutil.NewYAMLOrJSONDecoder(manifests, 4096)
	for {
		obj := &unstructured.Unstructured{}
		if err := decoder.Decode(&obj.Object); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("decoding manifest: %w", err)
		}
		if len(obj.Object) == 0 {
			continue
		}
		gvk := obj.GroupVersionKind()
		mapping, err := mapper.RESTMapping(schema.GroupKind{Group: gvk.Group, Kind: gvk.Kind}, gvk.Version)
		if err != nil {
			return fmt.Errorf("%s %s: %w", gvk.Kind, obj.GetName(), err)
		}
		var res dynamic.ResourceInterface = dyn.Resource(mapping.Resource)
		if mapping.Scope.Name() == "namespace" {
			if obj.GetNamespace() == "" {
				obj.SetNamespace(defaultNamespace)
			}
			res = dyn.Resource(mapping.Resource).Namespace(obj.GetNamespace())
		}
		_, err = res.Apply(ctx, obj.GetName(), obj, metav1.ApplyOptions{FieldManager: "capstan-e2e", Force: true, DryRun: dryRun})
		if err != nil {
			return fmt.Errorf("applying %s %s/%s: %w", gvk.Kind, obj.GetNamespace(), obj.GetName(), err)
		}
	}
}
