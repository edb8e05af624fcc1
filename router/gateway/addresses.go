package gateway

import (
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"math/bits"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// Addresses says where Gateways are served. Exactly one mode is set.
//
// With Pool, every Gateway gets an address of its own from the pool (the
// one its spec asks for, if it is in the pool and free) and the router
// listens on that address and each listener's port: Gateways are isolated
// from each other by address, so any number of them can use port 80. The
// addresses must be local to the router's network namespace.
//
// With Shared, every Gateway reports the same address (the router's
// Service, typically a LoadBalancer) and the router listens on BindHost and
// each listener port; Gateways are told apart by port and hostname only,
// so two listeners on one port conflict unless their hostnames differ.
// With PublishService, Shared is that Service's address, read on every
// translation: its load balancer's, else an external IP, else its cluster
// IP.
type Addresses struct {
	Pool           netip.Prefix
	Shared         string
	PublishService types.NamespacedName
	BindHost       string
}

// sharedMode reports whether every Gateway shares one address.
func (a Addresses) sharedMode() bool { return !a.Pool.IsValid() }

// ServiceAddress returns the address a Service publishes: the first
// load-balancer ingress IP or hostname, else the first external IP, else
// the cluster IP; "" while it has none (a load balancer being set up).
func ServiceAddress(svc *corev1.Service) string {
	for _, in := range svc.Status.LoadBalancer.Ingress {
		if in.IP != "" {
			return in.IP
		}
		if in.Hostname != "" {
			return in.Hostname
		}
	}
	if svc.Spec.Type == corev1.ServiceTypeLoadBalancer {
		return "" // its load balancer is not ready: do not publish an internal address
	}
	if len(svc.Spec.ExternalIPs) > 0 {
		return svc.Spec.ExternalIPs[0]
	}
	if ip := svc.Spec.ClusterIP; ip != "" && ip != corev1.ClusterIPNone {
		return ip
	}
	return ""
}

// maxPoolProbe bounds how many pool addresses one allocation tries, so that
// a huge IPv6 pool does not make allocation slow.
const maxPoolProbe = 1 << 16

// assignment is where one Gateway is served, or why it cannot be.
type assignment struct {
	// status is the Gateway's status address; bindHost is the host part of
	// the addresses the router listens on for it.
	status   gatewayv1.GatewayStatusAddress
	bindHost string
	// unsupported, when set, is why the Gateway is not Accepted
	// (UnsupportedAddress); problem and problemReason why it is not
	// Programmed (AddressNotUsable, AddressNotAssigned).
	unsupported   string
	problem       string
	problemReason gatewayv1.GatewayConditionReason
}

// ok reports whether the Gateway has an address to be served on.
func (a assignment) ok() bool { return a.unsupported == "" && a.problem == "" && a.status.Value != "" }

var (
	ipAddressType = gatewayv1.IPAddressType
	hostnameType  = gatewayv1.HostnameAddressType
)

// assign gives each Gateway its address. gateways must be sorted oldest
// first. A Gateway keeps the pool address its status reports (unless its
// spec now asks for another), so addresses do not move when other Gateways
// come and go; then Gateways get the address their spec asks for, oldest
// first, if no one has it; then the rest get a free one. Every router
// replica computes the same assignment from the same objects.
func (a Addresses) assign(gateways []*gatewayv1.Gateway) map[types.NamespacedName]assignment {
	out := make(map[types.NamespacedName]assignment, len(gateways))
	if a.sharedMode() {
		for _, gw := range gateways {
			out[key(gw)] = a.shared(gw)
		}
		return out
	}
	used := map[netip.Addr]types.NamespacedName{}
	type request struct {
		want  netip.Addr
		asked bool
	}
	requests := map[types.NamespacedName]request{}
	for _, gw := range gateways {
		k := key(gw)
		want, asked, res := a.requested(gw)
		if res.unsupported != "" || res.problem != "" {
			out[k] = res
			continue
		}
		requests[k] = request{want, asked}
		if cur, ok := a.current(gw); ok && (!asked || want == cur) {
			if _, taken := used[cur]; !taken {
				used[cur] = k
				out[k] = poolAssignment(cur)
			}
		}
	}
	for _, gw := range gateways {
		k := key(gw)
		req, pending := requests[k]
		if _, done := out[k]; done || !pending || !req.asked {
			continue
		}
		if owner, taken := used[req.want]; taken {
			out[k] = assignment{problemReason: gatewayv1.GatewayReasonAddressNotAssigned,
				problem: fmt.Sprintf("address %s is already used by Gateway %s", req.want, owner)}
			continue
		}
		used[req.want] = k
		out[k] = poolAssignment(req.want)
	}
	for _, gw := range gateways {
		k := key(gw)
		if _, done := out[k]; done {
			continue
		}
		addr, ok := a.free(k, used)
		if !ok {
			out[k] = assignment{problemReason: gatewayv1.GatewayReasonAddressNotAssigned,
				problem: fmt.Sprintf("no free address left in the pool %s", a.Pool)}
			continue
		}
		used[addr] = k
		out[k] = poolAssignment(addr)
	}
	return out
}

func poolAssignment(addr netip.Addr) assignment {
	return assignment{status: gatewayv1.GatewayStatusAddress{Type: &ipAddressType, Value: addr.String()}, bindHost: addr.String()}
}

// requested returns the pool address a Gateway's spec asks for, whether it
// asks for one, and any problem with what it asks for.
func (a Addresses) requested(gw *gatewayv1.Gateway) (netip.Addr, bool, assignment) {
	var want []netip.Addr
	for _, sa := range gw.Spec.Addresses {
		if sa.Type != nil && *sa.Type != gatewayv1.IPAddressType {
			return netip.Addr{}, false, assignment{unsupported: fmt.Sprintf("address type %s is not supported: Gateways get IP addresses from the pool %s", *sa.Type, a.Pool)}
		}
		if sa.Value == "" {
			continue // any address will do
		}
		ip, err := netip.ParseAddr(sa.Value)
		if err != nil || !a.Pool.Contains(ip) {
			return netip.Addr{}, false, assignment{problemReason: gatewayv1.GatewayReasonAddressNotUsable,
				problem: fmt.Sprintf("address %s is not in the router's address pool %s", sa.Value, a.Pool)}
		}
		want = append(want, ip)
	}
	switch len(want) {
	case 0:
		return netip.Addr{}, false, assignment{}
	case 1:
		return want[0], true, assignment{}
	}
	return netip.Addr{}, false, assignment{problemReason: gatewayv1.GatewayReasonAddressNotUsable,
		problem: fmt.Sprintf("%d addresses requested; a Gateway gets one address", len(want))}
}

// current returns the pool address a Gateway's status already reports.
func (a Addresses) current(gw *gatewayv1.Gateway) (netip.Addr, bool) {
	for _, sa := range gw.Status.Addresses {
		if sa.Type != nil && *sa.Type != gatewayv1.IPAddressType {
			continue
		}
		if ip, err := netip.ParseAddr(sa.Value); err == nil && a.usable(ip) {
			return ip, true
		}
	}
	return netip.Addr{}, false
}

// free returns a free pool address for a Gateway: the first free one from a
// position that hashes the Gateway's name, so that concurrent replicas and
// restarts choose the same.
func (a Addresses) free(k types.NamespacedName, used map[netip.Addr]types.NamespacedName) (netip.Addr, bool) {
	size := a.poolSize()
	h := fnv.New64a()
	h.Write([]byte(k.String()))
	start := h.Sum64() % size
	for i := range min(size, maxPoolProbe) {
		ip := nthAddr(a.Pool, (start+i)%size)
		if _, taken := used[ip]; !taken && a.usable(ip) {
			return ip, true
		}
	}
	return netip.Addr{}, false
}

func (a Addresses) poolSize() uint64 {
	host := a.Pool.Addr().BitLen() - a.Pool.Bits()
	if host >= 63 {
		return 1 << 63
	}
	return 1 << host
}

// usable reports whether ip is a pool address Gateways may get: in the pool
// and, for an IPv4 pool of four or more, neither its first nor last address.
func (a Addresses) usable(ip netip.Addr) bool {
	if !a.Pool.Contains(ip) {
		return false
	}
	if ip.Is4() && a.poolSize() >= 4 {
		first := a.Pool.Masked().Addr()
		last := nthAddr(a.Pool, a.poolSize()-1)
		return ip != first && ip != last
	}
	return true
}

// nthAddr returns the address n places into a prefix.
func nthAddr(p netip.Prefix, n uint64) netip.Addr {
	b := p.Masked().Addr().As16()
	lo, carry := bits.Add64(binary.BigEndian.Uint64(b[8:]), n, 0)
	binary.BigEndian.PutUint64(b[8:], lo)
	binary.BigEndian.PutUint64(b[:8], binary.BigEndian.Uint64(b[:8])+carry)
	ip := netip.AddrFrom16(b)
	if p.Addr().Is4() {
		return ip.Unmap()
	}
	return ip
}

// shared is a Gateway's assignment when every Gateway has the router's
// address.
func (a Addresses) shared(gw *gatewayv1.Gateway) assignment {
	if a.Shared == "" {
		return assignment{problemReason: gatewayv1.GatewayReasonAddressNotAssigned,
			problem: fmt.Sprintf("Service %s has no address yet (is its load balancer still being set up?)", a.PublishService)}
	}
	typ := &hostnameType
	if _, err := netip.ParseAddr(a.Shared); err == nil {
		typ = &ipAddressType
	}
	for _, sa := range gw.Spec.Addresses {
		if sa.Type != nil && *sa.Type != gatewayv1.IPAddressType && *sa.Type != gatewayv1.HostnameAddressType {
			return assignment{unsupported: fmt.Sprintf("address type %s is not supported: Gateways share the address %s", *sa.Type, a.Shared)}
		}
		if sa.Value != "" && sa.Value != a.Shared {
			return assignment{problemReason: gatewayv1.GatewayReasonAddressNotUsable,
				problem: fmt.Sprintf("address %s cannot be used: every Gateway of this router has the address %s", sa.Value, a.Shared)}
		}
	}
	return assignment{status: gatewayv1.GatewayStatusAddress{Type: typ, Value: a.Shared}, bindHost: a.BindHost}
}

func key(gw *gatewayv1.Gateway) types.NamespacedName {
	return types.NamespacedName{Namespace: gw.Namespace, Name: gw.Name}
}
