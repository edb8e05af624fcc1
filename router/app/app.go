package app

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/flowcontrol"
	"k8s.io/klog/v2"
	inferencev1 "sigs.k8s.io/gateway-api-inference-extension/api/v1"
	inferenceclient "sigs.k8s.io/gateway-api-inference-extension/client-go/clientset/versioned"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/capstan-dev/capstan/router/balance"
	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/gateway"
	"github.com/capstan-dev/capstan/router/health"
	"github.com/capstan-dev/capstan/router/hold"
	"github.com/capstan-dev/capstan/router/inferencepool"
	"github.com/capstan-dev/capstan/router/leader"
	"github.com/capstan-dev/capstan/router/loader"
	"github.com/capstan-dev/capstan/router/lora"
	"github.com/capstan-dev/capstan/router/metrics"
	"github.com/capstan-dev/capstan/router/picker"
	"github.com/capstan-dev/capstan/router/proxy"
	"github.com/capstan-dev/capstan/router/replicas"
	"github.com/capstan-dev/capstan/router/route"
	"github.com/capstan-dev/capstan/router/server"
)

// userAgent identifies the router to the API server and to the model
// servers it scrapes.
const userAgent = "capstan-router"

// Router is capstan-router: New builds it from valid options, Run serves.
type Router struct {
	opts      *Options
	logger    klog.Logger
	discovery *discovery.Controller
	// gateway and listeners are nil without the Gateway API.
	gateway   *gateway.Controller
	listeners *server.Listeners
	// engineLoad is nil unless the balancer is load-aware.
	engineLoad *engineLoadFeed
	// loras and loader are nil when adapters are off.
	loras  *lora.Poller
	loader *loader.Loader
	// leader is nil when the router needs no leader (Options.elects).
	leader  *leader.Elector
	handler *proxy.Handler
	// server serves the API and nothing else; admin serves health,
	// metrics and profiles on an address of their own.
	server   *server.Server
	admin    *http.Server
	draining atomic.Bool
	events   *serviceEvents
	// pods are the informers of the model-server pods and their workloads.
	pods *replicas.Pods
	// pools follows InferencePools; nil without the Gateway API or when
	// the cluster does not serve the InferencePool API.
	pools *inferencepool.Controller
	// pickers asks InferencePools' endpoint pickers; nil without the
	// Gateway API.
	pickers *picker.Client
}

// New builds a router from o, which must be valid: its clients, informers,
// routing table, proxy and servers. It starts nothing.
func New(ctx context.Context, o *Options) (*Router, error) {
	logger := klog.FromContext(ctx).WithValues("component", "capstan-router")
	cfg, err := restConfig(o.Kubeconfig)
	if err != nil {
		return nil, err
	}
	client, err := kubernetes.NewForConfig(rest.AddUserAgent(cfg, userAgent))
	if err != nil {
		return nil, err
	}
	balancers, err := newBalancers(o)
	if err != nil {
		return nil, err
	}
	events := newServiceEvents(client)
	hosts := health.NewRegistry(health.EjectionPolicy{Base: o.EjectionBase, Max: o.EjectionMax})
	var holds *hold.Queues
	var modelChanged func(string)
	if o.HoldTimeout > 0 {
		holds = hold.New(o.MaxHeldRequestsPerModel)
		modelChanged = holds.Kick
	}
	// The model-server pods: what a model with no Ready endpoint is doing,
	// and the load-aware balancer's scrape targets.
	r := &Router{opts: o, logger: logger, events: events, pods: replicas.New(client, o.Namespaces)}
	routes := route.NewBuilder(hosts, route.Options{
		MaxPerEndpoint: o.MaxRequestsPerEndpoint,
		MaxPerModel:    o.MaxRequestsPerModel,
		BuildRing:      balance.NeedsRing(o.Balancer),
		Recorder:       events,
		ModelChanged:   modelChanged,
	})
	// Every Service snapshot goes to the routing table and, with the
	// Gateway API on, to the gateway controller, which is added below
	// (it waits for discovery to sync, so it is built after it).
	handlers := &discovery.Handlers{routes}
	r.discovery, err = discovery.New(client, handlers, discovery.Options{Namespaces: o.Namespaces, AllServices: o.GatewayEnabled()})
	if err != nil {
		return nil, err
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if o.elects() {
		if r.leader, err = leader.New(client, o.LeaderElection, reg); err != nil {
			return nil, err
		}
	}
	var held func(string) int
	if holds != nil {
		held = holds.Len
	}
	m := metrics.New(reg, routes.Table, held)
	popts := proxy.Options{
		Balancing:            *balancers[o.Balancer],
		MaxBodyBytes:         o.maxBodyBytes(),
		MaxInFlightBodyBytes: o.maxInFlightBodyBytes(),
		TrustedHops:          o.XFFTrustedHops,
		MaxAttempts:          o.MaxAttempts,
		TryDuration:          o.TryDuration,
		RetryInterval:        o.RetryInterval,
		OutlierErrors:        o.OutlierConsecutiveErrors,
		OutlierStatuses:      o.OutlierStatuses,
		MaxEjectionPercent:   o.MaxEjectionPercent,
		ConnectTimeout:       o.ConnectTimeout,
		FirstByteTimeout:     o.FirstByteTimeout,
		IdleStreamTimeout:    o.IdleStreamTimeout,
		RetryAfter:           o.RetryAfter,
		Holds:                holds,
		HoldTimeout:          o.HoldTimeout,
		Replicas: func(model string, namespaces []string) (string, bool) {
			return r.pods.Describe(model, namespaces, time.Now())
		},
		MaxIdleConnsPerEndpoint: o.MaxIdleConnsPerEndpoint,
		AccessLog:               o.AccessLog,
		Synced:                  r.discovery.HasSynced,
	}
	if o.GatewayEnabled() {
		// InferencePools may choose any policy (capstan.dev/balancer).
		popts.Balancers = balancers
		popts.Gateways = func() *route.HTTPTable { return r.gateway.Table() }
		// Pickers are dialled at their Service's Ready endpoints, from the
		// Service snapshots Gateway mode keeps of every watched namespace.
		r.pickers = picker.New(picker.Options{Timeout: o.EndpointPickerTimeout, Services: routes.Service,
			MaxBodyBytes: o.maxBodyBytes(), TLS: o.EndpointPickerTLS})
		popts.Picker = r.pickers
	}
	r.handler = proxy.New(routes, m, logger.WithName("proxy"), popts)
	hosts.OnForget(r.handler.ForgetEndpoint)
	if o.GatewayEnabled() {
		if err := r.newGateway(cfg, client, routes, reg, handlers); err != nil {
			return nil, err
		}
	}
	if o.Balancer == balance.LoadAware || o.Balancer == balance.PrefixCache {
		if r.engineLoad, err = newEngineLoadFeed(logger, r.pods.PodInformers(), o, routes, reg); err != nil {
			return nil, fmt.Errorf("%s balancing: %w", o.Balancer, err)
		}
	}
	if o.LoRAPollInterval > 0 {
		listErrors := prometheus.NewCounter(prometheus.CounterOpts{Namespace: "capstan_router", Subsystem: "lora", Name: "model_list_errors_total",
			Help: "Ready model endpoints' model lists (GET /v1/models) that could not be had or read: the endpoint keeps its last list for 3 passes."})
		reg.MustRegister(listErrors)
		r.loras = lora.New(lora.Options{Interval: o.LoRAPollInterval, Timeout: o.LoRAPollInterval / 2,
			Endpoints: func() []string { return routes.Table().Addresses() }, Reporter: routes, UserAgent: userAgent, Errors: listErrors})
		r.loader = loader.New(loader.Options{Interval: o.LoRAPollInterval, Timeout: o.LoRALoadTimeout, Table: routes.Table,
			Engines: engines{r.loras, lora.NewClient(o.LoRALoadTimeout, 3*o.LoRAPollInterval, nil, userAgent)},
			Leading: r.leader.Leading, Recorder: events, Backoff: flowcontrol.NewBackOff(loraBackoffBase, loraBackoffMax)}, reg)
	}
	r.server = o.newServer()
	r.server.Handler, r.server.Logger = r.handler, logger.WithName("server")
	r.admin = &http.Server{
		Handler:           newAdminMux(reg, r.ready, o.Profiling),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       120 * time.Second,
		ErrorLog:          klog.NewStandardLogger("WARNING"),
	}
	return r, nil
}

// A declared adapter's load that failed on an endpoint is tried again
// after loraBackoffBase, doubling up to loraBackoffMax.
const (
	loraBackoffBase = 2 * time.Second
	loraBackoffMax  = 5 * time.Minute
)

// engines are what the adapter loader calls: the poller's reports of what
// each engine lists, and the engines' load and unload API.
type engines struct {
	*lora.Poller
	*lora.Client
}

// newGateway builds the Gateway API controller and the listeners it opens,
// and has discovery hand it every Service snapshot.
func (r *Router) newGateway(cfg *rest.Config, client kubernetes.Interface, routes *route.Builder, reg prometheus.Registerer, handlers *discovery.Handlers) error {
	o := r.opts
	if err := checkGatewayAPI(client); err != nil {
		return err
	}
	gwClient, err := gatewayclient.NewForConfig(rest.AddUserAgent(cfg, userAgent))
	if err != nil {
		return err
	}
	r.listeners = server.NewListeners(server.ListenersConfig{
		Handler: r.handler.GatewayHandler,
		Certificate: func(addr string, hello *tls.ClientHelloInfo) *tls.Certificate {
			if p := r.gateway.Table().Port(addr); p != nil {
				return p.Certificate(hello)
			}
			return nil
		},
		Drain:     o.ShutdownTimeout,
		NewServer: o.newServer,
		Logger:    r.logger.WithName("gateway-listeners"),
	})
	gopts := gateway.Options{
		ControllerName:   o.GatewayControllerName,
		Namespaces:       o.Namespaces,
		SecretNamespaces: o.GatewaySecretNamespaces,
		Addresses:        o.gatewayAddresses(),
		Leader:           r.leader,
		BindRetry:        5 * time.Second,
	}
	served, err := inferencePoolsServed(client)
	if err != nil {
		return err
	}
	synced := r.discovery.HasSynced
	if served {
		infClient, err := inferenceclient.NewForConfig(rest.AddUserAgent(cfg, userAgent))
		if err != nil {
			return err
		}
		r.pools = inferencepool.New(client, infClient, routes, o.Namespaces)
		reg.MustRegister(r.pools)
		gopts.InferencePools = &gateway.InferencePools{Informers: r.pools.Informers(), Client: infClient}
		// The first table is built once pools have their endpoints too.
		synced = func() bool { return r.discovery.HasSynced() && r.pools.HasSynced() }
	} else {
		r.logger.Info("The InferencePool API is not served: HTTPRoutes cannot send traffic to InferencePools", "groupVersion", inferencev1.GroupVersion)
	}
	r.gateway = gateway.New(client, gwClient, routes, r.listeners, synced, reg, gopts)
	*handlers = append(*handlers, r.gateway)
	return nil
}

// ready is /readyz: false while draining and until the caches have synced
// and, with the Gateway API, the routes are programmed.
func (r *Router) ready() error {
	switch {
	case r.draining.Load():
		return errors.New("shutting down")
	case !r.discovery.HasSynced():
		return errors.New("the Service and EndpointSlice caches have not synced yet")
	case r.gateway != nil && !r.gateway.HasSynced():
		return errors.New("the Gateway API routes are not programmed yet")
	}
	return nil
}

// Run listens, starts the informers and everything that follows them, and
// serves: the health endpoints at once, the API and the Gateway routes once
// their caches have synced (503 until then). It returns the first error of
// any part, having stopped and waited for all of them. When ctx ends it
// drains: /readyz fails at once, requests keep being served for
// ShutdownDelay, then the servers stop accepting and wait up to
// ShutdownTimeout for in-flight requests, and it returns nil.
func (r *Router) Run(ctx context.Context) error {
	o, logger := r.opts, r.logger
	listener, err := net.Listen("tcp", o.BindAddress)
	if err != nil {
		return fmt.Errorf("listening on --bind-address %s: %w", o.BindAddress, err)
	}
	adminListener, err := net.Listen("tcp", o.AdminBindAddress)
	if err != nil {
		listener.Close()
		return fmt.Errorf("listening on --admin-bind-address %s: %w", o.AdminBindAddress, err)
	}
	// Everything but the servers outlives ctx until they have drained:
	// requests still being served during the drain follow endpoint
	// changes.
	background, stopBackground := context.WithCancel(klog.NewContext(context.WithoutCancel(ctx), logger))
	defer stopBackground()
	r.events.start()
	defer r.events.stop()
	g, gctx := errgroup.WithContext(background)
	g.Go(func() error {
		if err := r.discovery.Run(klog.NewContext(gctx, logger.WithName("discovery")), o.Workers); err != nil {
			return fmt.Errorf("discovery stopped: %w", err)
		}
		return nil
	})
	if r.gateway != nil {
		g.Go(func() error {
			if err := r.gateway.Run(klog.NewContext(gctx, logger.WithName("gateway"))); err != nil {
				return fmt.Errorf("the Gateway API controller stopped: %w", err)
			}
			return nil
		})
	}
	if r.pools != nil {
		g.Go(func() error {
			if err := r.pools.Run(klog.NewContext(gctx, logger.WithName("inferencepool")), o.Workers); err != nil {
				return fmt.Errorf("the InferencePool controller stopped: %w", err)
			}
			return nil
		})
	}
	for _, pods := range r.pods.Informers() {
		g.Go(func() error { pods.RunWithContext(gctx); return nil })
	}
	if r.engineLoad != nil {
		g.Go(func() error { return r.engineLoad.Run(klog.NewContext(gctx, logger.WithName("engine-load"))) })
	}
	if r.leader != nil {
		g.Go(func() error { r.leader.Run(klog.NewContext(gctx, logger.WithName("leader"))); return nil })
	}
	if r.loras != nil {
		g.Go(func() error { r.loras.Run(klog.NewContext(gctx, logger.WithName("lora"))); return nil })
		g.Go(func() error { r.loader.Run(klog.NewContext(gctx, logger.WithName("lora-loader"))); return nil })
	}
	g.Go(func() error { r.handler.Run(gctx); return nil })
	g.Go(func() error {
		if err := r.server.Serve(listener); !errors.Is(err, server.ErrServerClosed) {
			return fmt.Errorf("serving: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		if err := r.admin.Serve(adminListener); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("serving the admin endpoints: %w", err)
		}
		return nil
	})
	logger.Info("Serving", "address", listener.Addr().String(), "admin", adminListener.Addr().String(),
		"balancer", o.Balancer, "namespaces", o.Namespaces)

	select {
	case <-gctx.Done(): // a part failed
		return r.abort(g)
	case <-ctx.Done():
	}
	r.draining.Store(true)
	// Kept-alive clients move to another replica: every response from now
	// on closes its connection.
	r.server.SetKeepAlivesEnabled(false)
	if r.listeners != nil {
		r.listeners.SetKeepAlivesEnabled(false)
	}
	logger.Info("Shutting down: failing /readyz, still serving, closing connections after each response", "for", o.ShutdownDelay)
	select {
	case <-time.After(o.ShutdownDelay):
	case <-gctx.Done():
		return r.abort(g)
	}
	logger.Info("Draining in-flight requests", "timeout", o.ShutdownTimeout)
	drainCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), o.ShutdownTimeout)
	defer cancel()
	r.stopServing(drainCtx)
	// The admin endpoints answer (/readyz failing) until the API has
	// drained.
	_ = r.admin.Close()
	stopBackground()
	if err := g.Wait(); err != nil {
		return err
	}
	logger.Info("Stopped")
	return nil
}

// abort stops serving after a part failed, giving in-flight requests up to
// the shutdown timeout, and returns the first error.
func (r *Router) abort(g *errgroup.Group) error {
	ctx, cancel := context.WithTimeout(context.Background(), r.opts.ShutdownTimeout)
	defer cancel()
	r.stopServing(ctx)
	_ = r.admin.Close()
	return g.Wait()
}

// stopServing shuts the API server and the Gateway listeners down together,
// waiting for in-flight requests until ctx ends and closing their
// connections then, and closes the idle upstream connections.
func (r *Router) stopServing(ctx context.Context) {
	var wg sync.WaitGroup
	if r.listeners != nil {
		wg.Go(func() { r.listeners.Shutdown(ctx) })
	}
	if err := r.server.Shutdown(ctx); err != nil {
		r.logger.Info("Requests still in flight after the shutdown timeout; closing their connections", "err", err)
		_ = r.server.Close()
	}
	wg.Wait()
	r.handler.CloseIdleConnections()
	if r.pickers != nil {
		r.pickers.Close()
	}
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig == "" {
		cfg, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("no --kubeconfig and no in-cluster configuration: %w", err)
		}
		return cfg, nil
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("loading --kubeconfig %s: %w", kubeconfig, err)
	}
	return cfg, nil
}

// gatewayResources are the Gateway API resources the router needs served.
var gatewayResources = []string{"gatewayclasses", "gateways", "httproutes", "referencegrants"}

// checkGatewayAPI fails clearly when the Gateway API CRDs are missing,
// instead of waiting for caches that can never fill.
func checkGatewayAPI(client kubernetes.Interface) error {
	gv := gatewayv1.GroupVersion.String()
	list, err := client.Discovery().ServerResourcesForGroupVersion(gv)
	if err != nil {
		return fmt.Errorf("the Gateway API (%s) is not served: install its standard-channel CRDs, or run without --gateway-address-pool, --gateway-address and --gateway-publish-service: %w", gv, err)
	}
	served := map[string]bool{}
	for _, r := range list.APIResources {
		served[r.Name] = true
	}
	for _, name := range gatewayResources {
		if !served[name] {
			return fmt.Errorf("the Gateway API CRDs are incomplete: %s/%s is not served", gv, name)
		}
	}
	return nil
}

// inferencePoolsServed reports whether the cluster serves the Gateway API
// Inference Extension's InferencePools. It is asked once, at start: a
// router started before the CRD was installed serves pools after a restart.
func inferencePoolsServed(client kubernetes.Interface) (bool, error) {
	gv := inferencev1.GroupVersion.String()
	list, err := client.Discovery().ServerResourcesForGroupVersion(gv)
	switch {
	case apierrors.IsNotFound(err):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("asking whether %s is served: %w", gv, err)
	}
	return slices.ContainsFunc(list.APIResources, func(r metav1.APIResource) bool { return r.Name == "inferencepools" }), nil
}

// newAdminMux serves the health endpoints, metrics and, when asked,
// profiles: everything but the API, on the admin address.
func newAdminMux(reg *prometheus.Registry, ready func() error, profiling bool) http.Handler {
	mux := http.NewServeMux()
	alive := func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) }
	mux.HandleFunc("GET /healthz", alive)
	mux.HandleFunc("GET /livez", alive)
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if err := ready(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok"))
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	if profiling {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return mux
}

// balancers builds every balancing policy with the options' parameters,
// one Selector each, shared by every pool that uses the policy.
func newBalancers(o *Options) (map[balance.Policy]*proxy.Balancing, error) {
	out := make(map[balance.Policy]*proxy.Balancing, len(balance.Policies))
	for _, p := range balance.Policies {
		sel, err := balance.New(p, balance.Options{LoadFactor: o.LoadFactor, QueueWeight: o.QueueWeight, KVCacheWeight: o.KVCacheWeight,
			CacheWeight: o.PrefixCacheWeight, BlocksPerEndpoint: o.PrefixCacheBlocksPerEndpoint})
		if err != nil {
			return nil, fmt.Errorf("balancer %s: %w", p, err)
		}
		b := &proxy.Balancing{Policy: p, Selector: sel}
		switch p {
		case balance.PrefixAffinity:
			b.PrefixBytes = o.PrefixBytes
		case balance.PrefixCache:
			b.PrefixBytes, b.PromptBlocks = balance.MaxPromptBlocks*balance.PromptBlockBytes, true
		case balance.SessionAffinity:
			b.SessionHeader = o.SessionHeader
		}
		out[p] = b
	}
	return out, nil
}
