package demo

import (
	"maps"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/test/fleet"
)

// Figures are what a run measured.
type Figures struct {
	// LoadStart is when the first client started; LoadEnd when the last
	// stopped.
	LoadStart, LoadEnd time.Time
	// FirstScaleUp is when an HPA first decided on more than one replica.
	FirstScaleUp time.Time
	// FirstNewPodServed is when a pod that did not exist at LoadStart first
	// answered a client through the router.
	FirstNewPodServed time.Time
	// ScaledDown is when, after the load, every model was back to one
	// replica.
	ScaledDown time.Time

	Requests, ClientErrors int64
	// ErrorSamples are the first few client errors.
	ErrorSamples []string
	// PeakReplicas is the most pods each model had bound at once;
	// PeakBound the most model pods bound at once in all.
	PeakReplicas map[string]int
	PeakBound    int
	// PendingReasons counts, by message, what the scheduler said about the
	// model pods it could not place.
	PendingReasons map[string]int

	// ZeroReached is when the idle model was first seen at zero replicas;
	// BurstStart when its burst was sent, BurstFirstByte when the first
	// answer of it came, BurstEnd when the last did; ZeroReturned when,
	// after the burst, it was back at zero.
	ZeroReached, BurstStart, BurstFirstByte, BurstEnd, ZeroReturned time.Time
	// PeakHeld is the most requests the router held at once.
	PeakHeld int
}

// Stats collects Figures from the clients, the simulated pods and the
// observer. Safe for concurrent use.
type Stats struct {
	mu          sync.Mutex
	f           Figures
	initialPods map[string]bool  // "<ns>/<name>" at LoadStart
	served      map[string]int64 // by pod, through the router, since servedSince
	servedSince time.Time
	arrivals    map[types.NamespacedName][]time.Time // at the simulated pods
}

func newStats() *Stats {
	return &Stats{f: Figures{PeakReplicas: map[string]int{}, PendingReasons: map[string]int{}},
		served: map[string]int64{}, servedSince: time.Now(), arrivals: map[types.NamespacedName][]time.Time{}}
}

// arrived is the fleet's OnRequest hook.
func (s *Stats) arrived(a fleet.Arrival) {
	s.mu.Lock()
	s.arrivals[a.Pod] = append(s.arrivals[a.Pod], a.At)
	s.mu.Unlock()
}

// Arrivals returns when each simulated pod received requests.
func (s *Stats) Arrivals() map[types.NamespacedName][]time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[types.NamespacedName][]time.Time, len(s.arrivals))
	for k, v := range s.arrivals {
		out[k] = append([]time.Time(nil), v...)
	}
	return out
}

// answered records one client request: the pod the router says served it
// (x-capstan-pod), or the error the client saw.
func (s *Stats) answered(pod, errMsg string, at time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.f.Requests++
	if errMsg != "" {
		s.f.ClientErrors++
		if len(s.f.ErrorSamples) < 10 {
			s.f.ErrorSamples = append(s.f.ErrorSamples, errMsg)
		}
		return
	}
	s.served[pod]++
	if s.initialPods != nil && !s.initialPods[pod] && s.f.FirstNewPodServed.IsZero() {
		s.f.FirstNewPodServed = at
	}
}

// takeServed returns and resets the per-pod counts, and the time they
// cover.
func (s *Stats) takeServed() (map[string]int64, time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	out, since := s.served, time.Since(s.servedSince)
	s.served, s.servedSince = map[string]int64{}, time.Now()
	return out, since
}

// Figures returns a copy of what has been measured so far.
func (s *Stats) Figures() Figures {
	s.mu.Lock()
	defer s.mu.Unlock()
	f := s.f
	f.ErrorSamples = append([]string(nil), s.f.ErrorSamples...)
	f.PeakReplicas = maps.Clone(s.f.PeakReplicas)
	f.PendingReasons = maps.Clone(s.f.PendingReasons)
	return f
}

// update changes the figures under the lock.
func (s *Stats) update(change func(*Figures)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	change(&s.f)
}
