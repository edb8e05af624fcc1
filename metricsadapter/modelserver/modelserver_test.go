package modelserver

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func pod(annotations map[string]string, ports ...corev1.ContainerPort) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ml", Name: "p", Annotations: annotations},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "c", Ports: ports}}},
	}
}

func TestMetricsEndpoint(t *testing.T) {
	cases := map[string]struct {
		pod      *corev1.Pod
		port     int32
		path     string
		errMatch string
	}{
		"default port and path":           {pod: pod(nil), port: 8000, path: "/metrics"},
		"port named http":                 {pod: pod(nil, corev1.ContainerPort{Name: "http", ContainerPort: 8080}), port: 8080, path: "/metrics"},
		"metrics port wins over http":     {pod: pod(nil, corev1.ContainerPort{Name: "http", ContainerPort: 8080}, corev1.ContainerPort{Name: "metrics", ContainerPort: 8002}), port: 8002, path: "/metrics"},
		"annotation number wins":          {pod: pod(map[string]string{MetricsPortAnnotation: "9090"}, corev1.ContainerPort{Name: "metrics", ContainerPort: 8002}), port: 9090, path: "/metrics"},
		"annotation names a port":         {pod: pod(map[string]string{MetricsPortAnnotation: "prom"}, corev1.ContainerPort{Name: "prom", ContainerPort: 7000}), port: 7000, path: "/metrics"},
		"annotation path":                 {pod: pod(map[string]string{MetricsPathAnnotation: "/stats/prometheus"}), port: 8000, path: "/stats/prometheus"},
		"annotation names a missing port": {pod: pod(map[string]string{MetricsPortAnnotation: "prom"}), errMatch: `no container port named "prom"`},
		"port out of range":               {pod: pod(map[string]string{MetricsPortAnnotation: "70000"}), errMatch: "out of range"},
		"relative path":                   {pod: pod(map[string]string{MetricsPathAnnotation: "metrics"}), errMatch: "must start with /"},
		"UDP port named metrics ignored":  {pod: pod(nil, corev1.ContainerPort{Name: "metrics", ContainerPort: 9000, Protocol: corev1.ProtocolUDP}), port: 8000, path: "/metrics"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			port, path, err := MetricsEndpoint(tc.pod)
			if tc.errMatch != "" {
				if err == nil || !strings.Contains(err.Error(), tc.errMatch) {
					t.Fatalf("error = %v, want one containing %q", err, tc.errMatch)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if port != tc.port || path != tc.path {
				t.Errorf("got %d %s, want %d %s", port, path, tc.port, tc.path)
			}
		})
	}
}

func TestEngineOf(t *testing.T) {
	p := pod(nil)
	if e, err := EngineOf(p); err != nil || e != VLLM {
		t.Errorf("no label: %v %v, want vllm", e, err)
	}
	p.Labels = map[string]string{EngineLabel: "sglang"}
	if e, err := EngineOf(p); err != nil || e != SGLang {
		t.Errorf("sglang: %v %v", e, err)
	}
	p.Labels[EngineLabel] = "llamacpp"
	if _, err := EngineOf(p); err == nil || !strings.Contains(err.Error(), "unknown capstan.dev/engine \"llamacpp\"") {
		t.Errorf("unknown engine: %v", err)
	}
}

func TestScrapable(t *testing.T) {
	ready := []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
	unready := []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionFalse}}
	now := metav1.Now()
	cases := map[string]struct {
		status  corev1.PodStatus
		deleted bool
		want    bool
	}{
		"ready with IP":     {status: corev1.PodStatus{PodIP: "198.18.0.1", Conditions: ready}, want: true},
		"running, unready":  {status: corev1.PodStatus{PodIP: "198.18.0.1", Conditions: unready}},
		"pending, no IP":    {status: corev1.PodStatus{Conditions: ready}},
		"no conditions":     {status: corev1.PodStatus{PodIP: "198.18.0.1"}},
		"ready but deleted": {status: corev1.PodStatus{PodIP: "198.18.0.1", Conditions: ready}, deleted: true},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			p := pod(nil)
			p.Status = tc.status
			if tc.deleted {
				p.DeletionTimestamp = &now
			}
			if got := Scrapable(p); got != tc.want {
				t.Errorf("Scrapable = %v, want %v", got, tc.want)
			}
		})
	}
}
