// Package route decides which backends serve a request. A model is served by
// every Service labelled capstan.dev/model with its name, pooled; the Table
// maps each model name to that pool. Gateway API routes are the second way
// in: an HTTPTable maps a listener, host and request to a rule whose
// weighted backends are Service ports or InferencePools, each a Backend
// whose pool is built from the same per-Service snapshots or from the
// pool's own. The discovery and inferencepool packages know Services and
// pools, this package knows models and routes, and the balance package
// picks within one pool.
package route

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/router/balance"
	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/health"
	"github.com/capstan-dev/capstan/router/inferencepool"
	"github.com/capstan-dev/capstan/router/lora"
)

// Model is an immutable view of one model: its routable pool and why the
// rest of its endpoints are not routable.
type Model struct {
	Name string
	// Base, for a LoRA adapter, is the model whose endpoints have it
	// loaded; "" for a model.
	Base string
	// Pool holds the Ready, non-terminating endpoints of all the model's
	// Services, one per address.
	Pool *balance.Pool
	// Services are the model's pooled Services, sorted.
	Services []types.NamespacedName
	// Owner is the namespace that owns the model name: the one whose
	// Service claimed it first.
	Owner string
	// SharedWith are the other namespaces the owner pools with it.
	SharedWith []string
	// Refused are the Services of other namespaces that claim the model
	// and get no traffic, sorted.
	Refused []RefusedClaim
	// Total counts every distinct endpoint address; Ready, NotReady and
	// Terminating split it.
	Total, Ready, NotReady, Terminating int
	// Problems say why some Service has no endpoints at all (no port).
	Problems []string
	// Adapters, for a model, are the LoRA adapters its pooled Services
	// declare (lora.Annotation), sorted by name.
	Adapters []DeclaredAdapter
	// Declared, for an adapter, is whether its base model declares it: a
	// request for it may wait while it is being loaded.
	Declared bool
}

// Unavailable explains why the model has no Ready endpoint, for a 503.
func (m *Model) Unavailable() string {
	if m.Base != "" {
		// An adapter is listed without endpoints only when it cannot be
		// served at all.
		return strings.Join(m.Problems, ", ")
	}
	msg := fmt.Sprintf("model %s has 0 ready of %d endpoints", m.Name, m.Total)
	var why []string
	if m.NotReady > 0 {
		why = append(why, fmt.Sprintf("%d not ready", m.NotReady))
	}
	if m.Terminating > 0 {
		why = append(why, fmt.Sprintf("%d terminating", m.Terminating))
	}
	if m.Total == 0 {
		why = append(why, fmt.Sprintf("no endpoints in the EndpointSlices of %s", joinKeys(m.Services)))
	}
	why = append(why, m.Problems...)
	return msg + ": " + strings.Join(why, ", ")
}

func joinKeys(keys []types.NamespacedName) string {
	s := make([]string, len(keys))
	for i, k := range keys {
		s[i] = "Service " + k.String()
	}
	return strings.Join(s, ", ")
}

// Table is an immutable snapshot of every model and LoRA adapter. Lookups
// take no lock.
type Table struct {
	models map[string]*Model
	sorted []*Model
	// adapters are served from the endpoints of their base model that
	// report them loaded; a model's own name is never an adapter's.
	adapters       map[string]*Model
	sortedAdapters []*Model
}

// Lookup returns a model or an adapter, or nil when nothing serves it.
func (t *Table) Lookup(name string) *Model {
	if m := t.models[name]; m != nil {
		return m
	}
	return t.adapters[name]
}

// Models returns every model, sorted by name.
func (t *Table) Models() []*Model { return t.sorted }

// Adapters returns every LoRA adapter, sorted by name.
func (t *Table) Adapters() []*Model { return t.sortedAdapters }

// Options configures how pools are built.
type Options struct {
	// MaxPerEndpoint is the per-endpoint in-flight limit (0: none).
	MaxPerEndpoint int64
	// MaxPerModel is the per-model in-flight limit (0: none).
	MaxPerModel int64
	// BuildRing builds each pool's consistent-hash ring as the pool is made,
	// for the affinity balancers.
	BuildRing bool
	// Recorder, when set, is told about refused claims and invalid
	// adapter declarations.
	Recorder Recorder
	// ModelChanged, when set, is called with the name of every model
	// whose entry a published table rebuilt, and of every adapter whose
	// entry may have changed, after publishing it. It is called with the
	// Builder's lock held and must not block.
	ModelChanged func(model string)
}

// Builder keeps the routing table up to date from Service snapshots. It
// implements discovery.Handler.
type Builder struct {
	hosts *health.Registry
	opts  Options

	table atomic.Pointer[Table]

	mu       sync.Mutex
	services map[types.NamespacedName]*serviceState
	// inflight keeps each model's in-flight counter across pool generations.
	inflight map[string]*atomic.Int64
	// snapshots are the latest snapshot of every Service discovery reports,
	// for Gateway API backends; backends are the backends routes use.
	snapshots map[types.NamespacedName]*discovery.Service
	backends  map[BackendKey]*backendState
	// pools are the latest snapshot of every InferencePool, for the
	// backends that name one.
	pools map[types.NamespacedName]*inferencepool.Pool
	// loaded are the LoRA adapters each endpoint address reports loaded.
	loaded map[string][]string
}

type serviceState struct {
	svc   *discovery.Service
	model string
	// adapters are the ones the Service declares, or adaptersErr says why
	// its declaration was not taken.
	adapters    []lora.Adapter
	adaptersErr error
	hosts       []*health.Host // parallel to svc.Endpoints
	// refused is whether the Service's claim on its model was refused in
	// the last build, so that a refusal is recorded once.
	refused bool
}

var (
	_ discovery.Handler     = (*Builder)(nil)
	_ inferencepool.Handler = (*Builder)(nil)
)

// NewBuilder returns a Builder with an empty table, taking host state from
// hosts.
func NewBuilder(hosts *health.Registry, opts Options) *Builder {
	b := &Builder{hosts: hosts, opts: opts, services: map[types.NamespacedName]*serviceState{}, inflight: map[string]*atomic.Int64{},
		snapshots: map[types.NamespacedName]*discovery.Service{}, backends: map[BackendKey]*backendState{},
		pools: map[types.NamespacedName]*inferencepool.Pool{}, loaded: map[string][]string{}}
	b.table.Store(&Table{models: map[string]*Model{}})
	return b
}

// Table returns the current table.
func (b *Builder) Table() *Table { return b.table.Load() }

// ServiceChanged takes a Service's new snapshot and publishes a table in
// which the models it served before and serves now are rebuilt, and new
// pools for the Gateway API backends on the Service.
func (b *Builder) ServiceChanged(key types.NamespacedName, svc *discovery.Service) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if svc == nil {
		delete(b.snapshots, key)
	} else {
		b.snapshots[key] = svc
	}
	b.rebuildBackends(key)
	affected := map[string]bool{}
	old, hadOld := b.services[key]
	delete(b.services, key)
	if svc != nil {
		if model := modelserver.Model(svc.Labels); model != "" {
			st := &serviceState{svc: svc, model: model, hosts: make([]*health.Host, len(svc.Endpoints)),
				refused: hadOld && old.model == model && old.refused}
			b.declare(st, old)
			for i, e := range svc.Endpoints {
				st.hosts[i] = b.hosts.Acquire(e.Address)
			}
			b.services[key] = st
			affected[model] = true
		}
	}
	// Release after acquiring, so an address the Service keeps keeps its
	// state.
	if hadOld {
		affected[old.model] = true
		for _, e := range old.svc.Endpoints {
			b.hosts.Release(e.Address)
		}
	}
	if len(affected) == 0 {
		// A Service that serves no model (a Gateway API backend): the
		// table stays as it is.
		return
	}
	current := b.table.Load()
	next := &Table{models: make(map[string]*Model, len(current.models)+1)}
	for name, m := range current.models {
		if !affected[name] {
			next.models[name] = m
		}
	}
	for name := range affected {
		if m := b.buildModel(name); m != nil {
			next.models[name] = m
		}
	}
	for _, m := range next.models {
		next.sorted = append(next.sorted, m)
	}
	slices.SortFunc(next.sorted, func(a, b *Model) int { return cmp.Compare(a.Name, b.Name) })
	b.addAdapters(next)
	b.table.Store(next)
	if b.opts.ModelChanged != nil {
		for name := range affected {
			b.opts.ModelChanged(name)
			if m := next.models[name]; m != nil {
				for _, a := range m.Adapters {
					b.opts.ModelChanged(a.Name)
				}
			}
		}
	}
}

// buildModel pools the endpoints of the Services of a model that its owner
// allows, or returns nil when it has no Services left.
func (b *Builder) buildModel(name string) *Model {
	m := &Model{Name: name}
	var claims []*serviceState
	for _, st := range b.services {
		if st.model == name {
			claims = append(claims, st)
		}
	}
	if len(claims) == 0 {
		delete(b.inflight, name)
		return nil
	}
	var pooled, refused []*serviceState
	m.Owner, m.SharedWith, pooled, refused = settleClaims(claims)
	type seen struct {
		ep   discovery.Endpoint
		host *health.Host
	}
	byAddr := map[string]seen{}
	for _, st := range pooled {
		m.Services = append(m.Services, st.svc.Key)
		if st.svc.Problem != "" {
			m.Problems = append(m.Problems, st.svc.Problem)
		}
		for i, e := range st.svc.Endpoints {
			// Two Services selecting the same pods must not double their
			// share; a routable copy wins, as within one Service.
			if old, dup := byAddr[e.Address]; dup && (old.ep.Routable() || !e.Routable()) {
				continue
			}
			byAddr[e.Address] = seen{e, st.hosts[i]}
		}
	}
	for _, st := range refused {
		c := RefusedClaim{Service: st.svc.Key, UID: st.svc.UID, Owner: m.Owner}
		m.Refused = append(m.Refused, c)
		if !st.refused && b.opts.Recorder != nil {
			b.opts.Recorder.ClaimRefused(name, c)
		}
	}
	for _, st := range claims {
		st.refused = slices.Contains(refused, st)
	}
	slices.SortFunc(m.Refused, func(a, b RefusedClaim) int { return cmp.Compare(a.Service.String(), b.Service.String()) })
	slices.SortFunc(m.Services, func(a, b types.NamespacedName) int { return cmp.Compare(a.String(), b.String()) })
	slices.Sort(m.Problems)
	m.Adapters = declaredAdapters(pooled)
	var eps []balance.Endpoint
	for _, s := range byAddr {
		m.Total++
		switch {
		case s.ep.Terminating:
			m.Terminating++
		case s.ep.Ready:
			m.Ready++
			pod := ""
			if s.ep.Pod.Name != "" {
				pod = s.ep.Pod.String()
			}
			eps = append(eps, balance.Endpoint{Address: s.ep.Address, Pod: pod, Host: s.host})
		default:
			m.NotReady++
		}
	}
	slices.SortFunc(eps, func(a, b balance.Endpoint) int { return cmp.Compare(a.Address, b.Address) })
	counter, ok := b.inflight[name]
	if !ok {
		counter = new(atomic.Int64)
		b.inflight[name] = counter
	}
	m.Pool = balance.NewPool(eps, balance.PoolOptions{MaxPerEndpoint: b.opts.MaxPerEndpoint, MaxInFlight: b.opts.MaxPerModel, InFlight: counter})
	if b.opts.BuildRing {
		m.Pool.Ring()
	}
	return m
}

// AdaptersChanged takes the LoRA adapters an endpoint address reports
// loaded (none: nil) and publishes a table whose adapters follow.
func (b *Builder) AdaptersChanged(address string, adapters []string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	changed := slices.Concat(b.loaded[address], adapters)
	if len(adapters) == 0 {
		delete(b.loaded, address)
	} else {
		b.loaded[address] = adapters
	}
	current := b.table.Load()
	next := &Table{models: current.models, sorted: current.sorted}
	b.addAdapters(next)
	b.table.Store(next)
	if b.opts.ModelChanged != nil {
		for _, name := range changed {
			b.opts.ModelChanged(name)
		}
	}
}

// addAdapters gives t an entry for every adapter that a Ready endpoint of
// a model reports, whose pool is exactly the endpoints of that model that
// report it, sharing the model's hosts and its in-flight count and limit,
// and one with an empty pool for every adapter a model declares that none
// of its Ready endpoints reports yet. An adapter reported by endpoints of
// two models, or declared by two, is served by neither (a name tenants'
// pods report must not send one tenant's request to another's model); one
// named like a model is that model.
func (b *Builder) addAdapters(t *Table) {
	t.adapters, t.sortedAdapters = map[string]*Model{}, nil
	type found struct {
		base     *Model
		eps      []balance.Endpoint
		others   []string // other models whose endpoints report or declare it
		declared bool
	}
	byName := map[string]*found{}
	add := func(name string, m *Model) *found {
		f := byName[name]
		if f == nil {
			f = &found{base: m}
			byName[name] = f
		}
		if f.base != m {
			if !slices.Contains(f.others, m.Name) {
				f.others = append(f.others, m.Name)
			}
			return nil
		}
		return f
	}
	for _, m := range t.sorted {
		for _, a := range m.Adapters {
			if f := add(a.Name, m); f != nil {
				f.declared = true
			}
		}
		if len(b.loaded) == 0 {
			continue
		}
		for _, e := range m.Pool.Endpoints() {
			for _, name := range b.loaded[e.Address] {
				if f := add(name, m); f != nil {
					f.eps = append(f.eps, e)
				}
			}
		}
	}
	for name, f := range byName {
		if t.models[name] != nil {
			continue
		}
		base := f.base
		a := &Model{Name: name, Base: base.Name, Owner: base.Owner, SharedWith: base.SharedWith, Services: base.Services, Declared: f.declared}
		eps := f.eps
		switch {
		case len(f.others) > 0:
			eps = nil
			a.Declared = false
			a.Problems = []string{fmt.Sprintf("LoRA adapter %s is loaded on or declared by more than one model (%s and %s), so none serves it",
				name, base.Name, strings.Join(f.others, ", "))}
		case len(eps) == 0:
			a.Problems = []string{fmt.Sprintf("LoRA adapter %s of model %s is declared, but none of the model's %d ready endpoints reports it loaded yet",
				name, base.Name, base.Pool.Len())}
		}
		a.Ready, a.Total = len(eps), len(eps)
		a.Pool = balance.NewPool(eps, balance.PoolOptions{MaxPerEndpoint: b.opts.MaxPerEndpoint, MaxInFlight: b.opts.MaxPerModel,
			InFlight: b.inflight[base.Name]})
		if b.opts.BuildRing {
			a.Pool.Ring()
		}
		t.adapters[name] = a
		t.sortedAdapters = append(t.sortedAdapters, a)
	}
	slices.SortFunc(t.sortedAdapters, func(a, b *Model) int { return cmp.Compare(a.Name, b.Name) })
}

// Addresses returns the address of every Ready endpoint of every model: the
// endpoints asked which adapters they have loaded.
func (t *Table) Addresses() []string {
	var addrs []string
	for _, m := range t.sorted {
		for _, e := range m.Pool.Endpoints() {
			addrs = append(addrs, e.Address)
		}
	}
	slices.Sort(addrs)
	return slices.Compact(addrs)
}
