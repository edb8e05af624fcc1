package inferencepool

import (
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
	inferencev1 "sigs.k8s.io/gateway-api-inference-extension/api/v1"

	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/upstream"
)

func testPool(ns, name string, ports ...int32) *inferencev1.InferencePool {
	p := &inferencev1.InferencePool{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	p.Spec.Selector.MatchLabels = map[inferencev1.LabelKey]inferencev1.LabelValue{"app": "llama"}
	for _, n := range ports {
		p.Spec.TargetPorts = append(p.Spec.TargetPorts, inferencev1.Port{Number: inferencev1.PortNumber(n)})
	}
	return p
}

// pod is a pod of the llama app with an IP, Ready unless changed.
func pod(ns, name, ip string, change ...func(*corev1.Pod)) *corev1.Pod {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": "llama"}},
		Status: corev1.PodStatus{PodIP: ip, Phase: corev1.PodRunning, Conditions: []corev1.PodCondition{
			{Type: corev1.PodScheduled, Status: corev1.ConditionTrue},
			{Type: corev1.PodReady, Status: corev1.ConditionTrue},
		}}}
	for _, c := range change {
		c(p)
	}
	return p
}

func notReady(p *corev1.Pod) { p.Status.Conditions[1].Status = corev1.ConditionFalse }
func deleting(p *corev1.Pod) { p.DeletionTimestamp = &metav1.Time{} }

func ep(ns, name, addr string, ready, terminating bool) discovery.Endpoint {
	return discovery.Endpoint{Address: addr, Pod: types.NamespacedName{Namespace: ns, Name: name}, Ready: ready, Terminating: terminating}
}

func TestBuild(t *testing.T) {
	for name, tc := range map[string]struct {
		pool *inferencev1.InferencePool
		pods []*corev1.Pod
		want []discovery.Endpoint
	}{
		"one endpoint per pod and target port, sorted": {
			pool: testPool("ml", "llama", 8000, 8001),
			pods: []*corev1.Pod{pod("ml", "b", "198.18.0.2"), pod("ml", "a", "198.18.0.1")},
			want: []discovery.Endpoint{
				ep("ml", "a", "198.18.0.1:8000", true, false), ep("ml", "a", "198.18.0.1:8001", true, false),
				ep("ml", "b", "198.18.0.2:8000", true, false), ep("ml", "b", "198.18.0.2:8001", true, false),
			},
		},
		"not Ready and terminating pods are endpoints that get no traffic": {
			pool: testPool("ml", "llama", 8000),
			pods: []*corev1.Pod{
				pod("ml", "ready", "198.18.0.1"),
				pod("ml", "unready", "198.18.0.2", notReady),
				pod("ml", "going", "198.18.0.3", deleting),
				pod("ml", "no-condition", "198.18.0.4", func(p *corev1.Pod) { p.Status.Conditions = nil }),
			},
			want: []discovery.Endpoint{
				ep("ml", "ready", "198.18.0.1:8000", true, false),
				ep("ml", "unready", "198.18.0.2:8000", false, false),
				ep("ml", "going", "198.18.0.3:8000", false, true),
				ep("ml", "no-condition", "198.18.0.4:8000", false, false),
			},
		},
		"pods without an IP, of other namespaces or not selected have none": {
			pool: testPool("ml", "llama", 8000),
			pods: []*corev1.Pod{
				pod("ml", "pending", ""),
				pod("other", "elsewhere", "198.18.0.5"),
				pod("ml", "qwen", "198.18.0.6", func(p *corev1.Pod) { p.Labels = map[string]string{"app": "qwen"} }),
				pod("ml", "extra-label", "198.18.0.7", func(p *corev1.Pod) { p.Labels["tier"] = "gpu" }),
			},
			want: []discovery.Endpoint{ep("ml", "extra-label", "198.18.0.7:8000", true, false)},
		},
		"an IP a deleted pod and its successor both report is one routable endpoint": {
			pool: testPool("ml", "llama", 8000),
			pods: []*corev1.Pod{pod("ml", "old", "198.18.0.1", deleting), pod("ml", "new", "198.18.0.1")},
			want: []discovery.Endpoint{ep("ml", "new", "198.18.0.1:8000", true, false)},
		},
		"an empty selector selects nothing": {
			pool: func() *inferencev1.InferencePool {
				p := testPool("ml", "llama", 8000)
				p.Spec.Selector.MatchLabels = nil
				return p
			}(),
			pods: []*corev1.Pod{pod("ml", "a", "198.18.0.1")},
		},
	} {
		t.Run(name, func(t *testing.T) {
			got := Build(tc.pool, tc.pods)
			if diff := cmp.Diff(tc.want, got.Endpoints); diff != "" {
				t.Errorf("endpoints (-want +got):\n%s", diff)
			}
		})
	}
}

func TestBuildEndpointPicker(t *testing.T) {
	for name, tc := range map[string]struct {
		ref      *inferencev1.EndpointPickerRef
		picker   string
		failOpen bool
	}{
		"none":       {},
		"fail close": {ref: &inferencev1.EndpointPickerRef{Name: "epp", Port: &inferencev1.Port{Number: 9002}}, picker: "ml/epp:9002"},
		"fail open": {ref: &inferencev1.EndpointPickerRef{Name: "epp", Port: &inferencev1.Port{Number: 9002}, FailureMode: inferencev1.EndpointPickerFailOpen},
			picker: "ml/epp:9002", failOpen: true},
	} {
		t.Run(name, func(t *testing.T) {
			pool := testPool("ml", "llama", 8000)
			pool.Spec.EndpointPickerRef = tc.ref
			got := Build(pool, nil)
			if got.EndpointPicker != tc.picker || got.FailOpen != tc.failOpen {
				t.Errorf("picker %q, fail open %v; want %q, %v", got.EndpointPicker, got.FailOpen, tc.picker, tc.failOpen)
			}
		})
	}
}

// Slim keeps what selects a pod and makes its endpoints, and nothing the
// pool endpoints do not need.
func TestSlim(t *testing.T) {
	full := pod("ml", "a", "198.18.0.1", deleting)
	full.Spec.Containers = []corev1.Container{{Name: "vllm", Image: "vllm/vllm-openai", Args: []string{"--model", "llama"}}}
	full.Annotations = map[string]string{"big": "value"}
	full.ManagedFields = []metav1.ManagedFieldsEntry{{Manager: "kubelet"}}
	got, err := Slim(full)
	if err != nil {
		t.Fatal(err)
	}
	want := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ml", Name: "a", Labels: full.Labels, DeletionTimestamp: full.DeletionTimestamp},
		Status:     corev1.PodStatus{PodIP: "198.18.0.1", Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("slim pod (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(Build(testPool("ml", "llama", 8000), []*corev1.Pod{full}), Build(testPool("ml", "llama", 8000), []*corev1.Pod{got.(*corev1.Pod)})); diff != "" {
		t.Errorf("a slim pod builds other endpoints (-full +slim):\n%s", diff)
	}
	tomb := cache.DeletedFinalStateUnknown{Key: "ml/a", Obj: full}
	if got, _ := Slim(tomb); got != any(tomb) {
		t.Errorf("a tombstone became %v", got)
	}
}

func TestBuildAppProtocol(t *testing.T) {
	for proto, want := range map[inferencev1.AppProtocol]upstream.Protocol{
		"":                          upstream.HTTP1,
		inferencev1.AppProtocolHTTP: upstream.HTTP1,
		inferencev1.AppProtocolH2C:  upstream.H2C,
	} {
		pool := testPool("ml", "llama", 8000)
		pool.Spec.AppProtocol = proto
		got := Build(pool, []*corev1.Pod{pod("ml", "a", "198.18.0.1")})
		if got.Protocol != want {
			t.Errorf("appProtocol %q: %v, want %v", proto, got.Protocol, want)
		}
		other := Build(testPool("ml", "llama", 8000), []*corev1.Pod{pod("ml", "a", "198.18.0.1")})
		if got.equal(other) != (want == upstream.HTTP1) {
			t.Errorf("appProtocol %q: a snapshot equal to the default one is %v", proto, got.equal(other))
		}
	}
}
