// Package inferencepool follows the Gateway API Inference Extension's
// InferencePools (inference.networking.k8s.io/v1) and the pods they select,
// and keeps an immutable snapshot of each pool's endpoints, the way the
// discovery package does for Services: informer handlers only enqueue a
// pool's key, and a worker rebuilds the pool's endpoints from all of its
// current pods on every change, never by appending, and hands the snapshot
// to a Handler.
//
// An InferencePool has no EndpointSlices: its endpoints are the pods in its
// namespace that match spec.selector.matchLabels, one per spec.targetPorts
// entry. A pod is Ready when its PodReady condition is true (the kubelet has
// run every probe to decide that) and terminating once it has a
// deletionTimestamp; a pod without an IP has no endpoint.
package inferencepool

import (
	"net"
	"slices"
	"strconv"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	inferencev1 "sigs.k8s.io/gateway-api-inference-extension/api/v1"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/upstream"
)

// BalancerAnnotation on an InferencePool names the balancing policy that
// picks its endpoints (without an endpoint picker, or when a FailOpen one
// fails) instead of the router's --balancer.
const BalancerAnnotation = "capstan.dev/balancer"

// Pool is an immutable snapshot of one InferencePool and its endpoints.
type Pool struct {
	Key types.NamespacedName
	// Endpoints are one per target port of every selected pod that has an
	// IP, sorted by address, with the pod's readiness.
	Endpoints []discovery.Endpoint
	// EndpointPicker is the Service the pool's endpointPickerRef names,
	// "<namespace>/<name>:<port>", or "" when it names none.
	EndpointPicker string
	// FailOpen is the endpointPickerRef's failureMode: true for FailOpen,
	// false for FailClose (the API's default) or without a picker.
	FailOpen bool
	// Balancer is the pool's capstan.dev/balancer annotation: the
	// balancing policy the pool asks for, as written ("" for none).
	Balancer string
	// Protocol is what the endpoints speak: spec.appProtocol
	// "kubernetes.io/h2c" is HTTP/2 with prior knowledge, "http" or none
	// HTTP/1.1.
	Protocol upstream.Protocol
}

// equal reports whether two snapshots would route the same way.
func (p *Pool) equal(o *Pool) bool {
	return p.Key == o.Key && p.EndpointPicker == o.EndpointPicker && p.FailOpen == o.FailOpen && p.Protocol == o.Protocol && p.Balancer == o.Balancer &&
		slices.Equal(p.Endpoints, o.Endpoints)
}

// Counts returns how many endpoints are ready for traffic, not ready, and
// terminating.
func (p *Pool) Counts() (ready, notReady, terminating int) { return discovery.Counts(p.Endpoints) }

// Selector is a pool's spec.selector as a label selector. matchLabels is
// all the API has; an empty one selects nothing (the API requires at least
// one label), never every pod.
func Selector(pool *inferencev1.InferencePool) labels.Selector {
	if len(pool.Spec.Selector.MatchLabels) == 0 {
		return labels.Nothing()
	}
	set := make(labels.Set, len(pool.Spec.Selector.MatchLabels))
	for k, v := range pool.Spec.Selector.MatchLabels {
		set[string(k)] = string(v)
	}
	return labels.SelectorFromSet(set)
}

// EndpointPicker returns the endpointPickerRef's Service as
// "<namespace>/<name>:<port>", or "" when the pool names no picker.
func EndpointPicker(pool *inferencev1.InferencePool) string {
	ref := pool.Spec.EndpointPickerRef
	if ref == nil {
		return ""
	}
	s := pool.Namespace + "/" + string(ref.Name)
	if ref.Port != nil {
		s += ":" + strconv.Itoa(int(ref.Port.Number))
	}
	return s
}

// Build makes a pool's snapshot from the pods of its namespace: those its
// selector matches and that have an IP give one endpoint per target port.
func Build(pool *inferencev1.InferencePool, pods []*corev1.Pod) *Pool {
	p := &Pool{Key: types.NamespacedName{Namespace: pool.Namespace, Name: pool.Name}, EndpointPicker: EndpointPicker(pool)}
	if ref := pool.Spec.EndpointPickerRef; ref != nil {
		p.FailOpen = ref.FailureMode == inferencev1.EndpointPickerFailOpen
	}
	p.Balancer = pool.Annotations[BalancerAnnotation]
	if pool.Spec.AppProtocol == inferencev1.AppProtocolH2C {
		p.Protocol = upstream.H2C
	}
	sel := Selector(pool)
	for _, pod := range pods {
		if pod.Namespace != pool.Namespace || pod.Status.PodIP == "" || !sel.Matches(labels.Set(pod.Labels)) {
			continue
		}
		terminating := pod.DeletionTimestamp != nil
		ready := !terminating && modelserver.IsReady(pod)
		for _, port := range pool.Spec.TargetPorts {
			p.Endpoints = append(p.Endpoints, discovery.Endpoint{
				Address:     net.JoinHostPort(pod.Status.PodIP, strconv.Itoa(int(port.Number))),
				Pod:         types.NamespacedName{Namespace: pod.Namespace, Name: pod.Name},
				Ready:       ready,
				Terminating: terminating,
			})
		}
	}
	// A recycled IP can be reported by a deleted pod and its successor
	// for a moment.
	p.Endpoints = discovery.Unique(p.Endpoints)
	return p
}

// Slim is the pod informer's transform: of a pod it keeps what selects it
// and what makes its endpoints (labels, deletionTimestamp, IP, the Ready
// condition). Pools select pods by any label, so the informer caches every
// pod of the watched namespaces; the rest of each pod would be most of the
// cache. It keeps less than targets.Slim, the model-server pods' transform:
// not annotations (an applied manifest's copy can be kilobytes on any pod)
// nor containers.
func Slim(obj any) (any, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil // a tombstone, passed through
	}
	slim := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: pod.Name, Namespace: pod.Namespace, UID: pod.UID, ResourceVersion: pod.ResourceVersion,
			Labels: pod.Labels, DeletionTimestamp: pod.DeletionTimestamp,
		},
		Status: corev1.PodStatus{PodIP: pod.Status.PodIP},
	}
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady {
			slim.Status.Conditions = []corev1.PodCondition{{Type: c.Type, Status: c.Status}}
		}
	}
	return slim, nil
}
