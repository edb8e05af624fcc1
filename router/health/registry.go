package health

import "sync"

// Registry hands out one Host per address and keeps it while any holder
// references it, so every pool that contains an address, in any generation,
// shares one in-flight count and one ejection state.
type Registry struct {
	policy EjectionPolicy
	// forgotten, when set, is told each address the registry forgets.
	forgotten func(address string)

	mu    sync.Mutex
	hosts map[string]*entry
}

type entry struct {
	host *Host
	refs int
}

// NewRegistry returns an empty registry whose hosts follow policy.
func NewRegistry(policy EjectionPolicy) *Registry {
	return &Registry{policy: policy, hosts: map[string]*entry{}}
}

// Acquire returns the Host for address, creating it if needed, and takes a
// reference that Release gives back.
func (r *Registry) Acquire(address string) *Host {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.hosts[address]
	if !ok {
		e = &entry{host: &Host{address: address, policy: &r.policy}}
		r.hosts[address] = e
	}
	e.refs++
	return e.host
}

// OnForget makes the registry call forgotten with every address it forgets
// (outside its lock), so that the connections to an address that left every
// pool are closed. Call it before the registry is used.
func (r *Registry) OnForget(forgotten func(address string)) { r.forgotten = forgotten }

// Release gives back a reference taken by Acquire. When the last one goes,
// the address is forgotten; requests still in flight to it hold the Host
// and finish against it.
func (r *Registry) Release(address string) {
	r.mu.Lock()
	e, ok := r.hosts[address]
	gone := ok && e.refs <= 1
	if gone {
		delete(r.hosts, address)
	} else if ok {
		e.refs--
	}
	r.mu.Unlock()
	if gone && r.forgotten != nil {
		r.forgotten(address)
	}
}

// Get returns the Host for address if some holder references it.
func (r *Registry) Get(address string) (*Host, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.hosts[address]
	if !ok {
		return nil, false
	}
	return e.host, true
}

// Len is the number of addresses referenced.
func (r *Registry) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.hosts)
}
