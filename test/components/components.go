// Package components runs Capstan's three programs against a local cluster
// the way their manifests install them in a real one: it builds
// manifests/<component> with kustomize, applies everything but the
// Deployment (kwok would only pretend to run its pod), and starts the freshly
// built binary with the Deployment's arguments, authenticated as the
// manifests' ServiceAccount so it has exactly their RBAC. The demo and the
// e2e suites use it, and its Render, YAML and Decode to read the manifests.
package components

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	apiregistrationv1 "k8s.io/kube-aggregator/pkg/apis/apiregistration/v1"
	aggregator "k8s.io/kube-aggregator/pkg/client/clientset_generated/clientset"
	schedv1 "k8s.io/kube-scheduler/config/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/kustomize/api/krusty"
	kresource "sigs.k8s.io/kustomize/api/resource"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/capstan-dev/capstan/test/cluster"
)

// Namespace is where every component's manifests install it.
const Namespace = "capstan-system"

// Component is one running Capstan program.
type Component struct {
	*cluster.Process
	// URL is where it serves /healthz, /readyz and /metrics; for the
	// router, the API.
	URL string
	// AdminURL is where the router serves /healthz, /readyz and /metrics
	// (--admin-bind-address); "" for the other components.
	AdminURL string
}

// Render builds manifests/<name> with kustomize, as `kubectl apply -k` would.
func Render(name string) ([]*kresource.Resource, error) {
	root, err := cluster.RepoRoot()
	if err != nil {
		return nil, err
	}
	resMap, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), filepath.Join(root, "manifests", name))
	if err != nil {
		return nil, fmt.Errorf("kustomize build manifests/%s: %w", name, err)
	}
	return resMap.Resources(), nil
}

// YAML joins resources into one YAML stream, as kubectl apply reads it.
func YAML(resources []*kresource.Resource) ([]byte, error) {
	var b bytes.Buffer
	for _, r := range resources {
		y, err := r.AsYAML()
		if err != nil {
			return nil, err
		}
		b.WriteString("---\n")
		b.Write(y)
	}
	return b.Bytes(), nil
}

// Decode unmarshals every rendered resource of a kind into T, strictly, so
// a field the API does not have (a typo in a manifest) is an error.
func Decode[T any](resources []*kresource.Resource, kind string) ([]T, error) {
	var out []T
	for _, r := range resources {
		if r.GetKind() != kind {
			continue
		}
		y, err := r.AsYAML()
		if err != nil {
			return nil, err
		}
		var obj T
		if err := yaml.UnmarshalStrict(y, &obj); err != nil {
			return nil, fmt.Errorf("%s %s: %w", kind, r.GetName(), err)
		}
		out = append(out, obj)
	}
	return out, nil
}

// DeploymentCommand returns what the one Deployment in rendered manifests
// runs its container with: the arguments, and the environment variables it
// sets with a value (such as the Go runtime's GOGC) as NAME=value.
func DeploymentCommand(resources []*kresource.Resource) (args, env []string, err error) {
	c, err := deploymentContainer(resources)
	if err != nil {
		return nil, nil, err
	}
	for _, e := range c.Env {
		value := e.Value
		switch {
		case e.ValueFrom == nil:
		case e.ValueFrom.ResourceFieldRef != nil:
			if value, err = resourceField(c, e.ValueFrom.ResourceFieldRef); err != nil {
				return nil, nil, fmt.Errorf("container %s: env %s: %w", c.Name, e.Name, err)
			}
		default:
			return nil, nil, fmt.Errorf("container %s: env %s comes from a source the harness does not resolve", c.Name, e.Name)
		}
		env = append(env, e.Name+"="+value)
	}
	return c.Args, env, nil
}

// resourceField resolves a downward-API resource field of the container's
// own resources as the kubelet does: the quantity divided by the divisor
// (default 1), rounded up.
func resourceField(c corev1.Container, ref *corev1.ResourceFieldSelector) (string, error) {
	kind, name, ok := strings.Cut(ref.Resource, ".")
	if !ok || (kind != "limits" && kind != "requests") {
		return "", fmt.Errorf("resource %q is not limits.<name> or requests.<name>", ref.Resource)
	}
	list := c.Resources.Limits
	if kind == "requests" {
		list = c.Resources.Requests
	}
	q, ok := list[corev1.ResourceName(name)]
	if !ok {
		return "", fmt.Errorf("the container sets no %s", ref.Resource)
	}
	divisor := int64(1)
	if !ref.Divisor.IsZero() {
		divisor = ref.Divisor.Value()
	}
	return strconv.FormatInt((q.Value()+divisor-1)/divisor, 10), nil
}

func deploymentContainer(resources []*kresource.Resource) (corev1.Container, error) {
	ds, err := Decode[appsv1.Deployment](resources, "Deployment")
	if err != nil {
		return corev1.Container{}, err
	}
	if len(ds) != 1 {
		return corev1.Container{}, fmt.Errorf("the manifests have %d Deployments, want 1", len(ds))
	}
	return ds[0].Spec.Template.Spec.Containers[0], nil
}

// Install applies the rendered resources into Namespace, but those of the
// kinds skipped, and returns the Deployment's container arguments and
// environment, so that a test can run the binary the way the Deployment
// would.
func Install(ctx context.Context, c *cluster.Cluster, resources []*kresource.Resource, skip ...string) (args, env []string, err error) {
	if args, env, err = DeploymentCommand(resources); err != nil {
		return nil, nil, err
	}
	var keep []*kresource.Resource
	for _, r := range resources {
		if !slices.Contains(skip, r.GetKind()) {
			keep = append(keep, r)
		}
	}
	stream, err := YAML(keep)
	if err != nil {
		return nil, nil, err
	}
	return args, env, c.Apply(ctx, Namespace, bytes.NewReader(stream))
}

// StartAdapter runs capstan-metrics-adapter on a loopback port with a serving
// certificate from the cluster CA, and points the manifests' APIServices at
// it through an ExternalName Service with that CA as their caBundle. It
// returns once the APIServices are Available.
func StartAdapter(ctx context.Context, c *cluster.Cluster, extra ...string) (*Component, error) {
	const name = "capstan-metrics-adapter"
	resources, err := Render("metricsadapter")
	if err != nil {
		return nil, err
	}
	args, env, err := Install(ctx, c, resources, "Deployment", "Service", "APIService")
	if err != nil {
		return nil, err
	}
	certFile, keyFile, err := c.IssueServingCert(name, name+"."+Namespace+".svc", "localhost", "127.0.0.1")
	if err != nil {
		return nil, err
	}
	port, err := cluster.FreePort()
	if err != nil {
		return nil, err
	}
	kubeconfig, err := c.ServiceAccountKubeconfig(ctx, Namespace, name)
	if err != nil {
		return nil, err
	}
	bin, err := cluster.Binary(name)
	if err != nil {
		return nil, err
	}
	args = append(append(args, "--kubeconfig="+kubeconfig, "--bind-address=127.0.0.1",
		"--secure-port="+strconv.Itoa(port), "--tls-cert-file="+certFile, "--tls-private-key-file="+keyFile), extra...)
	p, err := c.RunWithEnv(name, bin, env, args...)
	if err != nil {
		return nil, err
	}
	url := "https://127.0.0.1:" + strconv.Itoa(port)
	if err := p.WaitHealthy(ctx, url+"/readyz", time.Minute); err != nil {
		return nil, err
	}

	svc := fmt.Sprintf("apiVersion: v1\nkind: Service\nmetadata: {name: %s, namespace: %s}\nspec: {type: ExternalName, externalName: localhost}\n", name, Namespace)
	if err := c.Apply(ctx, Namespace, bytes.NewBufferString(svc)); err != nil {
		return nil, err
	}
	agg, err := aggregator.NewForConfig(c.RESTConfig)
	if err != nil {
		return nil, err
	}
	apiServices, err := Decode[apiregistrationv1.APIService](resources, "APIService")
	if err != nil {
		return nil, err
	}
	for _, s := range apiServices {
		s.Spec.CABundle = c.CABundle()
		s.Spec.Service.Port = ptr.To(int32(port))
		out, err := yaml.Marshal(&s)
		if err != nil {
			return nil, err
		}
		if err := c.Apply(ctx, "", bytes.NewReader(out)); err != nil {
			return nil, err
		}
		err = c.WaitFor(ctx, time.Minute, "APIService "+s.Name+" to be Available", func(ctx context.Context) (bool, error) {
			got, err := agg.ApiregistrationV1().APIServices().Get(ctx, s.Name, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			for _, cond := range got.Status.Conditions {
				if cond.Type == apiregistrationv1.Available {
					return cond.Status == apiregistrationv1.ConditionTrue, nil
				}
			}
			return false, nil
		})
		if err != nil {
			return nil, p.Failure(err.Error())
		}
	}
	return &Component{Process: p, URL: url}, nil
}

// SchedulerConfig returns the KubeSchedulerConfiguration in the ConfigMap of
// rendered manifests/scheduler, decoded strictly.
func SchedulerConfig(resources []*kresource.Resource) (*schedv1.KubeSchedulerConfiguration, error) {
	for _, r := range resources {
		if r.GetKind() != "ConfigMap" || !strings.HasPrefix(r.GetName(), "capstan-scheduler-config") {
			continue
		}
		var cfg schedv1.KubeSchedulerConfiguration
		if err := yaml.UnmarshalStrict([]byte(r.GetDataMap()["config.yaml"]), &cfg); err != nil {
			return nil, fmt.Errorf("ConfigMap %s config.yaml: %w", r.GetName(), err)
		}
		return &cfg, nil
	}
	return nil, fmt.Errorf("manifests/scheduler has no capstan-scheduler-config ConfigMap")
}

// StartScheduler runs capstan-scheduler with the configuration in the
// manifests' ConfigMap, and returns once it holds its leader-election lease.
func StartScheduler(ctx context.Context, c *cluster.Cluster, extra ...string) (*Component, error) {
	const name = "capstan-scheduler"
	resources, err := Render("scheduler")
	if err != nil {
		return nil, err
	}
	_, env, err := Install(ctx, c, resources, "Deployment")
	if err != nil {
		return nil, err
	}
	cfg, err := SchedulerConfig(resources)
	if err != nil {
		return nil, err
	}
	kubeconfig, err := c.ServiceAccountKubeconfig(ctx, Namespace, name)
	if err != nil {
		return nil, err
	}
	// In a pod the scheduler uses its mounted token; here the same
	// ServiceAccount's token in a kubeconfig.
	cfg.ClientConnection.Kubeconfig = kubeconfig
	data, err := yaml.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	configPath := filepath.Join(c.Dir, name+".yaml")
	if err := os.WriteFile(configPath, data, 0o600); err != nil {
		return nil, err
	}
	port, err := cluster.FreePort()
	if err != nil {
		return nil, err
	}
	bin, err := cluster.Binary(name)
	if err != nil {
		return nil, err
	}
	p, err := c.RunWithEnv(name, bin, env, append([]string{"--config=" + configPath,
		"--bind-address=127.0.0.1", "--secure-port=" + strconv.Itoa(port),
		"--authentication-kubeconfig=" + kubeconfig, "--authorization-kubeconfig=" + kubeconfig}, extra...)...)
	if err != nil {
		return nil, err
	}
	url := "https://127.0.0.1:" + strconv.Itoa(port)
	if err := p.WaitHealthy(ctx, url+"/readyz", time.Minute); err != nil {
		return nil, err
	}
	lease := cfg.LeaderElection.ResourceName
	err = c.WaitFor(ctx, time.Minute, name+" to hold its lease", func(ctx context.Context) (bool, error) {
		l, err := c.Client.CoordinationV1().Leases(Namespace).Get(ctx, lease, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return false, nil
		}
		return err == nil && ptr.Deref(l.Spec.HolderIdentity, "") != "", err
	})
	if err != nil {
		return nil, p.Failure(err.Error())
	}
	return &Component{Process: p, URL: url}, nil
}
