// Package modelserver says what makes a pod a model server to Capstan: its
// labels, which engine it runs, where its Prometheus metrics are, and whether
// it may receive traffic or be scraped. The router, the scheduler plugin and
// the metrics adapter all read pods through it so they agree.
package modelserver

import (
	"fmt"
	"strconv"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

const (
	// ModelLabel names the model a pod serves (and a Service fronts); its
	// value is what a client sends as "model".
	ModelLabel = "capstan.dev/model"
	// EngineLabel names the inference engine; it picks the metric mapping.
	EngineLabel = "capstan.dev/engine"
	// MetricsPortAnnotation and MetricsPathAnnotation override where the
	// engine's Prometheus endpoint is.
	MetricsPortAnnotation = "capstan.dev/metrics-port"
	MetricsPathAnnotation = "capstan.dev/metrics-path"

	// DefaultPort is the port used when a pod names none: vLLM's default.
	DefaultPort = 8000
	// DefaultMetricsPath is where every supported engine serves metrics.
	DefaultMetricsPath = "/metrics"
)

// Engine is an inference engine whose metrics Capstan understands.
type Engine string

const (
	VLLM   Engine = "vllm"
	SGLang Engine = "sglang"
	TGI    Engine = "tgi"
	Triton Engine = "triton"
)

// Engines lists every supported engine.
var Engines = []Engine{VLLM, SGLang, TGI, Triton}

// DefaultEngine is assumed when a pod has no engine label.
const DefaultEngine = VLLM

// Model returns the model a pod or Service serves, or "" when it has none.
func Model(labels map[string]string) string { return labels[ModelLabel] }

// EngineOf returns the pod's engine, DefaultEngine when it has no label, and
// an error naming the supported engines when the label is unknown.
func EngineOf(pod *corev1.Pod) (Engine, error) {
	v, ok := pod.Labels[EngineLabel]
	if !ok || v == "" {
		return DefaultEngine, nil
	}
	for _, e := range Engines {
		if Engine(v) == e {
			return e, nil
		}
	}
	return "", fmt.Errorf("pod %s/%s: unknown %s %q (supported: %v)", pod.Namespace, pod.Name, EngineLabel, v, Engines)
}

// MetricsEndpoint returns the port and path of the pod's Prometheus endpoint:
// the capstan.dev/metrics-port annotation (a number or a container port
// name), else a container port named "metrics", then "http", else
// DefaultPort; the path from capstan.dev/metrics-path, else "/metrics".
func MetricsEndpoint(pod *corev1.Pod) (port int32, path string, err error) {
	path = DefaultMetricsPath
	if p := pod.Annotations[MetricsPathAnnotation]; p != "" {
		if p[0] != '/' {
			return 0, "", fmt.Errorf("pod %s/%s: %s %q must start with /", pod.Namespace, pod.Name, MetricsPathAnnotation, p)
		}
		path = p
	}
	if v, ok := pod.Annotations[MetricsPortAnnotation]; ok {
		port, err := ResolvePort(pod, intstr.Parse(v))
		if err != nil {
			return 0, "", fmt.Errorf("pod %s/%s: %s: %w", pod.Namespace, pod.Name, MetricsPortAnnotation, err)
		}
		return port, path, nil
	}
	for _, name := range []string{"metrics", "http"} {
		if port, ok := namedPort(pod, name); ok {
			return port, path, nil
		}
	}
	return DefaultPort, path, nil
}

// ResolvePort turns a port number or container port name into a number.
func ResolvePort(pod *corev1.Pod, p intstr.IntOrString) (int32, error) {
	if p.Type == intstr.Int {
		if p.IntVal < 1 || p.IntVal > 65535 {
			return 0, fmt.Errorf("port %d out of range", p.IntVal)
		}
		return p.IntVal, nil
	}
	if n, err := strconv.Atoi(p.StrVal); err == nil {
		return ResolvePort(pod, intstr.FromInt32(int32(n)))
	}
	if port, ok := namedPort(pod, p.StrVal); ok {
		return port, nil
	}
	return 0, fmt.Errorf("no container port named %q", p.StrVal)
}

func namedPort(pod *corev1.Pod, name string) (int32, bool) {
	for _, c := range pod.Spec.Containers {
		for _, p := range c.Ports {
			if p.Name == name && (p.Protocol == "" || p.Protocol == corev1.ProtocolTCP) {
				return p.ContainerPort, true
			}
		}
	}
	return 0, false
}

// IsReady reports whether the pod's Ready condition is True: the kubelet has
// run every probe and says the pod may serve.
func IsReady(pod *corev1.Pod) bool {
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// Scrapable reports whether the pod may be contacted for metrics: Ready, with
// a pod IP, and not being deleted. Pending and unready pods never are.
func Scrapable(pod *corev1.Pod) bool {
	return pod.DeletionTimestamp == nil && pod.Status.PodIP != "" && IsReady(pod)
}
