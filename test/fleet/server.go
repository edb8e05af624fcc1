package fleet

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/test/fleet/paged"
)

// podServer is one simulated model-server pod: an HTTP server on each of the
// pod's ports at its pod IP, in front of one simulated engine.
type podServer struct {
	key     types.NamespacedName
	name    string
	ip      string
	ports   []int32
	model   string
	created time.Time
	opts    Options
	logger  klog.Logger

	pod     atomic.Pointer[corev1.Pod]
	engine  *engine
	exp     exporter
	metrics http.Handler
	srv     *http.Server
	seq     atomic.Int64
	served  *atomic.Int64

	mu        sync.Mutex
	listeners []net.Listener
	// holes are the ports' black-hole sockets while the black-hole fault
	// holds (see listenBlackHole).
	holes    []io.Closer
	draining bool
	// killed is set by kill: the server is gone for good.
	killed bool

	// preStop is the pod's running preStop sleep, after which it drains.
	// Guarded by the Fleet's mutex.
	preStop *time.Timer

	// paged, when set, is the vLLM-like engine that serves the requests
	// (SchedulerAnnotation) and scale its time scale.
	paged *pagedEngine
	scale float64
	// loras are the LoRA adapters the engine serves.
	loras *loras
}

func newPodServer(pod *corev1.Pod, opts Options, served *atomic.Int64, logger klog.Logger) *podServer {
	engineKind, err := modelserver.EngineOf(pod)
	if err != nil {
		logger.Info("Simulating the default engine", "pod", klog.KObj(pod), "err", err)
		engineKind = modelserver.DefaultEngine
	}
	s := &podServer{
		key:     types.NamespacedName{Namespace: pod.Namespace, Name: pod.Name},
		name:    pod.Name,
		ip:      pod.Status.PodIP,
		ports:   podPorts(pod),
		model:   modelserver.Model(pod.Labels),
		created: time.Now(),
		opts:    opts,
		served:  served,
		logger:  klog.LoggerWithValues(logger, "pod", klog.KObj(pod)),
	}
	s.pod.Store(pod)
	p := paramsFor(pod, opts)
	s.engine = newEngine(p.maxRunning)
	var st load = s.engine
	s.scale = 1
	var adapters []string
	if pod.Annotations[SchedulerAnnotation] == "vllm" {
		var cfg paged.Config
		cfg, s.scale, adapters = pagedConfig(pod)
		s.paged = newPagedEngine(cfg, s.scale)
		st = s.paged
	}
	s.loras = newLoRAs(adapters)
	reg := prometheus.NewRegistry()
	s.exp = newExporter(engineKind, pod.Annotations[EngineVersionAnnotation] == "legacy", s.model, st, reg)
	s.metrics = promhttp.HandlerFor(reg, promhttp.HandlerOpts{EnableOpenMetrics: true})
	_, metricsPath, err := modelserver.MetricsEndpoint(pod)
	if err != nil {
		metricsPath = modelserver.DefaultMetricsPath
	}

	var handler http.Handler
	var protocols *http.Protocols
	if isEcho(pod) {
		s.ports, handler, protocols = s.echoServing(pod)
	} else {
		handler = s.engineHandler(metricsPath, runtimeLoRAUpdating(pod))
	}
	s.srv = &http.Server{
		Handler:           s.observe(handler),
		ReadHeaderTimeout: 10 * time.Second,
		Protocols:         protocols,
	}
	return s
}

// engineHandler routes a model server's endpoints, with vLLM's run-time
// adapter loading when loraUpdating.
func (s *podServer) engineHandler(metricsPath string, loraUpdating bool) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", s.serveHealth)
	mux.HandleFunc("GET /v2/health/ready", s.serveHealth) // Triton's readiness path
	mux.HandleFunc("GET "+metricsPath, s.serveMetrics)
	mux.HandleFunc("GET /v1/models", s.serveModels)
	mux.HandleFunc("/v1/completions", func(w http.ResponseWriter, r *http.Request) { s.serveInference(w, r, completions) })
	mux.HandleFunc("/v1/chat/completions", func(w http.ResponseWriter, r *http.Request) { s.serveInference(w, r, chatCompletions) })
	mux.HandleFunc("/v1/embeddings", func(w http.ResponseWriter, r *http.Request) { s.serveInference(w, r, embeddings) })
	if loraUpdating {
		mux.HandleFunc("POST /v1/load_lora_adapter", s.serveLoadLoRA)
		mux.HandleFunc("POST /v1/unload_lora_adapter", s.serveUnloadLoRA)
	}
	return mux
}

// podPorts lists the pod's TCP container ports and metrics port, or the
// default port when it declares none.
func podPorts(pod *corev1.Pod) []int32 {
	seen := map[int32]bool{}
	var ports []int32
	add := func(p int32) {
		if p > 0 && !seen[p] {
			seen[p] = true
			ports = append(ports, p)
		}
	}
	for _, c := range pod.Spec.Containers {
		for _, p := range c.Ports {
			if p.Protocol == "" || p.Protocol == corev1.ProtocolTCP {
				add(p.ContainerPort)
			}
		}
	}
	if port, _, err := modelserver.MetricsEndpoint(pod); err == nil {
		add(port)
	}
	return ports
}

// observe counts requests, echoes x-request-id the way vLLM does, and reports
// each arrival to the fleet's observer.
func (s *podServer) observe(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if hasFault(s.pod.Load(), FaultBlackHole) {
			// A connection opened before the pod's network went: what
			// is sent on it never arrives, and nothing comes back. The
			// body is read so that the server notices the client
			// closing (it watches the connection only then).
			_, _ = io.Copy(io.Discard, io.LimitReader(r.Body, 32<<20))
			<-r.Context().Done()
			return
		}
		if id := r.Header.Get("X-Request-Id"); id != "" {
			w.Header().Set("X-Request-Id", id)
		}
		// Probes, scrapes and model-list polls (the router's adapter
		// discovery) are not the traffic tests count.
		if r.URL.Path != "/metrics" && r.URL.Path != "/health" && !(r.Method == http.MethodGet && r.URL.Path == "/v1/models") {
			s.served.Add(1)
			if s.opts.OnRequest != nil {
				s.opts.OnRequest(Arrival{Pod: s.key, IP: s.ip, Path: r.URL.Path, Header: r.Header.Clone(), At: time.Now()})
			}
		}
		next.ServeHTTP(w, r)
	})
}

func (s *podServer) params() params { return paramsFor(s.pod.Load(), s.opts) }

// scaled turns a request's wall-clock durations into the modelled engine's.
func (s *podServer) scaled(f finished) finished {
	for _, d := range []*time.Duration{&f.queued, &f.prefill, &f.ttft, &f.e2e} {
		*d = time.Duration(float64(*d) / s.scale)
	}
	return f
}

func (s *podServer) serveHealth(w http.ResponseWriter, r *http.Request) {
	p := s.params()
	if p.faults[FaultHTTP500] {
		w.WriteHeader(http.StatusInternalServerError)
		return
	}
	w.WriteHeader(http.StatusOK)
}

func (s *podServer) serveMetrics(w http.ResponseWriter, r *http.Request) {
	p := s.params()
	if p.faults[FaultSlow] && !sleep(r.Context(), p.faultDelay) {
		return
	}
	switch {
	case p.faults[FaultHangMetrics]:
		// Accept and never answer, until the scraper gives up or the pod goes.
		<-r.Context().Done()
	case p.faults[FaultGarbageMetrics]:
		w.Header().Set("Content-Type", textContentType)
		fmt.Fprint(w, "<html><body>502 Bad Gateway</body></html>\nvllm:num_requests_waiting{model_name=\"x\" 3 \x00\n# TYPE broken histogram\n{}}}\n")
	case p.faults[FaultEndlessMetrics]:
		serveEndless(w, r)
	case p.faults[FaultSeriesFlood]:
		serveSeriesFlood(w, s.model, p.faultSeries)
	case p.faults[FaultBucketFlood]:
		serveBucketFlood(w, s.model, p.faultBuckets)
	default:
		s.metrics.ServeHTTP(w, r)
	}
}

// update applies a new version of the pod: batch size and the refuse and
// black-hole faults take effect at once; everything else is read per request.
func (s *podServer) update(pod *corev1.Pod) {
	s.pod.Store(pod)
	p := paramsFor(pod, s.opts)
	s.engine.setMaxRunning(p.maxRunning)
	s.listen()
}

// portMode is what the pod's ports do.
type portMode int

const (
	serving    portMode = iota
	refusing            // closed: connections are refused
	blackHoled          // bound, taking no connection: connecting times out
)

func modeOf(p params) portMode {
	switch {
	case p.faults[FaultRefuse]:
		return refusing
	case p.faults[FaultBlackHole]:
		return blackHoled
	}
	return serving
}

// listen puts the pod's ports in the mode its annotations ask for, unless it
// is draining or killed. A port that cannot be bound yet (its IP was just
// released by a deleted pod that is still draining) is retried.
func (s *podServer) listen() {
	mode := modeOf(s.params())
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining {
		return
	}
	switch mode {
	case refusing:
		s.closeLocked()
	case blackHoled:
		if len(s.holes) > 0 {
			return
		}
		s.closeLocked()
		for _, port := range s.ports {
			h, err := listenBlackHole(s.ip, int(port))
			if err != nil {
				s.retryLocked(err, port)
				return
			}
			s.holes = append(s.holes, h)
		}
	default:
		if len(s.listeners) > 0 {
			return
		}
		s.closeLocked()
		for _, port := range s.ports {
			l, err := net.Listen("tcp", net.JoinHostPort(s.ip, strconv.Itoa(int(port))))
			if err != nil {
				s.retryLocked(err, port)
				return
			}
			s.listeners = append(s.listeners, l)
		}
		for _, l := range s.listeners {
			go func() {
				if err := s.srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
					s.logger.Error(err, "Serving stopped")
				}
			}()
		}
	}
}

// retryLocked gives up the ports bound so far and tries again shortly.
func (s *podServer) retryLocked(err error, port int32) {
	s.logger.Error(err, "Cannot listen yet; retrying", "address", net.JoinHostPort(s.ip, strconv.Itoa(int(port))))
	s.closeLocked()
	time.AfterFunc(200*time.Millisecond, s.listen)
}

func (s *podServer) closeListeners() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closeLocked()
}

// closeLocked closes the ports, listening or black-holed. Connections already
// accepted stay open.
func (s *podServer) closeLocked() {
	for _, l := range s.listeners {
		l.Close()
	}
	for _, h := range s.holes {
		h.Close()
	}
	s.listeners, s.holes = nil, nil
}

// kill stops the server the way a crashed engine process stops: its ports
// close and every connection, in-flight responses included, is cut off at
// once. It never serves again.
func (s *podServer) kill() {
	s.mu.Lock()
	s.draining, s.killed = true, true
	s.closeLocked()
	s.mu.Unlock()
	s.srv.Close()
}

func (s *podServer) isKilled() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.killed
}

// drain stops accepting connections and lets in-flight requests finish, as an
// engine does on SIGTERM, then closes whatever is left after grace.
func (s *podServer) drain(grace time.Duration) {
	s.mu.Lock()
	if s.draining {
		s.mu.Unlock()
		return
	}
	s.draining = true
	s.mu.Unlock()
	s.closeListeners()
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	if err := s.srv.Shutdown(ctx); err != nil {
		s.srv.Close()
	}
}
