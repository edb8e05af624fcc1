package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	yamlutil "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// Run starts a program against the cluster (a Capstan component under test)
// with its output in the cluster's log folder. Cluster.Stop stops it too.
func (c *Cluster) Run(name, path string, args ...string) (*Process, error) {
	return c.RunWithEnv(name, path, nil, args...)
}

// RunWithEnv is Run with environment variables ("NAME=value") added to the
// harness's own.
func (c *Cluster) RunWithEnv(name, path string, env []string, args ...string) (*Process, error) {
	p := newProcess(name, filepath.Join(c.Dir, "logs"), path, args...)
	p.env = env
	if err := p.start(); err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.others = append(c.others, p)
	c.mu.Unlock()
	return p, nil
}

// WaitHealthy polls url until it answers 200, failing early with the end of the
// process's log if it exits. TLS certificates are not verified.
func (p *Process) WaitHealthy(ctx context.Context, url string, timeout time.Duration) error {
	return waitHealthy(ctx, p, url, timeout)
}

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

// ServiceAccountKubeconfig writes a kubeconfig that authenticates as the
// ServiceAccount (with a token from the TokenRequest API), so a component
// under test runs with exactly the permissions its RBAC manifests grant.
func (c *Cluster) ServiceAccountKubeconfig(ctx context.Context, namespace, name string) (string, error) {
	expiry := int64(24 * 3600)
	tr, err := c.Client.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, name,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &expiry}}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("requesting a token for ServiceAccount %s/%s: %w", namespace, name, err)
	}
	kc := clientcmdapi.NewConfig()
	kc.Clusters["capstan"] = &clientcmdapi.Cluster{Server: c.APIServerURL, CertificateAuthority: c.CAFile}
	kc.AuthInfos[name] = &clientcmdapi.AuthInfo{Token: tr.Status.Token}
	kc.Contexts["capstan"] = &clientcmdapi.Context{Cluster: "capstan", AuthInfo: name, Namespace: namespace}
	kc.CurrentContext = "capstan"
	path := filepath.Join(c.Dir, fmt.Sprintf("kubeconfig-%s-%s", namespace, name))
	return path, clientcmd.WriteToFile(*kc, path)
}
