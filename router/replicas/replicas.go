// Package replicas says what Kubernetes says about a model's pods, for the
// answers of a model that has no Ready endpoint: a replica Pending with the
// scheduler's reason, one starting and for how long, or none at all, and
// then whether one is coming (an HPA scaled the model to zero and scales it
// up on demand) or the model is switched off (scaled to zero by hand).
package replicas

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/metricsadapter/targets"
)

// Pods watches the model-server pods (labelled capstan.dev/model) of some
// namespaces, and the Deployments, StatefulSets and HPAs that decide
// whether a model with no pod gets one back.
type Pods struct {
	// byNamespace holds one informer per watched namespace, or one under
	// "" for all of them; so does workloads.
	byNamespace map[string]cache.SharedIndexInformer
	workloads   map[string]workloads
}

// New returns the informers for namespaces (empty: all); run them with
// Informers.
func New(client kubernetes.Interface, namespaces []string) *Pods {
	if len(namespaces) == 0 {
		namespaces = []string{metav1.NamespaceAll}
	}
	p := &Pods{byNamespace: map[string]cache.SharedIndexInformer{}, workloads: map[string]workloads{}}
	for _, ns := range namespaces {
		p.byNamespace[ns] = targets.NewPodInformer(client, ns)
		p.workloads[ns] = newWorkloads(client, ns)
	}
	return p
}

// PodInformers are the pod informers, to share: they are the ones
// targets.AddEventHandler takes.
func (p *Pods) PodInformers() []cache.SharedIndexInformer {
	out := make([]cache.SharedIndexInformer, 0, len(p.byNamespace))
	for _, ns := range slices.Sorted(maps.Keys(p.byNamespace)) {
		out = append(out, p.byNamespace[ns])
	}
	return out
}

// Informers are all the informers, for the caller to run.
func (p *Pods) Informers() []cache.SharedIndexInformer {
	out := p.PodInformers()
	for _, ns := range slices.Sorted(maps.Keys(p.workloads)) {
		out = append(out, p.workloads[ns].informers()...)
	}
	return out
}

// inNamespace returns the value kept for namespace ns: its own or the one
// for all namespaces.
func inNamespace[T any](m map[string]T, ns string) (T, bool) {
	v, ok := m[ns]
	if !ok {
		v, ok = m[metav1.NamespaceAll]
	}
	return v, ok
}

func (p *Pods) list(ns, model string) []*corev1.Pod {
	informer, ok := inNamespace(p.byNamespace, ns)
	if !ok {
		return nil
	}
	objs, _ := informer.GetIndexer().ByIndex(cache.NamespaceIndex, ns)
	var out []*corev1.Pod
	for _, o := range objs {
		if pod, ok := o.(*corev1.Pod); ok && modelserver.Model(pod.Labels) == model {
			out = append(out, pod)
		}
	}
	return out
}

// Describe says what the pods of model in namespaces are doing, e.g.
// "replicas: 1 Pending: 0/3 nodes are available: …; 1 starting (not Ready
// for 42s)", or, when there is none, whether one is coming; off is true
// when none is (see atZero).
func (p *Pods) Describe(model string, namespaces []string, now time.Time) (what string, off bool) {
	var pending []string
	var starting, ready, terminating int
	var longest time.Duration
	for _, ns := range namespaces {
		for _, pod := range p.list(ns, model) {
			switch scheduled := condition(pod, corev1.PodScheduled); {
			case pod.DeletionTimestamp != nil:
				terminating++
			case scheduled == nil || scheduled.Status != corev1.ConditionTrue:
				msg := "not scheduled yet"
				if scheduled != nil && scheduled.Message != "" {
					msg = scheduled.Message
				}
				pending = append(pending, msg)
			case modelserver.IsReady(pod):
				ready++
			default:
				starting++
				since := scheduled.LastTransitionTime.Time
				if r := condition(pod, corev1.PodReady); r != nil && r.LastTransitionTime.After(since) {
					since = r.LastTransitionTime.Time
				}
				longest = max(longest, now.Sub(since))
			}
		}
	}
	var parts []string
	// One entry per distinct reason: a Deployment's Pending replicas
	// usually share one.
	slices.Sort(pending)
	for i := 0; i < len(pending); {
		j := i
		for j < len(pending) && pending[j] == pending[i] {
			j++
		}
		parts = append(parts, fmt.Sprintf("%d Pending: %s", j-i, strings.TrimSuffix(pending[i], ".")))
		i = j
	}
	if starting > 0 {
		parts = append(parts, fmt.Sprintf("%d starting (not Ready for %s)", starting, longest.Round(time.Second)))
	}
	if ready > 0 {
		parts = append(parts, fmt.Sprintf("%d Ready, not yet in an EndpointSlice", ready))
	}
	if terminating > 0 {
		parts = append(parts, fmt.Sprintf("%d terminating", terminating))
	}
	if len(parts) == 0 {
		return p.atZero(model, namespaces)
	}
	return "replicas: " + strings.Join(parts, "; "), false
}

func condition(pod *corev1.Pod, t corev1.PodConditionType) *corev1.PodCondition {
	for i := range pod.Status.Conditions {
		if pod.Status.Conditions[i].Type == t {
			return &pod.Status.Conditions[i]
		}
	}
	return nil
}
