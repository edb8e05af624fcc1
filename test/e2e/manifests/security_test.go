package manifests

import (
	"context"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	kresource "sigs.k8s.io/kustomize/api/resource"

	"github.com/capstan-dev/capstan/test/components"
)

// installable are the folders a user applies on their own.
var installable = []string{"default", "router", "router/gateway", "metricsadapter", "scheduler"}

const (
	psaEnforce        = "pod-security.kubernetes.io/enforce"
	psaEnforceVersion = "pod-security.kubernetes.io/enforce-version"
)

// warnings collects the Warning headers the API server sends.
type warnings struct {
	mu   sync.Mutex
	text []string
}

func (w *warnings) HandleWarningHeader(_ int, _ string, text string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.text = append(w.text, text)
}

func (w *warnings) take() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := w.text
	w.text = nil
	return out
}

// warningClient is an admin client whose warnings the test reads.
func warningClient(t *testing.T) (kubernetes.Interface, *warnings) {
	t.Helper()
	w := &warnings{}
	cfg := rest.CopyConfig(testCluster.RESTConfig)
	cfg.WarningHandler = w
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return client, w
}

func ofKinds(resources []*kresource.Resource, kinds ...string) []*kresource.Resource {
	var out []*kresource.Resource
	for _, r := range resources {
		if slices.Contains(kinds, r.GetKind()) {
			out = append(out, r)
		}
	}
	return out
}

// capstan-system enforces the restricted Pod Security Standard at a pinned
// version the API server knows, and audits and warns at restricted.
func TestNamespaceIsRestricted(t *testing.T) {
	ns := decode[corev1.Namespace](t, render(t, "namespace"), "Namespace")
	if len(ns) != 1 {
		t.Fatalf("manifests/namespace has %d Namespaces, want 1", len(ns))
	}
	l := ns[0].Labels
	for _, mode := range []string{"enforce", "audit", "warn"} {
		if got := l["pod-security.kubernetes.io/"+mode]; got != "restricted" {
			t.Errorf("label pod-security.kubernetes.io/%s=%q, want restricted", mode, got)
		}
	}
	pinned := regexp.MustCompile(`^v1\.(\d+)$`).FindStringSubmatch(l[psaEnforceVersion])
	if pinned == nil {
		t.Fatalf("label %s=%q, want a pinned version v1.<minor>", psaEnforceVersion, l[psaEnforceVersion])
	}
	info, err := testCluster.Client.Discovery().ServerVersion()
	if err != nil {
		t.Fatal(err)
	}
	serverMinor, err := strconv.Atoi(strings.TrimRight(info.Minor, "+"))
	if err != nil {
		t.Fatalf("server version %+v: %v", info, err)
	}
	if minor, _ := strconv.Atoi(pinned[1]); minor > serverMinor {
		t.Errorf("%s=%s is newer than the API server (%s): it would not know that version's checks",
			psaEnforceVersion, l[psaEnforceVersion], info.GitVersion)
	}
	// PodSecurity admission validates these labels when the namespace is
	// created or updated: an unknown level or malformed version is refused.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := testCluster.Apply(ctx, "", stream(t, render(t, "namespace"))); err != nil {
		t.Fatalf("the API server refuses manifests/namespace: %v", err)
	}
	got, err := testCluster.Client.CoreV1().Namespaces().Get(ctx, components.Namespace, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range l {
		if got.Labels[k] != v {
			t.Errorf("namespace %s on the server: label %s=%q, want %q", components.Namespace, k, got.Labels[k], v)
		}
	}
}

// Every Deployment any installable folder creates runs pods that
// PodSecurity admission lets into capstan-system under restricted, without
// a warning; and a pod that is not restricted is refused there, so the label
// is enforced. PodSecurity only warns about a Deployment, and enforces on
// its pods: each pod template is sent as a Pod, with a server-side dry run.
func TestDeploymentsAdmittedUnderRestricted(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	client, warned := warningClient(t)
	version := ""
	checked := map[string]bool{}
	for _, dir := range installable {
		resources := render(t, dir)
		// The namespace, with its labels, and the ServiceAccounts the pods
		// name (the ServiceAccount admission plugin refuses a pod whose
		// account does not exist).
		if err := testCluster.Apply(ctx, "", stream(t, ofKinds(resources, "Namespace", "ServiceAccount"))); err != nil {
			t.Fatalf("manifests/%s: %v", dir, err)
		}
		if version == "" {
			ns := decode[corev1.Namespace](t, resources, "Namespace")
			version = ns[0].Labels[psaEnforceVersion]
		}
		deployments := decode[appsv1.Deployment](t, resources, "Deployment")
		if len(deployments) == 0 {
			t.Errorf("manifests/%s has no Deployment", dir)
		}
		for _, d := range deployments {
			where := fmt.Sprintf("manifests/%s: Deployment %s", dir, d.Name)
			checked[d.Name] = true
			if d.Namespace != components.Namespace {
				t.Errorf("%s is in namespace %q, not %s", where, d.Namespace, components.Namespace)
				continue
			}
			pod := &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{
					Name:        d.Name + "-pod-security",
					Namespace:   d.Namespace,
					Labels:      d.Spec.Template.Labels,
					Annotations: d.Spec.Template.Annotations,
				},
				Spec: d.Spec.Template.Spec,
			}
			warned.take()
			if _, err := client.CoreV1().Pods(d.Namespace).Create(ctx, pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}}); err != nil {
				t.Errorf("%s: its pod is refused in %s: %v", where, d.Namespace, err)
			}
			if w := warned.take(); len(w) > 0 {
				t.Errorf("%s: creating its pod warns: %q", where, w)
			}
			// The Deployment itself: PodSecurity checks its template for
			// warn and audit only.
			d.Name += "-pod-security"
			d.ResourceVersion = ""
			if _, err := client.AppsV1().Deployments(d.Namespace).Create(ctx, &d, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}}); err != nil {
				t.Errorf("%s: refused: %v", where, err)
			}
			if w := warned.take(); len(w) > 0 {
				t.Errorf("%s: creating it warns: %q", where, w)
			}
		}
	}
	for _, name := range []string{"capstan-router", "capstan-metrics-adapter", "capstan-scheduler"} {
		if !checked[name] {
			t.Errorf("no installable folder has the Deployment %s", name)
		}
	}

	// Pods that restricted refuses: one with the host's namespaces, root
	// filesystem and CAP_SYS_ADMIN (privileged: true itself is refused by
	// this API server's validation, --allow-privileged=false, before
	// admission), and one that only the baseline profile would let in (no
	// securityContext at all). The refusal names the profile and the pinned
	// version.
	want := fmt.Sprintf(`violates PodSecurity "restricted:%s"`, version)
	host := corev1.PodSpec{
		HostNetwork: true,
		HostPID:     true,
		Containers: []corev1.Container{{Name: "c", Image: "registry.k8s.io/pause:3.10",
			SecurityContext: &corev1.SecurityContext{RunAsUser: ptr.To(int64(0)),
				Capabilities: &corev1.Capabilities{Add: []corev1.Capability{"SYS_ADMIN"}}},
			VolumeMounts: []corev1.VolumeMount{{Name: "root", MountPath: "/host"}}}},
		Volumes: []corev1.Volume{{Name: "root", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/"}}}},
	}
	for name, spec := range map[string]corev1.PodSpec{
		"host-access":   host,
		"baseline-only": {Containers: []corev1.Container{{Name: "c", Image: "registry.k8s.io/pause:3.10"}}},
	} {
		spec.ServiceAccountName = "capstan-router"
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "pod-security-" + name, Namespace: components.Namespace},
			Spec:       spec,
		}
		_, err := client.CoreV1().Pods(components.Namespace).Create(ctx, pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		switch {
		case err == nil:
			t.Errorf("a %s pod is admitted into %s", name, components.Namespace)
		case !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), want):
			t.Errorf("a %s pod: %v, want Forbidden: ... %s", name, err, want)
		default:
			t.Logf("a %s pod: %v", name, err)
		}
	}
}

// The sources NetworkPolicy admits to a pod's port, as the spec defines
// them: "all", or a description of each peer. isolated says whether any
// policy selects the pod for ingress (then only those sources get in).
func ingressSources(policies []networkingv1.NetworkPolicy, namespace string, podLabels map[string]string, port corev1.ContainerPort) (sources []string, isolated bool) {
	protocol := port.Protocol
	if protocol == "" {
		protocol = corev1.ProtocolTCP
	}
	for _, p := range policies {
		if p.Namespace != namespace {
			continue
		}
		selector, err := metav1.LabelSelectorAsSelector(&p.Spec.PodSelector)
		if err != nil || !selector.Matches(labels.Set(podLabels)) {
			continue
		}
		if len(p.Spec.PolicyTypes) > 0 && !slices.Contains(p.Spec.PolicyTypes, networkingv1.PolicyTypeIngress) {
			continue
		}
		isolated = true
		for _, rule := range p.Spec.Ingress {
			if len(rule.Ports) > 0 && !slices.ContainsFunc(rule.Ports, func(rp networkingv1.NetworkPolicyPort) bool {
				if ptr.Deref(rp.Protocol, corev1.ProtocolTCP) != protocol {
					return false
				}
				switch {
				case rp.Port == nil:
					return true
				case rp.Port.StrVal != "":
					return rp.Port.StrVal == port.Name
				case rp.EndPort != nil:
					return port.ContainerPort >= rp.Port.IntVal && port.ContainerPort <= *rp.EndPort
				default:
					return port.ContainerPort == rp.Port.IntVal
				}
			}) {
				continue
			}
			if len(rule.From) == 0 {
				sources = append(sources, "all")
			}
			for _, peer := range rule.From {
				var s []string
				if peer.IPBlock != nil {
					s = append(s, "ipBlock "+peer.IPBlock.CIDR)
				}
				if peer.NamespaceSelector != nil {
					s = append(s, "namespaces "+metav1.FormatLabelSelector(peer.NamespaceSelector))
				}
				if peer.PodSelector != nil {
					s = append(s, "pods "+metav1.FormatLabelSelector(peer.PodSelector))
				}
				sources = append(sources, strings.Join(s, " "))
			}
		}
	}
	slices.Sort(sources)
	return slices.Compact(sources), isolated
}

// The NetworkPolicy component builds with every installable folder, adds
// only NetworkPolicies, admits to each port of each Deployment exactly the
// sources docs/security.md promises (and leaves no port unreachable), leaves
// egress alone, and the API server accepts every object (server-side dry
// run; the local cluster has no network plugin to enforce them).
func TestNetworkPolicyComponent(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := components.InstallGatewayAPICRDs(ctx, testCluster); err != nil {
		t.Fatal(err)
	}
	const monitoring = "namespaces kubernetes.io/metadata.name=monitoring"
	want := map[string]map[int32][]string{
		"capstan-router": {
			8080: {"all"},                                                             // the OpenAI API
			8081: {monitoring, "pods app.kubernetes.io/name=capstan-metrics-adapter"}, // admin: health, metrics, profiles; requests_demand
			80:   {"all"},                                                             // Gateway listeners
			443:  {"all"},
		},
		"capstan-metrics-adapter": {6443: {"all"}}, // the API server; see metricsadapter.yaml
		"capstan-scheduler":       {10259: {monitoring}},
	}
	for _, dir := range installable {
		t.Run(strings.ReplaceAll(dir, "/", "-"), func(t *testing.T) {
			resources := renderWithComponent(t, dir, "components/networkpolicy")
			var others []*kresource.Resource
			for _, r := range resources {
				if r.GetKind() != "NetworkPolicy" {
					others = append(others, r)
				}
			}
			if got, want := ids(others), ids(render(t, dir)); !slices.Equal(got, want) {
				t.Errorf("with the component, manifests/%s has\n  %v\nbesides NetworkPolicies; without it\n  %v", dir, got, want)
			}
			policies := decode[networkingv1.NetworkPolicy](t, resources, "NetworkPolicy")
			if len(policies) == 0 {
				t.Fatal("the component adds no NetworkPolicy")
			}
			for _, p := range policies {
				if p.Namespace != components.Namespace {
					t.Errorf("NetworkPolicy %s is in namespace %q", p.Name, p.Namespace)
				}
				if !slices.Equal(p.Spec.PolicyTypes, []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}) || len(p.Spec.Egress) > 0 {
					t.Errorf("NetworkPolicy %s: policyTypes %v: egress must stay unrestricted", p.Name, p.Spec.PolicyTypes)
				}
				if p.Labels["app.kubernetes.io/part-of"] != "capstan" {
					t.Errorf("NetworkPolicy %s lacks app.kubernetes.io/part-of=capstan", p.Name)
				}
			}
			// Any other pod in the namespace is isolated too.
			if _, isolated := ingressSources(policies, components.Namespace, map[string]string{"app": "other"}, corev1.ContainerPort{ContainerPort: 1234}); !isolated {
				t.Error("no NetworkPolicy denies ingress to the namespace's other pods by default")
			}
			for _, d := range decode[appsv1.Deployment](t, resources, "Deployment") {
				ports, ok := want[d.Name]
				if !ok {
					t.Errorf("Deployment %s: the test does not say who may reach it", d.Name)
					continue
				}
				for _, c := range d.Spec.Template.Spec.Containers {
					for _, port := range c.Ports {
						got, isolated := ingressSources(policies, d.Namespace, d.Spec.Template.Labels, port)
						w, ok := ports[port.ContainerPort]
						switch {
						case !isolated:
							t.Errorf("Deployment %s: no NetworkPolicy selects its pods", d.Name)
						case !ok:
							t.Errorf("Deployment %s port %d (%s): the test does not say who may reach it; the policies admit %v", d.Name, port.ContainerPort, port.Name, got)
						case !slices.Equal(got, w):
							t.Errorf("Deployment %s port %d (%s): admitted from %v, want %v", d.Name, port.ContainerPort, port.Name, got, w)
						}
					}
				}
			}
			// The namespace must exist for a dry run of what goes into it.
			if err := testCluster.Apply(ctx, "", stream(t, ofKinds(resources, "Namespace"))); err != nil {
				t.Fatal(err)
			}
			if err := testCluster.DryRunApply(ctx, "", stream(t, resources)); err != nil {
				t.Fatalf("server-side dry run of manifests/%s with components/networkpolicy: %v", dir, err)
			}
			list, err := testCluster.Client.NetworkingV1().NetworkPolicies(components.Namespace).List(ctx, metav1.ListOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if len(list.Items) > 0 {
				t.Errorf("the dry run stored %d NetworkPolicies", len(list.Items))
			}
		})
	}
}
