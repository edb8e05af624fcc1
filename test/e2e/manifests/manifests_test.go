// Package manifests checks the kustomize folders a user installs from:
// manifests/default and the examples are applied to a real API server, which
// validates every object (RBAC, APIServices, the Gateway API objects against
// their CRDs), and the folders are checked against each other and against
// what the components read.
package manifests

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/wait"
	inferencev1 "sigs.k8s.io/gateway-api-inference-extension/api/v1"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/kustomize/api/krusty"
	kresource "sigs.k8s.io/kustomize/api/resource"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/metricsadapter/provider"
	"github.com/capstan-dev/capstan/router/inferencepool"
	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/components"
)

var testCluster *cluster.Cluster

func TestMain(m *testing.M) {
	for _, locate := range []func() error{components.LocateGatewayAPICRDs, components.LocateInferencePoolCRD} {
		if err := locate(); err != nil {
			fmt.Fprintln(os.Stderr, "FAIL:", err)
			os.Exit(1)
		}
	}
	os.Exit(cluster.RunTests(m, cluster.Config{WithoutScheduler: true}, &testCluster))
}

// render builds a manifests folder, failing the test if kustomize cannot.
func render(t *testing.T, dir string) []*kresource.Resource {
	t.Helper()
	resources, err := components.Render(dir)
	if err != nil {
		t.Fatal(err)
	}
	return resources
}

func stream(t *testing.T, resources []*kresource.Resource) *bytes.Buffer {
	t.Helper()
	y, err := components.YAML(resources)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.NewBuffer(y)
}

// decode is components.Decode, failing the test on an error.
func decode[T any](t *testing.T, resources []*kresource.Resource, kind string) []T {
	t.Helper()
	out, err := components.Decode[T](resources, kind)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func ids(resources []*kresource.Resource) []string {
	var out []string
	for _, r := range resources {
		out = append(out, r.CurId().String())
	}
	slices.Sort(out)
	return out
}

// manifests/default is exactly the three standalone installs together, and
// every installable folder brings the namespace once.
func TestDefaultIsTheThreeComponents(t *testing.T) {
	def := render(t, "default")
	var union []*kresource.Resource
	seen := map[string]bool{}
	for _, dir := range []string{"router", "metricsadapter", "scheduler"} {
		for _, r := range render(t, dir) {
			id := r.CurId().String()
			if !seen[id] {
				seen[id] = true
				union = append(union, r)
			}
		}
	}
	if got, want := ids(def), ids(union); !slices.Equal(got, want) {
		t.Errorf("manifests/default has\n  %v\nthe standalone folders together have\n  %v", got, want)
	}
	byID := map[string]string{}
	for _, r := range union {
		y, _ := r.AsYAML()
		byID[r.CurId().String()] = string(y)
	}
	for _, r := range def {
		y, _ := r.AsYAML()
		if want := byID[r.CurId().String()]; want != "" && string(y) != want {
			t.Errorf("%s differs between manifests/default and its component folder:\n%s\nvs\n%s", r.CurId(), y, want)
		}
	}
	for _, dir := range []string{"default", "router", "router/gateway", "metricsadapter", "scheduler"} {
		namespaces := decode[corev1.Namespace](t, render(t, dir), "Namespace")
		if len(namespaces) != 1 || namespaces[0].Name != components.Namespace {
			t.Errorf("manifests/%s: want the one Namespace %s, got %d", dir, components.Namespace, len(namespaces))
		}
	}
	for _, d := range decode[appsv1.Deployment](t, def, "Deployment") {
		image := d.Spec.Template.Spec.Containers[0].Image
		if !strings.HasPrefix(image, "ghcr.io/capstan-dev/"+d.Name+":v") {
			t.Errorf("Deployment %s runs image %s", d.Name, image)
		}
		if d.Labels["app.kubernetes.io/part-of"] != "capstan" {
			t.Errorf("Deployment %s lacks app.kubernetes.io/part-of=capstan", d.Name)
		}
	}
}

// renderWithComponent builds an overlay of one manifests folder and one
// component, as a user's kustomization would.
func renderWithComponent(t *testing.T, dir, component string) []*kresource.Resource {
	t.Helper()
	root, err := cluster.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	overlay := t.TempDir()
	// kustomize takes relative paths only.
	base, err := filepath.Rel(overlay, filepath.Join(root, "manifests"))
	if err != nil {
		t.Fatal(err)
	}
	kustomization := fmt.Sprintf("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [%s]\ncomponents: [%s]\n",
		filepath.Join(base, dir), filepath.Join(base, component))
	if err := os.WriteFile(filepath.Join(overlay, "kustomization.yaml"), []byte(kustomization), 0o644); err != nil {
		t.Fatal(err)
	}
	resMap, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), overlay)
	if err != nil {
		t.Fatalf("kustomize build of manifests/%s with %s: %v", dir, component, err)
	}
	return resMap.Resources()
}

// The cert-manager component, added to manifests/default as its comment says,
// issues the adapter's serving certificate and has the CA injected into both
// APIServices.
func TestCertManagerComponent(t *testing.T) {
	resources := renderWithComponent(t, "default", "metricsadapter/cert-manager")
	const inject = "cert-manager.io/inject-ca-from"
	for _, r := range resources {
		if r.GetKind() == "APIService" && r.GetAnnotations()[inject] != components.Namespace+"/capstan-metrics-adapter" {
			t.Errorf("APIService %s: %s=%q", r.GetName(), inject, r.GetAnnotations()[inject])
		}
	}
	if !slices.ContainsFunc(resources, func(r *kresource.Resource) bool {
		if r.GetKind() != "Certificate" || r.GetNamespace() != components.Namespace {
			return false
		}
		secret, _ := r.GetString("spec.secretName")
		return secret == "capstan-metrics-adapter-tls"
	}) {
		t.Error("the cert-manager component issues no certificate into the Secret capstan-metrics-adapter-tls")
	}
}

// The API server accepts all of manifests/default and the examples, and the
// examples fit together: each model Service selects its Deployment's pods
// and carries their model, each Deployment asks for capstan-scheduler, each
// HPA targets a Deployment and asks for metrics the adapter serves, and each
// HTTPRoute sends to a Service that exists.
func TestDefaultAndExamplesApply(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := components.InstallGatewayAPICRDs(ctx, testCluster); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{"default", "router/gateway", "examples"} {
		if err := testCluster.Apply(ctx, "default", stream(t, render(t, dir))); err != nil {
			t.Fatalf("applying manifests/%s: %v", dir, err)
		}
	}

	examples := render(t, "examples")
	deployments := decode[appsv1.Deployment](t, examples, "Deployment")
	services := decode[corev1.Service](t, examples, "Service")
	if len(deployments) == 0 || len(services) == 0 {
		t.Fatal("the examples have no Deployment or no Service")
	}
	byName := map[string]appsv1.Deployment{}
	for _, d := range deployments {
		byName[d.Name] = d
		pod := d.Spec.Template
		if pod.Spec.SchedulerName != "capstan-scheduler" {
			t.Errorf("Deployment %s: schedulerName %q", d.Name, pod.Spec.SchedulerName)
		}
		if modelserver.Model(pod.Labels) == "" {
			t.Errorf("Deployment %s: pods have no %s label", d.Name, modelserver.ModelLabel)
		}
		if !slices.ContainsFunc(services, func(s corev1.Service) bool {
			return labels.SelectorFromSet(s.Spec.Selector).Matches(labels.Set(pod.Labels)) &&
				modelserver.Model(s.Labels) == modelserver.Model(pod.Labels)
		}) {
			t.Errorf("Deployment %s: no Service labelled with its model selects its pods", d.Name)
		}
	}
	served := catalogue.Builtin()
	for _, hpa := range decode[autoscalingv2.HorizontalPodAutoscaler](t, examples, "HorizontalPodAutoscaler") {
		if _, ok := byName[hpa.Spec.ScaleTargetRef.Name]; !ok || hpa.Spec.ScaleTargetRef.Kind != "Deployment" {
			t.Errorf("HPA %s targets %s %s, not an example Deployment", hpa.Name, hpa.Spec.ScaleTargetRef.Kind, hpa.Spec.ScaleTargetRef.Name)
		}
		for _, m := range hpa.Spec.Metrics {
			var name string
			switch m.Type {
			case autoscalingv2.ObjectMetricSourceType:
				name = m.Object.Metric.Name
			case autoscalingv2.PodsMetricSourceType:
				name = m.Pods.Metric.Name
			default:
				continue
			}
			if _, ok := served.Lookup(name); !ok && name != provider.RequestsDemand {
				t.Errorf("HPA %s asks for %q, which the metrics adapter does not serve", hpa.Name, name)
			}
		}
	}
	for _, route := range decode[gatewayv1.HTTPRoute](t, examples, "HTTPRoute") {
		for _, rule := range route.Spec.Rules {
			for _, ref := range rule.BackendRefs {
				if !slices.ContainsFunc(services, func(s corev1.Service) bool { return s.Name == string(ref.Name) }) {
					t.Errorf("HTTPRoute %s sends to Service %s, which the examples lack", route.Name, ref.Name)
				}
			}
		}
	}
}

// The InferencePool example, which is not part of the examples'
// kustomization, applies with the InferencePool CRD beside the examples: its
// pool selects an example Deployment's pods on their container port, and its
// route sends to the pool through the examples' Gateway.
func TestInferencePoolExample(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := components.InstallGatewayAPICRDs(ctx, testCluster); err != nil {
		t.Fatal(err)
	}
	uninstall, err := components.InstallInferencePoolCRD(ctx, testCluster)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := uninstall(context.Background()); err != nil {
			t.Error(err)
		}
	}()
	root, err := cluster.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(root, "manifests", "examples", "inferencepool.yaml")
	if err := testCluster.Apply(ctx, "default", stream(t, render(t, "examples"))); err != nil {
		t.Fatalf("applying manifests/examples: %v", err)
	}
	if err := testCluster.ApplyFile(ctx, "", file); err != nil {
		t.Fatalf("applying %s: %v", file, err)
	}
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var pool inferencev1.InferencePool
	var route gatewayv1.HTTPRoute
	for _, doc := range strings.Split(string(data), "\n---\n") {
		switch {
		case strings.Contains(doc, "kind: InferencePool"):
			err = yaml.Unmarshal([]byte(doc), &pool)
		case strings.Contains(doc, "kind: HTTPRoute"):
			err = yaml.Unmarshal([]byte(doc), &route)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	examples := render(t, "examples")
	selected := false
	for _, d := range decode[appsv1.Deployment](t, examples, "Deployment") {
		pod := d.Spec.Template
		if d.Namespace != pool.Namespace || !inferencepool.Selector(&pool).Matches(labels.Set(pod.Labels)) {
			continue
		}
		selected = true
		for _, port := range pool.Spec.TargetPorts {
			if !slices.ContainsFunc(pod.Spec.Containers[0].Ports, func(p corev1.ContainerPort) bool { return p.ContainerPort == int32(port.Number) }) {
				t.Errorf("Deployment %s has no container port %d, a target port of InferencePool %s", d.Name, port.Number, pool.Name)
			}
		}
	}
	if !selected {
		t.Errorf("InferencePool %s selects no example Deployment's pods", pool.Name)
	}
	gateways := decode[gatewayv1.Gateway](t, examples, "Gateway")
	for _, p := range route.Spec.ParentRefs {
		if !slices.ContainsFunc(gateways, func(g gatewayv1.Gateway) bool { return g.Name == string(p.Name) && g.Namespace == route.Namespace }) {
			t.Errorf("HTTPRoute %s has parent %s, which the examples lack", route.Name, p.Name)
		}
	}
	for _, rule := range route.Spec.Rules {
		for _, ref := range rule.BackendRefs {
			if ref.Group == nil || string(*ref.Group) != inferencev1.GroupName || ref.Kind == nil || *ref.Kind != "InferencePool" || string(ref.Name) != pool.Name {
				t.Errorf("HTTPRoute %s sends to %v, not InferencePool %s", route.Name, ref.BackendObjectReference, pool.Name)
			}
		}
	}
}

// The gateway-scoped-secrets component, applied over manifests/router/gateway,
// leaves the router able to read Secrets only in the certificates namespace,
// and runs it with the flag that watches only there.
func TestGatewayScopedSecretsComponent(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := components.InstallGatewayAPICRDs(ctx, testCluster); err != nil {
		t.Fatal(err)
	}
	resources := renderWithComponent(t, "router/gateway", "components/gateway-scoped-secrets")
	for _, d := range decode[appsv1.Deployment](t, resources, "Deployment") {
		if d.Name == "capstan-router" && !slices.Contains(d.Spec.Template.Spec.Containers[0].Args, "--gateway-secret-namespaces=capstan-gateway-certs") {
			t.Errorf("the router runs with %v, without --gateway-secret-namespaces=capstan-gateway-certs", d.Spec.Template.Spec.Containers[0].Args)
		}
	}
	if err := testCluster.Apply(ctx, "default", stream(t, resources)); err != nil {
		t.Fatal(err)
	}
	user := "system:serviceaccount:" + components.Namespace + ":capstan-router"
	allowed := func(namespace, verb string) bool {
		review, err := testCluster.Client.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authorizationv1.SubjectAccessReview{
			Spec: authorizationv1.SubjectAccessReviewSpec{User: user, Groups: []string{"system:serviceaccounts"},
				ResourceAttributes: &authorizationv1.ResourceAttributes{Namespace: namespace, Resource: "secrets", Verb: verb}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return review.Status.Allowed
	}
	// The API server's RBAC authorizer sees new Roles and RoleBindings
	// through its own informers, a moment after they were applied: the
	// grants are awaited, and only then are the refusals checked, once.
	for _, verb := range []string{"get", "watch"} {
		if err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 10*time.Second, true, func(context.Context) (bool, error) {
			return allowed("capstan-gateway-certs", verb), nil
		}); err != nil {
			t.Errorf("%s secrets in namespace %q: still not allowed: %v", verb, "capstan-gateway-certs", err)
		}
	}
	for _, check := range []struct{ namespace, verb string }{
		{"default", "get"},
		{components.Namespace, "list"},
		{"", "list"}, // cluster-wide
	} {
		if allowed(check.namespace, check.verb) {
			t.Errorf("%s secrets in namespace %q: allowed, want refused", check.verb, check.namespace)
		}
	}
}
