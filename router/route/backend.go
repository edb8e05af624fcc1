package route

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"

	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/router/balance"
	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/inferencepool"
	"github.com/capstan-dev/capstan/router/upstream"
)

// BackendKey names a Gateway API backend: one port of one Service, or an
// InferencePool.
type BackendKey struct {
	Service types.NamespacedName
	// Port is the Service port number a backendRef names.
	Port int32
	// Pool names an InferencePool; Service and Port are then zero.
	Pool types.NamespacedName
}

func (k BackendKey) String() string {
	if k.Pool.Name != "" {
		return "InferencePool " + k.Pool.String()
	}
	return fmt.Sprintf("%s:%d", k.Service, k.Port)
}

// Backend is a Service port or an InferencePool that Gateway API routes
// send traffic to. Its endpoints follow the Service's EndpointSlices like a
// model's do, or the pool's pods: Load returns the current view without a
// lock, and a new one is swapped in when the snapshot changes, without
// rebuilding any route table.
type Backend struct {
	Key   BackendKey
	name  string
	state atomic.Pointer[BackendState]
	// inflight counts requests across the backend's pool generations.
	inflight atomic.Int64
}

// BackendState is an immutable view of a backend's endpoints.
type BackendState struct {
	// Pool holds the backend's Ready, non-terminating endpoints.
	Pool *balance.Pool
	// Model is the Service's capstan.dev/model label, "" when it has none;
	// it names the backend in the model-labelled metrics.
	Model string
	// Total counts the port's endpoints; Ready, NotReady and Terminating
	// split it.
	Total, Ready, NotReady, Terminating int
	// Missing says why the backend has no endpoints at all: the Service,
	// its port or the InferencePool does not exist (yet), or the Service
	// has no usable port.
	Missing string
	// EndpointPicker, for an InferencePool with an endpointPickerRef, is
	// the picker Service, "<namespace>/<name>:<port>", that each request
	// asks which endpoints to use; FailOpen says whether the router's
	// balancer picks when the picker fails (failureMode FailOpen) rather
	// than the request failing.
	EndpointPicker string
	FailOpen       bool
	// Balancer, for an InferencePool whose capstan.dev/balancer
	// annotation names a policy, is that policy; "" for the router's.
	Balancer balance.Policy
}

// Name is Key as a string, "<namespace>/<service>:<port>" or
// "InferencePool <namespace>/<name>".
func (b *Backend) Name() string { return b.name }

// Load returns the backend's current state.
func (b *Backend) Load() *BackendState { return b.state.Load() }

// Unavailable explains why the backend has no Ready endpoint, for a 503.
func (s *BackendState) Unavailable(key BackendKey) string {
	if s.Missing != "" {
		return fmt.Sprintf("backend %s has no endpoints: %s", key, s.Missing)
	}
	msg := fmt.Sprintf("backend %s has 0 ready of %d endpoints", key, s.Total)
	var why []string
	if s.NotReady > 0 {
		why = append(why, fmt.Sprintf("%d not ready", s.NotReady))
	}
	if s.Terminating > 0 {
		why = append(why, fmt.Sprintf("%d terminating", s.Terminating))
	}
	switch {
	case s.Total == 0 && key.Pool.Name != "":
		why = append(why, "no pod the InferencePool selects has an IP")
	case s.Total == 0:
		why = append(why, "no endpoints in the Service's EndpointSlices")
	}
	return msg + ": " + strings.Join(why, ", ")
}

// backendState is a Builder's bookkeeping for one backend.
type backendState struct {
	backend *Backend
	// hosts are the Hosts acquired for the current pool's addresses.
	hosts []string
}

// SyncBackends makes the Builder keep exactly the backends named by keys and
// returns them. A backend that was already kept is returned as is (its pool
// and counters live on); a new one is built from its Service's or pool's
// latest snapshot; one no longer named is dropped. Gateway API route compilation
// calls it with every backendRef it resolved.
func (b *Builder) SyncBackends(keys []BackendKey) map[BackendKey]*Backend {
	b.mu.Lock()
	defer b.mu.Unlock()
	want := make(map[BackendKey]bool, len(keys))
	out := make(map[BackendKey]*Backend, len(keys))
	for _, k := range keys {
		want[k] = true
		st, ok := b.backends[k]
		if !ok {
			st = &backendState{backend: &Backend{Key: k, name: k.String()}}
			b.backends[k] = st
			b.buildBackend(st)
		}
		out[k] = st.backend
	}
	for k, st := range b.backends {
		if !want[k] {
			b.releaseHosts(st.hosts)
			delete(b.backends, k)
		}
	}
	return out
}

// PoolChanged implements inferencepool.Handler: it takes a pool's new
// snapshot and swaps new pools into the backends on it, so that a pod that
// stops being Ready leaves them at once, without retranslating any route.
func (b *Builder) PoolChanged(key types.NamespacedName, pool *inferencepool.Pool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if pool == nil {
		delete(b.pools, key)
	} else {
		b.pools[key] = pool
	}
	for k, st := range b.backends {
		if k.Pool == key {
			b.buildBackend(st)
		}
	}
}

// Service returns the latest snapshot of a Service, or nil when it does not
// exist (or is outside the watched namespaces).
func (b *Builder) Service(key types.NamespacedName) *discovery.Service {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.snapshots[key]
}

// rebuildBackends rebuilds the backends on one Service after its snapshot
// changed. b.mu is held.
func (b *Builder) rebuildBackends(svc types.NamespacedName) {
	for k, st := range b.backends {
		if k.Pool.Name == "" && k.Service == svc {
			b.buildBackend(st)
		}
	}
}

// buildBackend publishes a new state for a backend from its Service's or
// pool's snapshot. b.mu is held.
func (b *Builder) buildBackend(st *backendState) {
	k := st.backend.Key
	next := &BackendState{}
	var eps []discovery.Endpoint
	var proto upstream.Protocol
	switch snap := b.snapshots[k.Service]; {
	case k.Pool.Name != "":
		pool := b.pools[k.Pool]
		if pool == nil {
			next.Missing = fmt.Sprintf("InferencePool %s not found", k.Pool)
			break
		}
		eps, proto = pool.Endpoints, pool.Protocol
		next.EndpointPicker, next.FailOpen = pool.EndpointPicker, pool.FailOpen
		if p := balance.Policy(pool.Balancer); slices.Contains(balance.Policies, p) {
			next.Balancer = p
		}
	case snap == nil:
		next.Missing = fmt.Sprintf("Service %s not found", k.Service)
	case snap.Problem != "":
		next.Missing = snap.Problem
	default:
		next.Model = modelserver.Model(snap.Labels)
		if p := snap.ServicePort(k.Port); p != nil {
			eps = p.Endpoints
		} else {
			next.Missing = fmt.Sprintf("Service %s has no TCP port %d", k.Service, k.Port)
		}
	}
	var ready []balance.Endpoint
	var hosts []string
	for _, e := range eps {
		next.Total++
		switch {
		case e.Terminating:
			next.Terminating++
		case e.Ready:
			next.Ready++
			pod := ""
			if e.Pod.Name != "" {
				pod = e.Pod.String()
			}
			ready = append(ready, balance.Endpoint{Address: e.Address, Pod: pod, Host: b.hosts.Acquire(e.Address), Protocol: proto})
			hosts = append(hosts, e.Address)
		default:
			next.NotReady++
		}
	}
	slices.SortFunc(ready, func(a, b balance.Endpoint) int { return cmp.Compare(a.Address, b.Address) })
	next.Pool = balance.NewPool(ready, balance.PoolOptions{MaxPerEndpoint: b.opts.MaxPerEndpoint, InFlight: &st.backend.inflight})
	if b.opts.BuildRing || balance.NeedsRing(next.Balancer) {
		next.Pool.Ring()
	}
	st.backend.state.Store(next)
	// Release after acquiring, so an address the backend keeps keeps its
	// state.
	b.releaseHosts(st.hosts)
	st.hosts = hosts
}

func (b *Builder) releaseHosts(addrs []string) {
	for _, a := range addrs {
		b.hosts.Release(a)
	}
}
