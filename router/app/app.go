package app

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/capstan-dev/capstan/metricsadapter/scrape"
	"github.com/capstan-dev/capstan/router/balance"
	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/gateway"
	"github.com/capstan-dev/capstan/router/health"
	"github.com/capstan-dev/capstan/router/load"
	"github.com/capstan-dev/capstan/router/metrics"
	"github.com/capstan-dev/capstan/router/proxy"
	"github.com/capstan-dev/capstan/router/route"
	"github.com/capstan-dev/capstan/router/server"
)

// userAgent identifies the router to the API server.
const userAgent = "capstan-router"

// Run serves until ctx ends, then drains: /readyz fails at once, requests
// keep being served for ShutdownDelay, then the server stops accepting and
// waits up to ShutdownTimeout for in-flight requests. o must be valid.
func Run(ctx context.Context, o *Options) error {
	logger := klog.FromContext(ctx).WithValues("component", "capstan-router")
	ctx = klog.NewContext(ctx, logger)

	cfg, err := restConfig(o.Kubeconfig)
	if err != nil {
		return err
	}
	client, err := kubernetes.NewForConfig(rest.AddUserAgent(cfg, userAgent))
	if err != nil {
		return err
	}
	selector, err := balance.New(o.Balancer, balance.Options{LoadFactor: o.LoadFactor, QueueWeight: o.QueueWeight, KVCacheWeight: o.KVCacheWeight})
	if err != nil {
		return err
	}
	hosts := health.NewRegistry(health.EjectionPolicy{Base: o.EjectionBase, Max: o.EjectionMax})
	routes := route.NewBuilder(hosts, route.Options{
		MaxPerEndpoint: o.MaxRequestsPerEndpoint,
		MaxPerModel:    o.MaxRequestsPerModel,
		BuildRing:      balance.NeedsRing(selector),
	})
	// With the Gateway API on, every Service may be a backend, and the
	// gateway controller follows which Services exist.
	var gw *gateway.Controller
	handlers := discovery.Handlers{routes}
	if o.GatewayEnabled() {
		handlers = append(handlers, discovery.HandlerFunc(func(k types.NamespacedName, s *discovery.Service) { gw.ServiceChanged(k, s) }))
	}
	controller, err := discovery.New(client, handlers, discovery.Options{Namespaces: o.Namespaces, AllServices: o.GatewayEnabled()})
	if err != nil {
		return err
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m := metrics.New(reg, routes.Table)
	popts := proxy.Options{
		Selector:                selector,
		Balancer:                o.Balancer,
		MaxBodyBytes:            o.maxBodyBytes(),
		MaxAttempts:             o.MaxAttempts,
		ConnectTimeout:          o.ConnectTimeout,
		FirstByteTimeout:        o.FirstByteTimeout,
		IdleStreamTimeout:       o.IdleStreamTimeout,
		RetryAfter:              o.RetryAfter,
		MaxIdleConnsPerEndpoint: o.MaxIdleConnsPerEndpoint,
		AccessLog:               o.AccessLog,
		Synced:                  controller.HasSynced,
	}
	switch o.Balancer {
	case balance.PrefixAffinity:
		popts.PrefixBytes = o.PrefixBytes
	case balance.SessionAffinity:
		popts.SessionHeader = o.SessionHeader
	}
	if o.GatewayEnabled() {
		popts.Gateways = func() *route.HTTPTable { return gw.Table() }
	}
	handler := proxy.New(routes, m, logger.WithName("proxy"), popts)
	var listeners *proxy.Listeners
	if o.GatewayEnabled() {
		if err := checkGatewayAPI(client); err != nil {
			return err
		}
		gwClient, err := gatewayclient.NewForConfig(rest.AddUserAgent(cfg, userAgent))
		if err != nil {
			return err
		}
		listeners = proxy.NewListeners(handler, popts.Gateways, logger.WithName("gateway-listeners"), o.ShutdownTimeout)
		gw = gateway.New(client, gwClient, routes, listeners, controller.HasSynced, reg, gateway.Options{
			ControllerName: o.GatewayControllerName,
			Namespaces:     o.Namespaces,
			Addresses:      o.gatewayAddresses(),
			LeaderElection: o.LeaderElection,
			BindRetry:      5 * time.Second,
		})
	}

	var draining atomic.Bool
	ready := func() error {
		switch {
		case draining.Load():
			return errors.New("shutting down")
		case !controller.HasSynced():
			return errors.New("Service and EndpointSlice caches not synced yet")
		case gw != nil && !gw.HasSynced():
			return errors.New("Gateway API routes not programmed yet")
		}
		return nil
	}
	srv := &server.Server{
		Handler:           newMux(handler, reg, ready, o.Profiling),
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       120 * time.Second,
		Logger:            logger.WithName("server"),
	}
	listener, err := net.Listen("tcp", o.BindAddress)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", o.BindAddress, err)
	}

	// Discovery outlives ctx until the server has drained: requests still
	// being served during the drain follow endpoint changes.
	discoveryCtx, stopDiscovery := context.WithCancel(klog.NewContext(context.WithoutCancel(ctx), logger.WithName("discovery")))
	defer stopDiscovery()
	discoveryDone := make(chan error, 1)
	go func() { discoveryDone <- controller.Run(discoveryCtx, o.Workers) }()
	if o.Balancer == balance.LoadAware {
		if err := runLoadFeed(discoveryCtx, o, client, routes, reg); err != nil {
			return err
		}
	}

	gatewayDone := make(chan error, 1)
	if gw != nil {
		go func() { gatewayDone <- gw.Run(klog.NewContext(discoveryCtx, logger.WithName("gateway"))) }()
	}

	go handler.Run(discoveryCtx)
	serveDone := make(chan error, 1)
	go func() { serveDone <- srv.Serve(listener) }()
	logger.Info("Serving", "address", listener.Addr().String(), "balancer", o.Balancer, "namespaces", o.Namespaces)

	select {
	case err := <-serveDone:
		return fmt.Errorf("serving: %w", err)
	case err := <-discoveryDone:
		return fmt.Errorf("discovery stopped: %w", err)
	case err := <-gatewayDone:
		return fmt.Errorf("the Gateway API controller stopped: %w", err)
	case <-ctx.Done():
	}

	draining.Store(true)
	logger.Info("Shutting down: failing /readyz, still serving", "for", o.ShutdownDelay)
	select {
	case <-time.After(o.ShutdownDelay):
	case err := <-serveDone:
		return fmt.Errorf("serving: %w", err)
	}
	logger.Info("Draining in-flight requests", "timeout", o.ShutdownTimeout)
	drainCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), o.ShutdownTimeout)
	defer cancel()
	// Gateway listeners drain alongside the API.
	gatewaysDrained := make(chan struct{})
	go func() {
		defer close(gatewaysDrained)
		if listeners != nil {
			listeners.Shutdown(drainCtx)
		}
	}()
	err = srv.Shutdown(drainCtx)
	if err != nil {
		logger.Info("Requests still in flight after the shutdown timeout; closing their connections", "err", err)
		_ = srv.Close()
	}
	<-gatewaysDrained
	handler.CloseIdleConnections()
	stopDiscovery()
	<-discoveryDone
	if gw != nil {
		<-gatewayDone
	}
	logger.Info("Stopped")
	return nil
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

// newMux serves the health endpoints and metrics beside the API.
func newMux(api http.Handler, reg *prometheus.Registry, ready func() error, profiling bool) http.Handler {
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
	mux.Handle("/", api)
	// The API's requests skip the mux's pattern matching, about half a
	// microsecond of a request's 25: no operational path is under /v1/.
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/v1/") {
			api.ServeHTTP(w, r)
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// runLoadFeed starts, for the load-aware balancer, the metrics adapter's
// scraper on the model pods and a feeder that copies each pod's load into
// the routing table's hosts, all bound to ctx.
func runLoadFeed(ctx context.Context, o *Options, client kubernetes.Interface, routes *route.Builder, reg prometheus.Registerer) error {
	scraper, err := scrape.New(scrape.Options{
		Interval:   o.ScrapeInterval,
		Timeout:    o.ScrapeTimeout,
		Registerer: reg,
		UserAgent:  userAgent,
	})
	if err != nil {
		return fmt.Errorf("load-aware balancing: %w", err)
	}
	targets, err := load.NewTargets(client, scraper, o.Namespaces)
	if err != nil {
		return err
	}
	logger := klog.FromContext(ctx)
	go func() {
		if err := scraper.Run(ctx); err != nil {
			logger.Error(err, "Scraper stopped")
		}
	}()
	go func() {
		if err := targets.Run(ctx); err != nil {
			logger.Error(err, "Scrape targets stopped")
		}
	}()
	feeder := &load.Feeder{Source: load.ScraperSource{Scraper: scraper}, Table: routes.Table, Interval: o.ScrapeInterval / 4}
	go feeder.Run(ctx)
	return nil
}
