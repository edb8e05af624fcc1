// Package discovery turns Services and their EndpointSlices into immutable
// snapshots of each Service's endpoints, the way sample-controller builds
// state: informer handlers only enqueue a Service key, and a worker rebuilds
// that Service's endpoint set from all of its current slices on every
// change, never by appending, and hands the new snapshot to a Handler.
//
// Discovery says which addresses a Service has and what state each is in.
// Which Services serve a request (label-based models, Gateway API routes)
// is the route package's business, and picking one address is the balance
// package's.
package discovery

import (
	"cmp"
	"maps"
	"net"
	"slices"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// Endpoint is one address of a Service, with its EndpointSlice conditions.
type Endpoint struct {
	// Address is ip:port, the port being the Service's target port as the
	// EndpointSlice resolved it for this endpoint.
	Address string
	// Pod is the pod behind the address (the endpoint's targetRef), or the
	// zero value when the slice names none.
	Pod types.NamespacedName
	// Ready is the slice's ready condition, true when unset (as the API
	// documents for consumers). A terminating endpoint is never ready.
	Ready bool
	// Terminating is the slice's terminating condition.
	Terminating bool
}

// Routable reports whether the endpoint may receive new requests: ready and
// not terminating. A terminating endpoint still finishes what it has.
func (e Endpoint) Routable() bool { return e.Ready && !e.Terminating }

// Service is an immutable snapshot of one Service and its endpoints.
type Service struct {
	Key types.NamespacedName
	// UID is the Service's, so that Events about it are found the way
	// kubectl describe looks for them.
	UID types.UID
	// Labels and Annotations are the Service's (shared, do not modify).
	Labels      map[string]string
	Annotations map[string]string
	// Created is the Service's creationTimestamp: which of several
	// Services claiming a model came first is decided on it.
	Created time.Time
	// Port is the name of the Service port model requests go to (see
	// ServicePort).
	Port string
	// Endpoints are every endpoint of every current slice of the Service
	// on that port, sorted by address, one per address.
	Endpoints []Endpoint
	// Ports are all the Service's TCP ports in its spec order, each with
	// its endpoints built the same way; the entry for Port shares its
	// Endpoints. Gateway API backendRefs name a port by number.
	Ports []Port
	// Problem, when set, says why the Service can have no endpoints (no
	// usable port); it is meant for an error message a person reads.
	Problem string
}

// Port is one TCP port of a Service and its endpoints on that port.
type Port struct {
	// Name and Number are the Service port's name and port number.
	Name   string
	Number int32
	// Endpoints are as in Service.Endpoints, on this port's target port.
	Endpoints []Endpoint
}

// ServicePort returns the port with a number, or nil.
func (s *Service) ServicePort(number int32) *Port {
	for i := range s.Ports {
		if s.Ports[i].Number == number {
			return &s.Ports[i]
		}
	}
	return nil
}

// Counts returns how many endpoints are ready for traffic, not ready, and
// terminating.
func (s *Service) Counts() (ready, notReady, terminating int) { return Counts(s.Endpoints) }

// Counts returns how many of eps are ready for traffic, not ready, and
// terminating.
func Counts(eps []Endpoint) (ready, notReady, terminating int) {
	for _, e := range eps {
		switch {
		case e.Terminating:
			terminating++
		case e.Ready:
			ready++
		default:
			notReady++
		}
	}
	return ready, notReady, terminating
}

// equal reports whether two snapshots would route the same way.
func (s *Service) equal(o *Service) bool {
	return s.Key == o.Key && s.UID == o.UID && s.Port == o.Port && s.Problem == o.Problem && s.Created.Equal(o.Created) &&
		slices.Equal(s.Endpoints, o.Endpoints) && maps.Equal(s.Labels, o.Labels) && maps.Equal(s.Annotations, o.Annotations) &&
		slices.EqualFunc(s.Ports, o.Ports, func(a, b Port) bool {
			return a.Name == b.Name && a.Number == b.Number && slices.Equal(a.Endpoints, b.Endpoints)
		})
}

// ServicePort returns the Service port that model requests go to: the port
// named "http" if there is one, else the first TCP port.
func ServicePort(svc *corev1.Service) (corev1.ServicePort, bool) {
	var first *corev1.ServicePort
	for i := range svc.Spec.Ports {
		p := &svc.Spec.Ports[i]
		if p.Protocol != "" && p.Protocol != corev1.ProtocolTCP {
			continue
		}
		if p.Name == "http" {
			return *p, true
		}
		if first == nil {
			first = p
		}
	}
	if first == nil {
		return corev1.ServicePort{}, false
	}
	return *first, true
}

// BuildEndpoints merges the endpoints of all of a Service's slices for one
// Service port. The port of each endpoint is the one its slice lists under
// the Service port's name (the EndpointSlice controller has resolved a
// named target port per pod); a slice that lists none, such as one written
// by hand, falls back to a numeric target port and is skipped for a named
// one. An address listed by two slices (as happens for a moment while the
// controller moves endpoints between slices) appears once, routable if
// either copy is. Only IPv4 and IPv6 slices are used.
func BuildEndpoints(slices_ []*discoveryv1.EndpointSlice, port corev1.ServicePort) []Endpoint {
	all := []Endpoint{}
	for _, slice := range slices_ {
		if slice.AddressType != discoveryv1.AddressTypeIPv4 && slice.AddressType != discoveryv1.AddressTypeIPv6 {
			continue
		}
		number, ok := slicePort(slice, port)
		if !ok {
			continue
		}
		portStr := strconv.Itoa(int(number))
		for _, ep := range slice.Endpoints {
			if len(ep.Addresses) == 0 {
				continue
			}
			// Addresses are interchangeable and consumers use the first.
			e := Endpoint{
				Address:     net.JoinHostPort(ep.Addresses[0], portStr),
				Ready:       ep.Conditions.Ready == nil || *ep.Conditions.Ready,
				Terminating: ep.Conditions.Terminating != nil && *ep.Conditions.Terminating,
			}
			if ref := ep.TargetRef; ref != nil && (ref.Kind == "Pod" || ref.Kind == "") {
				ns := ref.Namespace
				if ns == "" {
					ns = slice.Namespace
				}
				e.Pod = types.NamespacedName{Namespace: ns, Name: ref.Name}
			}
			all = append(all, e)
		}
	}
	return Unique(all)
}

// Unique sorts endpoints by address and keeps one per address: a routable
// one when there is one. Two slices (or pods) may report one address for a
// moment, as an old pod's IP is reused by its successor.
func Unique(eps []Endpoint) []Endpoint {
	slices.SortStableFunc(eps, func(a, b Endpoint) int {
		if c := cmp.Compare(a.Address, b.Address); c != 0 {
			return c
		}
		switch {
		case a.Routable() == b.Routable():
			return 0
		case a.Routable():
			return -1
		}
		return 1
	})
	return slices.CompactFunc(eps, func(a, b Endpoint) bool { return a.Address == b.Address })
}

// slicePort finds the port number a slice gives the Service port.
func slicePort(slice *discoveryv1.EndpointSlice, port corev1.ServicePort) (int32, bool) {
	for _, p := range slice.Ports {
		name := ""
		if p.Name != nil {
			name = *p.Name
		}
		if name == port.Name && p.Port != nil && (p.Protocol == nil || *p.Protocol == corev1.ProtocolTCP) {
			return *p.Port, true
		}
	}
	if len(slice.Ports) > 0 {
		return 0, false // the slice is for other ports of the Service
	}
	switch {
	case port.TargetPort.Type == intstr.Int && port.TargetPort.IntVal > 0:
		return port.TargetPort.IntVal, true
	case port.TargetPort.Type == intstr.Int && port.TargetPort.IntVal == 0:
		return port.Port, true // an unset target port defaults to the port
	}
	return 0, false
}
