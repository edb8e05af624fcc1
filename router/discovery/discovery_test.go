package discovery

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/klog/v2/ktesting"
	"k8s.io/utils/ptr"
)

type ep struct {
	ip          string
	pod         string
	ready       *bool
	terminating *bool
}

func slice(name, svc string, ports []discoveryv1.EndpointPort, eps ...ep) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "ns", Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       ports,
	}
	for _, e := range eps {
		d := discoveryv1.Endpoint{Addresses: []string{e.ip},
			Conditions: discoveryv1.EndpointConditions{Ready: e.ready, Terminating: e.terminating}}
		if e.pod != "" {
			d.TargetRef = &corev1.ObjectReference{Kind: "Pod", Namespace: "ns", Name: e.pod}
		}
		s.Endpoints = append(s.Endpoints, d)
	}
	return s
}

func httpPort(n int32) []discoveryv1.EndpointPort {
	return []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To(n), Protocol: ptr.To(corev1.ProtocolTCP)}}
}

func pod(name string) types.NamespacedName { return types.NamespacedName{Namespace: "ns", Name: name} }

func TestBuildEndpoints(t *testing.T) {
	named := corev1.ServicePort{Name: "http", Port: 80, TargetPort: intstr.FromString("http")}
	numeric := corev1.ServicePort{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8000)}
	for name, tc := range map[string]struct {
		port   corev1.ServicePort
		slices []*discoveryv1.EndpointSlice
		want   []Endpoint
	}{
		"unset ready counts as ready; terminating is never ready": {
			port: named,
			slices: []*discoveryv1.EndpointSlice{slice("a", "svc", httpPort(8000),
				ep{ip: "198.18.0.3", pod: "p3"},
				ep{ip: "198.18.0.1", pod: "p1", ready: ptr.To(false)},
				ep{ip: "198.18.0.2", pod: "p2", ready: ptr.To(false), terminating: ptr.To(true)})},
			want: []Endpoint{
				{Address: "198.18.0.1:8000", Pod: pod("p1")},
				{Address: "198.18.0.2:8000", Pod: pod("p2"), Terminating: true},
				{Address: "198.18.0.3:8000", Pod: pod("p3"), Ready: true},
			},
		},
		"a named target port resolves per slice": {
			port: named,
			slices: []*discoveryv1.EndpointSlice{
				slice("a", "svc", httpPort(8000), ep{ip: "198.18.0.1", pod: "old"}),
				slice("b", "svc", httpPort(9000), ep{ip: "198.18.0.2", pod: "new"}),
			},
			want: []Endpoint{
				{Address: "198.18.0.1:8000", Pod: pod("old"), Ready: true},
				{Address: "198.18.0.2:9000", Pod: pod("new"), Ready: true},
			},
		},
		"slices for another port of the Service are skipped": {
			port: named,
			slices: []*discoveryv1.EndpointSlice{
				slice("metrics", "svc", []discoveryv1.EndpointPort{{Name: ptr.To("metrics"), Port: ptr.To[int32](9090)}}, ep{ip: "198.18.0.1"}),
			},
			want: []Endpoint{},
		},
		"a hand-written slice without ports uses a numeric target port": {
			port:   numeric,
			slices: []*discoveryv1.EndpointSlice{slice("manual", "svc", nil, ep{ip: "198.18.0.1"})},
			want:   []Endpoint{{Address: "198.18.0.1:8000", Ready: true}},
		},
		"a hand-written slice without ports cannot resolve a named target port": {
			port:   named,
			slices: []*discoveryv1.EndpointSlice{slice("manual", "svc", nil, ep{ip: "198.18.0.1"})},
			want:   []Endpoint{},
		},
		"an address in two slices appears once, routable if either copy is": {
			port: named,
			slices: []*discoveryv1.EndpointSlice{
				slice("a", "svc", httpPort(8000), ep{ip: "198.18.0.1", pod: "p", ready: ptr.To(false)}),
				slice("b", "svc", httpPort(8000), ep{ip: "198.18.0.1", pod: "p"}),
				slice("c", "svc", httpPort(8000), ep{ip: "198.18.0.1", pod: "p", ready: ptr.To(false)}),
			},
			want: []Endpoint{{Address: "198.18.0.1:8000", Pod: pod("p"), Ready: true}},
		},
		"IPv6 addresses are bracketed; FQDN slices are skipped": {
			port: named,
			slices: func() []*discoveryv1.EndpointSlice {
				v6 := slice("v6", "svc", httpPort(8000), ep{ip: "fd00::1"})
				v6.AddressType = discoveryv1.AddressTypeIPv6
				fqdn := slice("fqdn", "svc", httpPort(8000), ep{ip: "model.example"})
				fqdn.AddressType = discoveryv1.AddressTypeFQDN
				return []*discoveryv1.EndpointSlice{v6, fqdn}
			}(),
			want: []Endpoint{{Address: "[fd00::1]:8000", Ready: true}},
		},
	} {
		t.Run(name, func(t *testing.T) {
			got := BuildEndpoints(tc.slices, tc.port)
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("endpoints (-want +got):\n%s", diff)
			}
		})
	}
}

func TestServicePort(t *testing.T) {
	svc := &corev1.Service{Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{
		{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP},
		{Name: "grpc", Port: 9000},
		{Name: "http", Port: 80},
	}}}
	if p, ok := ServicePort(svc); !ok || p.Name != "http" {
		t.Errorf("got %q, want the port named http", p.Name)
	}
	svc.Spec.Ports = svc.Spec.Ports[:2]
	if p, ok := ServicePort(svc); !ok || p.Name != "grpc" {
		t.Errorf("got %q, want the first TCP port", p.Name)
	}
	svc.Spec.Ports = svc.Spec.Ports[:1]
	if _, ok := ServicePort(svc); ok {
		t.Error("a UDP-only Service has a port")
	}
}

// recorder is a Handler that keeps the latest snapshot of each Service.
type recorder struct {
	mu      sync.Mutex
	latest  map[types.NamespacedName]*Service
	updates int
}

func (r *recorder) ServiceChanged(key types.NamespacedName, svc *Service) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.latest[key] = svc
	r.updates++
}

func (r *recorder) get(key types.NamespacedName) (*Service, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.latest[key], r.updates
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func addresses(s *Service) []string {
	if s == nil {
		return nil
	}
	var out []string
	for _, e := range s.Endpoints {
		out = append(out, e.Address)
	}
	return out
}

func TestControllerRebuildsFromCurrentSlices(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "llama", Labels: map[string]string{"capstan.dev/model": "llama"}},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("http")}}},
	}
	other := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "web"},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80}}}}
	client := fake.NewClientset(svc, other,
		slice("llama-a", "llama", httpPort(8000), ep{ip: "198.18.0.1", pod: "p1"}),
		slice("web-a", "web", httpPort(8000), ep{ip: "198.18.9.9"}))
	rec := &recorder{latest: map[types.NamespacedName]*Service{}}
	c, err := New(client, rec, Options{})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error)
	go func() { done <- c.Run(ctx, 2) }()
	waitFor(t, "the initial sync", c.HasSynced)

	key := types.NamespacedName{Namespace: "ns", Name: "llama"}
	// Synced means the first snapshot is there already.
	if got, _ := rec.get(key); cmp.Diff([]string{"198.18.0.1:8000"}, addresses(got)) != "" {
		t.Fatalf("after sync: %v", addresses(got))
	}
	if got, _ := rec.get(types.NamespacedName{Namespace: "ns", Name: "web"}); got != nil {
		t.Error("a Service without the model label was tracked")
	}
	if c.Service(key) == nil || c.Len() != 1 {
		t.Errorf("controller holds %d Services", c.Len())
	}

	slices := client.DiscoveryV1().EndpointSlices("ns")
	_, err = slices.Create(ctx, slice("llama-b", "llama", httpPort(8000), ep{ip: "198.18.0.2", pod: "p2"}), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the second slice's endpoint", func() bool {
		got, _ := rec.get(key)
		return cmp.Equal([]string{"198.18.0.1:8000", "198.18.0.2:8000"}, addresses(got))
	})
	// Deleting a slice removes its endpoints at once: rebuilt, not appended.
	if err := slices.Delete(ctx, "llama-a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the deleted slice's endpoint to go", func() bool {
		got, _ := rec.get(key)
		return cmp.Equal([]string{"198.18.0.2:8000"}, addresses(got))
	})
	// A slice update that changes nothing relevant does not notify.
	_, before := rec.get(key)
	b, _ := slices.Get(ctx, "llama-b", metav1.GetOptions{})
	// (The fake clientset does not bump resourceVersion; the informer
	// treats an update with an unchanged one as a resync.)
	b.Annotations = map[string]string{"touched": "yes"}
	b.ResourceVersion = "2"
	if _, err := slices.Update(ctx, b, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	// Then a real change, to know the no-op was processed before it.
	b.Endpoints[0].Conditions.Ready = ptr.To(false)
	b.ResourceVersion = "3"
	if _, err := slices.Update(ctx, b, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the endpoint to turn unready", func() bool {
		got, _ := rec.get(key)
		return got != nil && len(got.Endpoints) == 1 && !got.Endpoints[0].Ready
	})
	if _, after := rec.get(key); after != before+1 {
		t.Errorf("%d notifications for one no-op and one real change, want 1", after-before)
	}
	// Removing the model label drops the Service.
	s, _ := client.CoreV1().Services("ns").Get(ctx, "llama", metav1.GetOptions{})
	s.Labels = nil
	if _, err := client.CoreV1().Services("ns").Update(ctx, s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the unlabelled Service to be dropped", func() bool {
		got, _ := rec.get(key)
		return got == nil && c.Service(key) == nil
	})

	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}
}

func TestControllerWatchesOnlyItsNamespaces(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	mk := func(ns string) *corev1.Service {
		return &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "m", Labels: map[string]string{"capstan.dev/model": "m"}},
			Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80}}}}
	}
	client := fake.NewClientset(mk("a"), mk("b"), mk("c"))
	rec := &recorder{latest: map[types.NamespacedName]*Service{}}
	c, err := New(client, rec, Options{Namespaces: []string{"a", "c"}})
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = c.Run(ctx, 1) }()
	waitFor(t, "the initial sync", c.HasSynced)
	for ns, want := range map[string]bool{"a": true, "b": false, "c": true} {
		if got := c.Service(types.NamespacedName{Namespace: ns, Name: "m"}) != nil; got != want {
			t.Errorf("Service in namespace %s tracked = %v, want %v", ns, got, want)
		}
	}
}

// With AllServices every Service has a snapshot, with endpoints for each of
// its TCP ports.
func TestControllerSnapshotsAllServicesAndPorts(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	echo := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "echo"},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{
			{Name: "first-port", Port: 8080, TargetPort: intstr.FromInt32(3000)},
			{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP},
			{Name: "second-port", Port: 8081, TargetPort: intstr.FromInt32(3001)},
		}}}
	ports := []discoveryv1.EndpointPort{
		{Name: ptr.To("first-port"), Port: ptr.To(int32(3000))},
		{Name: ptr.To("second-port"), Port: ptr.To(int32(3001))},
	}
	client := fake.NewClientset(echo, slice("echo-a", "echo", ports, ep{ip: "198.18.0.1", pod: "e1"}))
	rec := &recorder{latest: map[types.NamespacedName]*Service{}}
	c, err := New(client, rec, Options{AllServices: true})
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = c.Run(ctx, 1) }()
	waitFor(t, "the initial sync", c.HasSynced)
	got := c.Service(types.NamespacedName{Namespace: "ns", Name: "echo"})
	if got == nil {
		t.Fatal("a Service without the model label has no snapshot")
	}
	var summary []string
	for _, p := range got.Ports {
		for _, e := range p.Endpoints {
			summary = append(summary, fmt.Sprintf("%s/%d=%s", p.Name, p.Number, e.Address))
		}
	}
	if diff := cmp.Diff([]string{"first-port/8080=198.18.0.1:3000", "second-port/8081=198.18.0.1:3001"}, summary); diff != "" {
		t.Errorf("ports (-want +got):\n%s", diff)
	}
	if got.Port != "first-port" || got.ServicePort(8081) == nil || got.ServicePort(53) != nil {
		t.Errorf("model port %q, port 8081 found %v, UDP port 53 found %v", got.Port, got.ServicePort(8081) != nil, got.ServicePort(53) != nil)
	}
}

func TestCounts(t *testing.T) {
	s := &Service{Endpoints: []Endpoint{
		{Ready: true}, {Ready: true}, {}, {Terminating: true}, {Ready: true, Terminating: true},
	}}
	r, n, term := s.Counts()
	if r != 2 || n != 1 || term != 2 {
		t.Errorf("Counts() = %d ready, %d not ready, %d terminating; want 2, 1, 2", r, n, term)
	}
}

func TestNewRejectsABadSelector(t *testing.T) {
	if _, err := New(fake.NewClientset(), &recorder{}, Options{ServiceSelector: "a in (b"}); err == nil {
		t.Error("New accepted an invalid label selector")
	}
}
