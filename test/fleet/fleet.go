// Package fleet simulates a fleet of model servers for a local cluster. It
// watches pods labelled capstan.dev/model and, for each one with a pod IP,
// serves a fake inference engine on that IP and the pod's ports: the OpenAI
// endpoints, /health, and /metrics in the real exposition format and names
// of the engine named by capstan.dev/engine (vLLM, SGLang, TGI or
// Triton/TensorRT-LLM). Metric values follow the load each pod really
// receives, and annotations (see params.go) set latency, batch size and
// faults per pod. A deleted pod runs its preStop sleep, then drains. With
// Options.Echo it also plays the Gateway API conformance suite's echo
// backends (see echo.go), and with Options.LWEPP the Inference Extension's
// lightweight endpoint picker (see lwepp.go).
package fleet

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

// Options are the fleet-wide defaults; pod annotations override them.
type Options struct {
	// Namespace limits the fleet to one namespace; empty means all.
	Namespace string
	// MaxRunning is each engine's batch size. Default 8.
	MaxRunning int
	// TTFT is the time to first token. Default 10ms.
	TTFT time.Duration
	// TPOT is the time per output token after the first. Default 1ms.
	TPOT time.Duration
	// OutputTokens is the natural length of a response. Default 16.
	OutputTokens int
	// DrainTimeout bounds how long a deleted pod finishes in-flight
	// requests. Default 30s.
	DrainTimeout time.Duration
	// Echo also serves pods that are not model servers but echo backends
	// (see EchoAnnotation), as the Gateway API conformance suite deploys.
	// It widens the watch from model pods to all pods.
	Echo bool
	// LWEPP, if set, also plays pods running the Gateway API Inference
	// Extension's lwepp image by running lwepp for each (see LWEPP). It
	// widens the watch from model pods to all pods.
	LWEPP *LWEPP
	// OnRequest, if set, is called as each API request arrives at a pod
	// (not for /metrics or /health). It must be quick and safe for
	// concurrent use.
	OnRequest func(Arrival)
}

// Arrival is one API request reaching a simulated pod; health checks,
// metrics scrapes and GET /v1/models are not reported.
type Arrival struct {
	Pod    types.NamespacedName
	IP     string
	Path   string
	Header http.Header
	At     time.Time
}

func (o Options) withDefaults() Options {
	if o.MaxRunning <= 0 {
		o.MaxRunning = 8
	}
	if o.TTFT == 0 {
		o.TTFT = 10 * time.Millisecond
	}
	if o.TPOT == 0 {
		o.TPOT = time.Millisecond
	}
	if o.OutputTokens <= 0 {
		o.OutputTokens = 16
	}
	if o.DrainTimeout <= 0 {
		o.DrainTimeout = 30 * time.Second
	}
	return o
}

// Fleet serves one simulated engine per model pod.
type Fleet struct {
	client kubernetes.Interface
	opts   Options
	logger klog.Logger

	mu      sync.Mutex
	servers map[types.UID]*podServer
	pickers map[types.UID]*lweppPod
	served  map[types.NamespacedName]*atomic.Int64 // outlives the pods
	drains  sync.WaitGroup
	stopped chan struct{} // closed once every server has been told to stop
}

// New returns a fleet that watches pods through client.
func New(client kubernetes.Interface, opts Options) *Fleet {
	return &Fleet{client: client, opts: opts.withDefaults(), servers: map[types.UID]*podServer{},
		pickers: map[types.UID]*lweppPod{}, served: map[types.NamespacedName]*atomic.Int64{}, stopped: make(chan struct{})}
}

// Start watches model pods until ctx ends and returns once the pods that
// exist now are being served. Call Wait after cancelling ctx.
func (f *Fleet) Start(ctx context.Context) error {
	f.logger = klog.FromContext(ctx).WithValues("component", "fleet")
	factory := informers.NewSharedInformerFactoryWithOptions(f.client, 0,
		informers.WithNamespace(f.opts.Namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			if !f.opts.Echo && f.opts.LWEPP == nil {
				o.LabelSelector = modelserver.ModelLabel
			}
		}))
	informer := factory.Core().V1().Pods().Informer()
	_, err := informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { f.sync(obj.(*corev1.Pod)) },
		UpdateFunc: func(_, obj any) { f.sync(obj.(*corev1.Pod)) },
		DeleteFunc: func(obj any) {
			if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = tomb.Obj
			}
			if pod, ok := obj.(*corev1.Pod); ok {
				f.remove(pod.UID)
			}
		},
	})
	if err != nil {
		return err
	}
	factory.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), informer.HasSynced) {
		return fmt.Errorf("fleet: pod cache did not sync: %w", ctx.Err())
	}
	go func() {
		<-ctx.Done()
		factory.Shutdown()
		f.stopAll()
	}()
	return nil
}

// Wait blocks until every simulated pod has stopped after Start's context
// ended.
func (f *Fleet) Wait() {
	<-f.stopped
	f.drains.Wait()
}

// Served returns how many API requests the pod has received.
func (f *Fleet) Served(pod types.NamespacedName) int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if n, ok := f.served[pod]; ok {
		return n.Load()
	}
	return 0
}

// Serving reports whether the fleet is serving the pod at its current IP. A
// pod can be Ready before the fleet's own watch has caught up with it, after
// an API server outage for example.
func (f *Fleet) Serving(pod *corev1.Pod) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	s, ok := f.servers[pod.UID]
	return ok && s.ip == pod.Status.PodIP && !s.isKilled()
}

// Kill stops the simulated engine of a pod the way a crashed process stops:
// its ports close and every connection to it, in-flight responses and
// streams included, is cut off at once, without a graceful drain. The pod
// object is left alone (it stays Ready until something else changes it), so
// connecting to it is refused from then on; a new pod, even of the same
// name, is served again. Kill reports whether the fleet was serving the pod.
func (f *Fleet) Kill(pod types.NamespacedName) bool {
	f.mu.Lock()
	var victims []*podServer
	for _, s := range f.servers {
		if s.key == pod && !s.isKilled() {
			victims = append(victims, s)
		}
	}
	f.mu.Unlock()
	for _, s := range victims {
		s.kill()
	}
	return len(victims) > 0
}

// newServerLocked creates the server for a pod, keeping its request count
// across pod restarts under the same name.
func (f *Fleet) newServerLocked(pod *corev1.Pod) *podServer {
	key := types.NamespacedName{Namespace: pod.Namespace, Name: pod.Name}
	if f.served[key] == nil {
		f.served[key] = new(atomic.Int64)
	}
	s := newPodServer(pod, f.opts, f.served[key], f.logger)
	f.servers[pod.UID] = s
	s.update(pod)
	return s
}

func (f *Fleet) sync(pod *corev1.Pod) {
	f.mu.Lock()
	defer f.mu.Unlock()
	select {
	case <-f.stopped:
		return
	default:
	}
	if f.opts.LWEPP != nil && lweppContainer(pod) != nil {
		f.syncPickerLocked(pod)
		return
	}
	s := f.servers[pod.UID]
	switch {
	case pod.DeletionTimestamp != nil:
		f.terminateLocked(pod, s)
	case pod.Spec.HostNetwork || pod.Status.PodIP == "":
		return
	case modelserver.Model(pod.Labels) == "" && !isEcho(pod):
		return // watched only because Echo widened the watch
	case s == nil:
		s = f.newServerLocked(pod)
		f.logger.V(4).Info("Serving simulated engine", "pod", klog.KObj(pod), "ip", s.ip, "ports", s.ports)
	case s.ip != pod.Status.PodIP:
		f.removeLocked(pod.UID)
		f.newServerLocked(pod)
	default:
		s.update(pod)
	}
}

// syncPickerLocked runs lwepp for a pod with an IP, and stops it when the
// pod is deleted or its IP changes. A deleted pod's lwepp stops at once:
// the pods the suite deploys have no preStop hook. The pod is Ready only
// while its lwepp serves (see LWEPP).
func (f *Fleet) syncPickerLocked(pod *corev1.Pod) {
	p := f.pickers[pod.UID]
	if p != nil && (pod.DeletionTimestamp != nil || p.ip != pod.Status.PodIP) {
		f.removeLocked(pod.UID)
		p = nil
	}
	if pod.DeletionTimestamp != nil {
		return
	}
	if p == nil && pod.Status.PodIP != "" && !pod.Spec.HostNetwork {
		ns, name := pod.Namespace, pod.Name
		p = startLWEPP(pod, f.opts.LWEPP, f.logger, func(serving bool) {
			f.drains.Go(func() { f.setUnready(ns, name, !serving) })
		})
		f.pickers[pod.UID] = p
		f.logger.V(4).Info("Running lwepp", "pod", klog.KObj(pod), "ip", pod.Status.PodIP)
	}
	if serving := p != nil && p.serving.Load(); (pod.Annotations[unreadyAnnotation] == "true") == serving {
		f.drains.Go(func() { f.setUnready(pod.Namespace, pod.Name, !serving) })
	}
}

// setUnready sets or removes a pod's unready annotation.
func (f *Fleet) setUnready(namespace, name string, unready bool) {
	value := "null"
	if unready {
		value = `"true"`
	}
	patch := fmt.Sprintf(`{"metadata":{"annotations":{%q:%s}}}`, unreadyAnnotation, value)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := f.client.CoreV1().Pods(namespace).Patch(ctx, name, types.MergePatchType, []byte(patch), metav1.PatchOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		f.logger.Error(err, "Setting the pod's readiness", "pod", klog.KRef(namespace, name), "unready", unready)
	}
}

// terminateLocked does what the kubelet does to a deleted pod: it runs the
// containers' preStop sleep, during which the engine serves as before, and
// then sends SIGTERM: the engine stops taking connections and finishes what
// is in flight. The pod object's own removal (the informer's delete) stops
// the engine at once, as the kubelet's kill would.
func (f *Fleet) terminateLocked(pod *corev1.Pod, s *podServer) {
	if s == nil || s.preStop != nil {
		return
	}
	sleep := preStopSleep(pod)
	if sleep == 0 {
		f.removeLocked(pod.UID)
		return
	}
	s.logger.V(4).Info("Running the preStop sleep", "duration", sleep)
	s.preStop = time.AfterFunc(sleep, func() { f.remove(pod.UID) })
}

// preStopSleep is the longest preStop sleep of the pod's containers.
func preStopSleep(pod *corev1.Pod) time.Duration {
	var longest int64
	for _, c := range pod.Spec.Containers {
		if c.Lifecycle != nil && c.Lifecycle.PreStop != nil && c.Lifecycle.PreStop.Sleep != nil {
			longest = max(longest, c.Lifecycle.PreStop.Sleep.Seconds)
		}
	}
	return time.Duration(longest) * time.Second
}

func (f *Fleet) remove(uid types.UID) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.removeLocked(uid)
}

func (f *Fleet) removeLocked(uid types.UID) {
	if p, ok := f.pickers[uid]; ok {
		delete(f.pickers, uid)
		f.drains.Go(p.stop)
		return
	}
	s, ok := f.servers[uid]
	if !ok {
		return
	}
	delete(f.servers, uid)
	if s.preStop != nil {
		s.preStop.Stop()
	}
	f.drains.Add(1)
	go func() {
		defer f.drains.Done()
		s.drain(f.opts.DrainTimeout)
	}()
}

func (f *Fleet) stopAll() {
	f.mu.Lock()
	defer f.mu.Unlock()
	defer close(f.stopped)
	for uid, p := range f.pickers {
		delete(f.pickers, uid)
		f.drains.Go(p.stop)
	}
	for uid, s := range f.servers {
		delete(f.servers, uid)
		if s.preStop != nil {
			s.preStop.Stop()
		}
		f.drains.Add(1)
		go func() {
			defer f.drains.Done()
			s.drain(time.Second)
		}()
	}
}
