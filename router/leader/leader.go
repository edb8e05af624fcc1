// Package leader elects the one router replica that writes: the Gateway API
// status and the loads of declared LoRA adapters. Every replica routes;
// losing the Lease only stops the writing, never the routing.
package leader

import (
	"context"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/apimachinery/pkg/util/uuid"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	componentbaseconfig "k8s.io/component-base/config"
	"k8s.io/klog/v2"
)

// Elector campaigns for the Lease and tells its subscribers when this
// replica starts and stops leading.
type Elector struct {
	elector *leaderelection.LeaderElector // nil without leader election
	leading atomic.Bool
	gauge   prometheus.Gauge

	mu          sync.Mutex
	subscribers []func(leading bool)
}

// New returns an Elector for the Lease cfg names; with cfg.LeaderElect
// false, this replica always leads.
func New(client kubernetes.Interface, cfg componentbaseconfig.LeaderElectionConfiguration, reg prometheus.Registerer) (*Elector, error) {
	e := &Elector{gauge: prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "capstan_router", Name: "leader",
		Help: "1 while this replica leads: it writes Gateway API status and loads declared LoRA adapters.",
	})}
	reg.MustRegister(e.gauge)
	if !cfg.LeaderElect {
		return e, nil
	}
	host, err := os.Hostname()
	if err != nil {
		return nil, fmt.Errorf("leader election identity: %w", err)
	}
	lock, err := resourcelock.New(cfg.ResourceLock, cfg.ResourceNamespace, cfg.ResourceName,
		client.CoreV1(), client.CoordinationV1(), resourcelock.ResourceLockConfig{Identity: host + "_" + string(uuid.NewUUID())})
	if err != nil {
		return nil, fmt.Errorf("leader election lock: %w", err)
	}
	e.elector, err = leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock:            lock,
		LeaseDuration:   cfg.LeaseDuration.Duration,
		RenewDeadline:   cfg.RenewDeadline.Duration,
		RetryPeriod:     cfg.RetryPeriod.Duration,
		ReleaseOnCancel: true,
		Name:            "capstan-router",
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(context.Context) { e.set(true) },
			OnStoppedLeading: func() { e.set(false) },
		},
	})
	return e, err
}

// Subscribe has f called, without blocking, whenever this replica starts
// or stops leading. Call it before Run.
func (e *Elector) Subscribe(f func(leading bool)) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.subscribers = append(e.subscribers, f)
}

// Leading reports whether this replica leads now.
func (e *Elector) Leading() bool { return e.leading.Load() }

// Run holds or seeks the Lease until ctx ends, and releases it then so that
// another replica takes over at once rather than after the lease duration.
func (e *Elector) Run(ctx context.Context) {
	if e.elector == nil {
		e.set(true)
		<-ctx.Done()
		return
	}
	logger := klog.FromContext(ctx)
	for ctx.Err() == nil {
		e.elector.Run(ctx)
		if ctx.Err() == nil {
			logger.Info("Lost the Lease; campaigning again")
		}
	}
}

func (e *Elector) set(leading bool) {
	e.leading.Store(leading)
	v := 0.0
	if leading {
		v = 1
	}
	e.gauge.Set(v)
	e.mu.Lock()
	subscribers := e.subscribers
	e.mu.Unlock()
	for _, f := range subscribers {
		f(leading)
	}
}
