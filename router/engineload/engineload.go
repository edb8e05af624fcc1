// Package engineload feeds what the model servers report about their own
// load (queue depth, KV-cache usage) and LoRA adapters (those in use, the
// slots) into the router's hosts, for the load-aware, cache-aware and
// LoRA-affinity picks. The scraping and the choice of pods to scrape are the
// metrics adapter's (metricsadapter/scrape and metricsadapter/targets); an
// Observer keeps each pod's latest sample of what the balancer reads, and
// a Feeder copies the fresh ones into each Ready endpoint's health.Host,
// where a pick reads them without locks or allocations.
package engineload

import (
	"context"
	"strings"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/klog/v2"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/scrape"
	"github.com/capstan-dev/capstan/router/health"
	"github.com/capstan-dev/capstan/router/route"
)

// Wants is the scraper's Options.Wants for an Observer: the catalogue
// metrics behind health.EngineLoad and health.LoRAState, and no others.
func Wants(m catalogue.Metric) bool {
	switch m.Name {
	case catalogue.RequestsWaiting, catalogue.RequestsRunning, catalogue.KVCacheUsage,
		catalogue.LoRAAdapterRunningPods, catalogue.LoRAAdapterWaitingPods, catalogue.LoRAMaxAdapters:
		return true
	}
	return false
}

// Observer is a scrape.Observer that keeps each pod's latest engine load
// and LoRA state; the scraper must want what Wants does.
type Observer struct {
	maxAge time.Duration
	// Catalogue IDs of the metrics read, -1 when the catalogue lacks one.
	waiting, running, kvCache int
	lora                      loraIDs

	mu   sync.RWMutex
	pods map[types.NamespacedName]sample

	logger klog.Logger
}

type sample struct {
	Sample
	at time.Time
}

// Sample is what a pod's engine reported.
type Sample struct {
	Load health.EngineLoad
	// LoRA is nil when the engine reports no LoRA state, or one that is
	// incomplete or over the bounds (see MaxLoRASlots).
	LoRA *health.LoRAState
}

var _ scrape.Observer = &Observer{}

// NewObserver returns an observer of scrapes mapped by c whose samples are
// served until they are maxAge old.
func NewObserver(c *catalogue.Catalogue, maxAge time.Duration) *Observer {
	id := func(name string) int {
		if id, ok := c.ID(name); ok {
			return id
		}
		return -1
	}
	return &Observer{
		maxAge:  maxAge,
		waiting: id(catalogue.RequestsWaiting), running: id(catalogue.RequestsRunning), kvCache: id(catalogue.KVCacheUsage),
		lora:   loraIDs{running: id(catalogue.LoRAAdapterRunningPods), waiting: id(catalogue.LoRAAdapterWaitingPods), slots: id(catalogue.LoRAMaxAdapters)},
		pods:   map[types.NamespacedName]sample{},
		logger: klog.Background().WithValues("component", "engineload"),
	}
}

// Observe implements scrape.Observer. A value the engine does not report
// (TGI has no KV-cache usage) counts as 0.
func (o *Observer) Observe(t scrape.Target, at time.Time, v *catalogue.Values) {
	s := sample{at: at, Sample: Sample{Load: health.EngineLoad{
		Waiting: scalar(v, o.waiting), Running: scalar(v, o.running), KVCacheUsage: scalar(v, o.kvCache),
	}}}
	var err error
	if s.LoRA, err = o.lora.state(v); err != nil {
		// Counts as no report: the endpoint is neither preferred nor
		// passed over for an adapter.
		o.logger.V(4).Info("Ignoring the pod's LoRA report", "pod", t.Key, "err", err)
	}
	o.mu.Lock()
	o.pods[t.Key] = s
	o.mu.Unlock()
}

func scalar(v *catalogue.Values, id int) float64 {
	if id < 0 || !v.Has[id] {
		return 0
	}
	return v.Scalar[id]
}

// Forget implements scrape.Observer.
func (o *Observer) Forget(key types.NamespacedName) {
	o.mu.Lock()
	delete(o.pods, key)
	o.mu.Unlock()
}

// Latest returns the pod's latest sample if it is younger than the maximum
// age.
func (o *Observer) Latest(pod types.NamespacedName) (Sample, bool) {
	o.mu.RLock()
	s, ok := o.pods[pod]
	o.mu.RUnlock()
	if !ok || time.Since(s.at) > o.maxAge {
		return Sample{}, false
	}
	return s.Sample, true
}

// Source gives a pod's latest fresh sample, or false when there is none.
type Source interface {
	Latest(pod types.NamespacedName) (Sample, bool)
}

var _ Source = &Observer{}

// Feeder copies loads from a Source into the hosts of the routing table.
type Feeder struct {
	Source Source
	Table  func() *route.Table
	// Interval between passes; a fraction of the scrape interval keeps the
	// lag small.
	Interval time.Duration
}

// Run feeds every Interval until ctx ends.
func (f *Feeder) Run(ctx context.Context) {
	wait.UntilWithContext(ctx, func(context.Context) { f.Sync() }, f.Interval)
}

// Sync makes one pass: every Ready endpoint's host gets its pod's latest
// load and LoRA state, or none when the pod has no fresh sample.
func (f *Feeder) Sync() {
	for _, m := range f.Table().Models() {
		for _, e := range m.Pool.Endpoints() {
			ns, name, ok := strings.Cut(e.Pod, "/")
			if !ok {
				e.Host.SetEngineLoad(nil)
				e.Host.SetLoRA(nil)
				continue
			}
			s, ok := f.Source.Latest(types.NamespacedName{Namespace: ns, Name: name})
			switch cur := e.Host.EngineLoad(); {
			case !ok:
				if cur != nil {
					e.Host.SetEngineLoad(nil)
				}
			case cur == nil || *cur != s.Load:
				e.Host.SetEngineLoad(&s.Load)
			}
			// A sample's LoRA state is made once per scrape and never
			// changed, so an unchanged pointer is an unchanged state.
			if e.Host.LoRA() != s.LoRA {
				e.Host.SetLoRA(s.LoRA)
			}
		}
	}
}
