// Package loader keeps the LoRA adapters that models' Services declare
// (lora.Annotation) loaded on the models' Ready pods, through the engines'
// own API.
//
// Every pass starts again from the current routing table: which endpoints
// of a model are Ready now and which adapters each of them lists. An adapter
// goes to as many Ready endpoints as its declaration wants, the ones that
// list it first, then the others in an order fixed by the adapter's and the
// endpoint's names (so every pass and every new leader chooses the same);
// a pod that left is simply no longer there to count. A load the engine
// acknowledged counts once the engine lists the adapter, never before. An
// endpoint whose load or unload failed is tried again after a per-endpoint
// backoff, with a Warning Event on the declaring Service. An adapter that
// is no longer declared is unloaded from every Ready endpoint that lists
// it; one that is still declared is never unloaded, since requests for it
// may be running.
//
// Only the leader calls the engines; every replica keeps track of what was
// declared, so that a new leader unloads what was removed before it led.
package loader

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/util/flowcontrol"
	"k8s.io/klog/v2"

	"github.com/capstan-dev/capstan/router/balance"
	"github.com/capstan-dev/capstan/router/route"
)

// parallel bounds the engine calls of one pass.
const parallel = 8

// Engines is what the loader needs of the engines: what each lists, asked
// again after a call, and the calls (lora.Poller and lora.Client).
type Engines interface {
	Loaded(addr string) ([]string, bool)
	Refresh(ctx context.Context, addr string) error
	Load(ctx context.Context, addr, name, source string) error
	Unload(ctx context.Context, addr, name string) error
}

// Recorder puts Events on the Service that declares an adapter.
type Recorder interface {
	Eventf(svc types.NamespacedName, uid types.UID, eventType, reason, format string, args ...any)
}

// Options configures a Loader.
type Options struct {
	// Interval between passes; Timeout bounds one engine call.
	Interval, Timeout time.Duration
	Table             func() *route.Table
	Engines           Engines
	// Leading reports whether this replica may call the engines.
	Leading  func() bool
	Recorder Recorder
	// Backoff spaces the tries of one endpoint and adapter; its clock is
	// the loader's.
	Backoff *flowcontrol.Backoff
}

// Loader keeps declared adapters loaded.
type Loader struct {
	opts    Options
	metrics *metrics

	mu sync.Mutex
	// declared is every adapter seen declared since the start, by base
	// model and name; removed are those no longer declared that a Ready
	// endpoint of their model may still list.
	declared map[key]route.DeclaredAdapter
	removed  map[key]route.DeclaredAdapter
}

type key struct{ model, adapter string }

// New returns a Loader whose metrics are registered in reg.
func New(opts Options, reg prometheus.Registerer) *Loader {
	l := &Loader{opts: opts, declared: map[key]route.DeclaredAdapter{}, removed: map[key]route.DeclaredAdapter{}}
	l.metrics = newMetrics(reg, opts.Table)
	return l
}

// Run makes a pass every Interval until ctx ends.
func (l *Loader) Run(ctx context.Context) {
	wait.UntilWithContext(ctx, l.Sync, l.opts.Interval)
}

// call is one engine call a pass makes.
type call struct {
	model   *route.Model
	adapter route.DeclaredAdapter
	ep      balance.Endpoint
	unload  bool
}

func (c call) id() string {
	op := load.name
	if c.unload {
		op = unload.name
	}
	return op + "/" + c.adapter.Name + "/" + c.ep.Address
}

// Sync makes one pass.
func (l *Loader) Sync(ctx context.Context) {
	t := l.opts.Table()
	l.track(t)
	if !l.opts.Leading() {
		return
	}
	now := l.opts.Backoff.Clock.Now()
	l.opts.Backoff.GC()
	var calls []call
	for _, m := range t.Models() {
		eps := m.Pool.Endpoints()
		for _, a := range m.Adapters {
			if e := t.Lookup(a.Name); e == nil || e.Base != m.Name || !e.Declared {
				continue // a model's name, or an adapter of two models
			}
			calls = append(calls, l.loads(m, a, eps, now)...)
		}
		calls = append(calls, l.unloads(m, eps, now)...)
	}
	var g errgroup.Group
	g.SetLimit(parallel)
	for _, c := range calls {
		g.Go(func() error { l.do(ctx, c); return nil })
	}
	_ = g.Wait()
}

// track updates what is declared and what was removed from t.
func (l *Loader) track(t *route.Table) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := map[key]route.DeclaredAdapter{}
	for _, m := range t.Models() {
		for _, a := range m.Adapters {
			now[key{m.Name, a.Name}] = a
		}
	}
	for k, a := range l.declared {
		if _, ok := now[k]; !ok {
			l.removed[k] = a
		}
	}
	for k := range now {
		delete(l.removed, k)
	}
	l.declared = now
	// A removed adapter is forgotten once no Ready endpoint of its model
	// lists it (or the model is gone).
	for k := range l.removed {
		m := t.Lookup(k.model)
		if m == nil || m.Base != "" || !slices.ContainsFunc(m.Pool.Endpoints(), func(e balance.Endpoint) bool { return l.lists(e.Address, k.adapter) }) {
			delete(l.removed, k)
		}
	}
}

func (l *Loader) lists(addr, adapter string) bool {
	loaded, _ := l.opts.Engines.Loaded(addr)
	return slices.Contains(loaded, adapter)
}

// loads returns the loads that bring a to as many of eps as it wants.
func (l *Loader) loads(m *route.Model, a route.DeclaredAdapter, eps []balance.Endpoint, now time.Time) []call {
	var have int
	var without []balance.Endpoint
	for _, e := range eps {
		if l.lists(e.Address, a.Name) {
			have++
		} else if _, reported := l.opts.Engines.Loaded(e.Address); reported {
			// An endpoint that has not answered a model list yet is not
			// known to lack it.
			without = append(without, e)
		}
	}
	need := a.Want(len(eps)) - have
	if need <= 0 {
		return nil
	}
	slices.SortFunc(without, func(x, y balance.Endpoint) int { return cmp.Compare(rank(a.Name, x.Address), rank(a.Name, y.Address)) })
	var calls []call
	for _, e := range without {
		c := call{model: m, adapter: a, ep: e}
		if l.opts.Backoff.IsInBackOffSinceUpdate(c.id(), now) {
			continue
		}
		calls = append(calls, c)
		if len(calls) == need {
			break
		}
	}
	return calls
}

// unloads returns the unloads of m's removed adapters from the endpoints
// that list them.
func (l *Loader) unloads(m *route.Model, eps []balance.Endpoint, now time.Time) []call {
	l.mu.Lock()
	defer l.mu.Unlock()
	var calls []call
	for k, a := range l.removed {
		if k.model != m.Name {
			continue
		}
		for _, e := range eps {
			c := call{model: m, adapter: a, ep: e, unload: true}
			if l.lists(e.Address, a.Name) && !l.opts.Backoff.IsInBackOffSinceUpdate(c.id(), now) {
				calls = append(calls, c)
			}
		}
	}
	return calls
}

// rank orders the endpoints an adapter goes to: rendezvous hashing, so
// that an endpoint's leaving moves only its own adapters.
func rank(adapter, addr string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(adapter))
	h.Write([]byte{0})
	h.Write([]byte(addr))
	return h.Sum64()
}

// operation names what a call does, in metrics, logs and Events.
type operation struct{ name, done, doneReason, failedReason string }

var (
	load   = operation{"load", "Loaded", "LoRAAdapterLoaded", "LoRAAdapterLoadFailed"}
	unload = operation{"unload", "Unloaded", "LoRAAdapterUnloaded", "LoRAAdapterUnloadFailed"}
)

// do makes one call and checks its effect in the engine's model list.
func (l *Loader) do(parent context.Context, c call) {
	logger := klog.FromContext(parent).WithValues("model", c.model.Name, "adapter", c.adapter.Name, "endpoint", c.ep.Address, "pod", c.ep.Pod)
	ctx, cancel := context.WithTimeout(parent, l.opts.Timeout)
	defer cancel()
	op := load
	var err error
	if c.unload {
		op = unload
		err = l.opts.Engines.Unload(ctx, c.ep.Address, c.adapter.Name)
	} else {
		err = l.opts.Engines.Load(ctx, c.ep.Address, c.adapter.Name, c.adapter.Source)
	}
	// The engine's list decides, whatever it answered: an adapter another
	// replica loaded a moment ago is there although this load failed.
	if rerr := l.opts.Engines.Refresh(ctx, c.ep.Address); rerr != nil && err == nil {
		err = fmt.Errorf("reading its model list afterwards: %w", rerr)
	}
	if err == nil && l.lists(c.ep.Address, c.adapter.Name) == c.unload {
		err = errors.New("the engine answered 200 but its model list says otherwise")
	}
	if parent.Err() != nil {
		return // stopping
	}
	where := c.ep.Address
	if c.ep.Pod != "" {
		where = "pod " + c.ep.Pod + " (" + c.ep.Address + ")"
	}
	if err != nil {
		l.opts.Backoff.Next(c.id(), l.opts.Backoff.Clock.Now())
		next := l.opts.Backoff.Get(c.id())
		l.metrics.calls.WithLabelValues(op.name, "error").Inc()
		logger.Info("A LoRA adapter call failed", "operation", op.name, "err", err, "retryIn", next)
		l.opts.Recorder.Eventf(c.adapter.Service, c.adapter.UID, corev1.EventTypeWarning, op.failedReason,
			"Could not %s LoRA adapter %s of model %s on %s: %v; trying again in %s", op.name, c.adapter.Name, c.model.Name, where, err, next)
		return
	}
	l.opts.Backoff.Reset(c.id())
	l.metrics.calls.WithLabelValues(op.name, "success").Inc()
	logger.V(2).Info("LoRA adapter "+op.done, "operation", op.name, "source", c.adapter.Source)
	l.opts.Recorder.Eventf(c.adapter.Service, c.adapter.UID, corev1.EventTypeNormal, op.doneReason,
		"%s LoRA adapter %s of model %s on %s", op.done, c.adapter.Name, c.model.Name, where)
}
