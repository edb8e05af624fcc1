// Package app assembles capstan-router from its parts: options and flags,
// discovery, the routing table, the proxy, metrics, health endpoints and a
// graceful shutdown. cmd/capstan-router only parses flags and handles
// signals.
package app

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"golang.org/x/net/http/httpguts"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	componentbaseconfig "k8s.io/component-base/config"
	componentbaseoptions "k8s.io/component-base/config/options"

	"github.com/capstan-dev/capstan/router/balance"
	"github.com/capstan-dev/capstan/router/gateway"
	"github.com/capstan-dev/capstan/router/server"
)

// Options are capstan-router's settings, one per flag.
type Options struct {
	// Kubeconfig is the path of a kubeconfig; "" means in-cluster config.
	Kubeconfig string
	// Namespaces limits discovery to these namespaces; empty means all.
	Namespaces []string
	// BindAddress is where the API is served, and nothing else. Default
	// ":8080".
	BindAddress string
	// ReadHeaderTimeout bounds reading a request's head and body; the
	// first request's from the moment its connection is accepted. Default
	// 30s.
	ReadHeaderTimeout time.Duration
	// IdleTimeout bounds the wait for a kept-alive connection's next
	// request. Default 120s.
	IdleTimeout time.Duration
	// WriteTimeout bounds each write to a client: one that stops reading
	// for this long loses its request and connection. Default 30s.
	WriteTimeout time.Duration
	// MaxHeaderBytes and MaxHeaderFields bound a request's head; above
	// either the answer is 431. Defaults 64Ki and 100.
	MaxHeaderBytes, MaxHeaderFields int
	// AdminBindAddress is where /healthz, /livez, /readyz, /metrics and,
	// with Profiling, /debug/pprof/ are served. Default ":8081".
	AdminBindAddress string
	// Balancer is the balancing policy. Default prefix-cache.
	Balancer balance.Policy
	// MaxBodySize bounds request bodies (a quantity: 10Mi). Default 10Mi.
	MaxBodySize string
	// MaxInFlightBodySize bounds the request body bytes held at once (a
	// quantity; "0" for no bound). Default 128Mi, a quarter of the
	// manifests' memory limit.
	MaxInFlightBodySize string
	// XFFTrustedHops is how many proxies in front of the router append to
	// X-Forwarded-For truthfully. Default 0: the client's entries are
	// dropped.
	XFFTrustedHops int
	// MaxAttempts bounds the endpoints one request tries, each only after
	// the last reached no server. Default 3.
	MaxAttempts int
	// TryDuration bounds the time from a request's arrival within which
	// another attempt may start. Default 15s.
	TryDuration time.Duration
	// RetryInterval is the pause before another attempt, jittered by half
	// either way. Default 20ms.
	RetryInterval time.Duration
	// OutlierConsecutiveErrors is how many exchanges in a row that reached
	// an endpoint and failed (an answer with one of OutlierStatuses, a
	// first-byte timeout, a reset) eject it; 0 disables it. Default 5.
	OutlierConsecutiveErrors int
	// OutlierStatuses are the answers outlier detection counts as failed.
	// Default 500, 502, 503, 504.
	OutlierStatuses []int
	// MaxEjectionPercent bounds the share of a model's endpoints ejected at
	// once (at least one may be). Default 50.
	MaxEjectionPercent int
	// ConnectTimeout bounds connecting to an endpoint. Default 5s.
	ConnectTimeout time.Duration
	// FirstByteTimeout bounds waiting for response headers. Default 5m.
	FirstByteTimeout time.Duration
	// IdleStreamTimeout bounds a pause in a response body. Default 5m.
	IdleStreamTimeout time.Duration
	// EjectionBase and EjectionMax shape the passive-health backoff.
	// Defaults 1s and 30s; EjectionBase 0 disables ejection.
	EjectionBase, EjectionMax time.Duration
	// MaxRequestsPerEndpoint and MaxRequestsPerModel are optional
	// concurrency limits (429 above them); 0 means none.
	MaxRequestsPerEndpoint, MaxRequestsPerModel int64
	// RetryAfter is the Retry-After of a 503 or 429. Default 2s.
	RetryAfter time.Duration
	// HoldTimeout is how long a request for a model with no Ready endpoint
	// waits for one; 0 answers 503 at once. Default 5m, for a model
	// scaled to zero to get a replica and load.
	HoldTimeout time.Duration
	// MaxHeldRequestsPerModel bounds the requests held for one model;
	// above it 429. Default 100.
	MaxHeldRequestsPerModel int
	// PrefixBytes is how much of the prompt prefix affinity hashes.
	// Default 512.
	PrefixBytes int
	// LoadFactor bounds prefix affinity. Default 1.25.
	LoadFactor float64
	// SessionHeader carries the session id. Default X-Session-Id.
	SessionHeader string
	// QueueWeight and KVCacheWeight weigh the load-aware score. Defaults
	// 1 and 8.
	QueueWeight, KVCacheWeight float64
	// PrefixCacheWeight and PrefixCacheBlocksPerEndpoint configure the
	// prefix-cache balancer. Defaults 4 and 8192.
	PrefixCacheWeight            float64
	PrefixCacheBlocksPerEndpoint int
	// ScrapeInterval and ScrapeTimeout drive the load-aware balancer's
	// metrics scraping. Defaults 1s and 500ms.
	ScrapeInterval, ScrapeTimeout time.Duration
	// LoRAPollInterval is how often every Ready model endpoint is asked
	// which LoRA adapters it has loaded (GET /v1/models), so that
	// requests naming an adapter go to the endpoints that have it, and
	// how often the leader loads the adapters models' Services declare;
	// 0 turns adapters off. Default 5s.
	LoRAPollInterval time.Duration
	// LoRALoadTimeout bounds one engine's answer to loading or unloading
	// an adapter. Default 1m.
	LoRALoadTimeout time.Duration
	// MaxIdleConnsPerEndpoint is the keep-alive pool per endpoint.
	// Default 256.
	MaxIdleConnsPerEndpoint int
	// ShutdownDelay is how long a terminating router keeps serving while
	// failing /readyz, so that it leaves Service endpoints before it stops
	// accepting connections. Default 5s.
	ShutdownDelay time.Duration
	// ShutdownTimeout bounds waiting for in-flight requests after that.
	// Default 60s.
	ShutdownTimeout time.Duration
	// AccessLog logs every request. Default true.
	AccessLog bool
	// Workers is the number of discovery workers. Default 2.
	Workers int
	// Profiling serves net/http/pprof under /debug/pprof/. Default false.
	Profiling bool

	// EndpointPickerTimeout bounds each wait on an InferencePool's endpoint
	// picker: its answer to a request, and to the response headers.
	// Default 2s.
	EndpointPickerTimeout time.Duration
	// EndpointPickerTLS speaks TLS to endpoint pickers without verifying
	// their certificate, as Envoy-based gateways do (the reference pickers
	// serve a self-signed one); false speaks plaintext HTTP/2. Default
	// true.
	EndpointPickerTLS bool

	// GatewayAddressPool, when set, turns on Gateway API support with an
	// address of its own for every Gateway from this pool (a CIDR), which
	// must be local to the router's network namespace. Default "".
	GatewayAddressPool string
	// GatewayAddress, when set, turns on Gateway API support with every
	// Gateway sharing this address (an IP or a hostname: the router's
	// Service), listeners told apart by port and hostname. Default "".
	GatewayAddress string
	// GatewayPublishService, when set ("namespace/name"), turns on Gateway
	// API support with every Gateway sharing that Service's address (its
	// load balancer's), as GatewayAddress does with a fixed one. Default "".
	GatewayPublishService string
	// GatewayBindAddress is the host the router listens on for Gateways
	// with GatewayAddress or GatewayPublishService; "" means every
	// interface. Default "".
	GatewayBindAddress string
	// GatewaySecretNamespaces, when set, are the only namespaces whose TLS
	// Secrets the router reads for Gateway listeners; empty means the same
	// namespaces as Gateways (--namespaces). Default empty.
	GatewaySecretNamespaces []string
	// GatewayControllerName selects the GatewayClasses to serve. Default
	// capstan.dev/gateway-controller.
	GatewayControllerName string
	// LeaderElection elects the replica that writes Gateway API status
	// and loads declared LoRA adapters. Default on, a Lease capstan-router
	// in capstan-system, 15s/10s/2s.
	LeaderElection componentbaseconfig.LeaderElectionConfiguration
}

// NewOptions returns the default options.
func NewOptions() *Options {
	return &Options{
		BindAddress:                  ":8080",
		AdminBindAddress:             ":8081",
		ReadHeaderTimeout:            server.DefaultReadHeaderTimeout,
		IdleTimeout:                  server.DefaultIdleTimeout,
		WriteTimeout:                 server.DefaultWriteTimeout,
		MaxHeaderBytes:               server.DefaultMaxHeaderBytes,
		MaxHeaderFields:              server.DefaultMaxHeaderFields,
		Balancer:                     balance.DefaultPolicy,
		MaxBodySize:                  "10Mi",
		MaxInFlightBodySize:          "128Mi",
		MaxAttempts:                  3,
		TryDuration:                  15 * time.Second,
		RetryInterval:                20 * time.Millisecond,
		OutlierConsecutiveErrors:     5,
		OutlierStatuses:              []int{500, 502, 503, 504},
		MaxEjectionPercent:           50,
		ConnectTimeout:               5 * time.Second,
		FirstByteTimeout:             5 * time.Minute,
		IdleStreamTimeout:            5 * time.Minute,
		EjectionBase:                 time.Second,
		EjectionMax:                  30 * time.Second,
		RetryAfter:                   2 * time.Second,
		HoldTimeout:                  5 * time.Minute,
		MaxHeldRequestsPerModel:      100,
		PrefixBytes:                  512,
		LoadFactor:                   balance.DefaultLoadFactor,
		SessionHeader:                "X-Session-Id",
		QueueWeight:                  balance.DefaultQueueWeight,
		KVCacheWeight:                balance.DefaultKVCacheWeight,
		PrefixCacheWeight:            balance.DefaultCacheWeight,
		PrefixCacheBlocksPerEndpoint: balance.DefaultBlocksPerEndpoint,
		ScrapeInterval:               time.Second,
		ScrapeTimeout:                500 * time.Millisecond,
		LoRAPollInterval:             5 * time.Second,
		LoRALoadTimeout:              time.Minute,
		MaxIdleConnsPerEndpoint:      256,
		ShutdownDelay:                5 * time.Second,
		ShutdownTimeout:              60 * time.Second,
		AccessLog:                    true,
		Workers:                      2,
		GatewayControllerName:        gateway.DefaultControllerName,
		EndpointPickerTimeout:        2 * time.Second,
		EndpointPickerTLS:            true,
		LeaderElection: componentbaseconfig.LeaderElectionConfiguration{
			LeaderElect:       true,
			LeaseDuration:     metav1.Duration{Duration: 15 * time.Second},
			RenewDeadline:     metav1.Duration{Duration: 10 * time.Second},
			RetryPeriod:       metav1.Duration{Duration: 2 * time.Second},
			ResourceLock:      resourcelock.LeasesResourceLock,
			ResourceName:      "capstan-router",
			ResourceNamespace: "capstan-system",
		},
	}
}

// GatewayEnabled reports whether the router serves the Gateway API.
func (o *Options) GatewayEnabled() bool {
	return o.GatewayAddressPool != "" || o.GatewayAddress != "" || o.GatewayPublishService != ""
}

// gatewayAddresses is the address mode the Gateway flags ask for; Validate
// has checked them.
func (o *Options) gatewayAddresses() gateway.Addresses {
	if o.GatewayAddressPool != "" {
		return gateway.Addresses{Pool: netip.MustParsePrefix(o.GatewayAddressPool)}
	}
	a := gateway.Addresses{Shared: o.GatewayAddress, BindHost: o.GatewayBindAddress}
	if ns, name, ok := strings.Cut(o.GatewayPublishService, "/"); ok {
		a.PublishService = types.NamespacedName{Namespace: ns, Name: name}
	}
	return a
}

// AddFlags adds a flag for every option to fs, with the defaults in o.
func (o *Options) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.Kubeconfig, "kubeconfig", o.Kubeconfig, "Path to a kubeconfig. Empty means the in-cluster configuration.")
	fs.StringSliceVar(&o.Namespaces, "namespaces", o.Namespaces, "Namespaces whose Services and EndpointSlices define models, comma-separated. Empty means all namespaces.")
	fs.StringVar(&o.BindAddress, "bind-address", o.BindAddress, "Address of the OpenAI API, and of nothing else.")
	fs.DurationVar(&o.ReadHeaderTimeout, "read-header-timeout", o.ReadHeaderTimeout, "Time allowed to read a request's head and body; for a connection's first request it runs from the moment the connection is accepted.")
	fs.DurationVar(&o.IdleTimeout, "idle-timeout", o.IdleTimeout, "How long a kept-alive client connection may wait for its next request.")
	fs.DurationVar(&o.WriteTimeout, "write-timeout", o.WriteTimeout, "Longest a single write to a client may wait (a client that stops reading); its request is cancelled and its connection closed. A stream that keeps flowing is never cut.")
	fs.IntVar(&o.MaxHeaderBytes, "max-header-bytes", o.MaxHeaderBytes, "Largest request head in bytes; above it 431.")
	fs.IntVar(&o.MaxHeaderFields, "max-header-fields", o.MaxHeaderFields, "Most header fields in a request; above it 431.")
	fs.StringVar(&o.AdminBindAddress, "admin-bind-address", o.AdminBindAddress, "Address of /healthz, /livez, /readyz, /metrics and, with --profiling, /debug/pprof/; keep it off the internet.")
	fs.StringVar((*string)(&o.Balancer), "balancer", string(o.Balancer), fmt.Sprintf("Balancing policy, one of %v.", balance.Policies))
	fs.StringVar(&o.MaxBodySize, "max-body-size", o.MaxBodySize, "Largest request body accepted (a quantity such as 10Mi); larger ones get 413.")
	fs.StringVar(&o.MaxInFlightBodySize, "max-in-flight-body-size", o.MaxInFlightBodySize, "Request body bytes the router holds at once, over every request (a quantity; 0 for no bound). A body that would pass it gets 429 before it is read.")
	fs.IntVar(&o.XFFTrustedHops, "xff-trusted-hops", o.XFFTrustedHops, "Proxies in front of the router whose X-Forwarded-For entries are kept (the rightmost ones); the client's own entries before them are dropped. The connection's address is always appended.")
	fs.IntVar(&o.MaxAttempts, "max-attempts", o.MaxAttempts, fmt.Sprintf("Endpoints one request may try (1-%d); another is tried only when the last reached no model server (it could not connect, or the connection failed before a byte of the request was sent). A request that may have reached a model server is answered 502 or 504, never sent again.", balance.MaxAttempts))
	fs.DurationVar(&o.TryDuration, "try-duration", o.TryDuration, "No attempt starts later than this after the request arrived.")
	fs.DurationVar(&o.RetryInterval, "retry-interval", o.RetryInterval, "Pause before another attempt, jittered by half either way.")
	fs.IntVar(&o.OutlierConsecutiveErrors, "outlier-consecutive-errors", o.OutlierConsecutiveErrors, "Exchanges in a row that reached an endpoint and failed (an answer with a status in --outlier-statuses, a first-byte timeout, a reset) that eject it for --ejection-base, doubled per ejection in a row; 0 disables it. An endpoint that cannot be connected to is ejected at once.")
	fs.IntSliceVar(&o.OutlierStatuses, "outlier-statuses", o.OutlierStatuses, "Response statuses that --outlier-consecutive-errors counts.")
	fs.IntVar(&o.MaxEjectionPercent, "max-ejection-percent", o.MaxEjectionPercent, "Most of a model's endpoints ejected at once, in percent (at least one may be); when every endpoint is ejected, all are used.")
	fs.DurationVar(&o.ConnectTimeout, "connect-timeout", o.ConnectTimeout, "Time allowed to connect to an endpoint.")
	fs.DurationVar(&o.FirstByteTimeout, "first-byte-timeout", o.FirstByteTimeout, "Time allowed between sending a request and receiving the response headers; for a non-streamed completion this includes the whole generation.")
	fs.DurationVar(&o.IdleStreamTimeout, "idle-stream-timeout", o.IdleStreamTimeout, "Longest pause allowed in a response body (between two chunks of a stream).")
	fs.DurationVar(&o.EjectionBase, "ejection-base", o.EjectionBase, "How long an endpoint gets no new requests after a failed attempt; doubled per consecutive failure. 0 disables ejection.")
	fs.DurationVar(&o.EjectionMax, "ejection-max", o.EjectionMax, "Longest ejection.")
	fs.Int64Var(&o.MaxRequestsPerEndpoint, "max-requests-per-endpoint", o.MaxRequestsPerEndpoint, "Requests this router may have in flight to one endpoint; 0 means no limit. When every endpoint is full, requests get 429.")
	fs.Int64Var(&o.MaxRequestsPerModel, "max-requests-per-model", o.MaxRequestsPerModel, "Requests this router may have in flight to one model; 0 means no limit. Above it, requests get 429.")
	fs.DurationVar(&o.RetryAfter, "retry-after", o.RetryAfter, "Retry-After sent with 503 (no ready endpoint) and 429.")
	fs.DurationVar(&o.HoldTimeout, "hold-timeout", o.HoldTimeout, "How long a request for a model with no ready endpoint (scaled to zero, or its replicas still starting) waits for one, in arrival order, before a 503 that says what the replicas are doing; 0 answers 503 at once.")
	fs.IntVar(&o.MaxHeldRequestsPerModel, "max-held-requests-per-model", o.MaxHeldRequestsPerModel, "Requests held at once for one model; above it 429.")
	fs.IntVar(&o.PrefixBytes, "prefix-bytes", o.PrefixBytes, "Bytes of the prompt (prompt, messages or input as sent) that prefix-affinity hashes.")
	fs.Float64Var(&o.LoadFactor, "prefix-load-factor", o.LoadFactor, "Prefix affinity sends a request elsewhere when its endpoint has this many times the average in-flight requests (above 1).")
	fs.StringVar(&o.SessionHeader, "session-header", o.SessionHeader, "Header whose value keeps a session on one endpoint with session-affinity.")
	fs.Float64Var(&o.QueueWeight, "load-queue-weight", o.QueueWeight, "Weight of an engine's waiting requests in the load-aware score.")
	fs.Float64Var(&o.KVCacheWeight, "load-kv-cache-weight", o.KVCacheWeight, "Weight of an engine's KV-cache usage (0-1) in the load-aware score.")
	fs.Float64Var(&o.PrefixCacheWeight, "prefix-cache-weight", o.PrefixCacheWeight, "What a prompt found whole on an endpoint is worth in the prefix-cache score, in requests in flight.")
	fs.IntVar(&o.PrefixCacheBlocksPerEndpoint, "prefix-cache-blocks-per-endpoint", o.PrefixCacheBlocksPerEndpoint, fmt.Sprintf("Prompt blocks (%d bytes each) the prefix-cache balancer remembers per endpoint.", balance.PromptBlockBytes))
	fs.DurationVar(&o.ScrapeInterval, "scrape-interval", o.ScrapeInterval, "How often the load-aware balancer scrapes each Ready pod's metrics.")
	fs.DurationVar(&o.ScrapeTimeout, "scrape-timeout", o.ScrapeTimeout, "Time allowed for one metrics scrape.")
	fs.DurationVar(&o.LoRAPollInterval, "lora-poll-interval", o.LoRAPollInterval,
		"How often every Ready model endpoint is asked which LoRA adapters it has loaded (GET /v1/models), so that a request naming an adapter goes to the endpoints that have it (each answer gets half of it), and how often the leader loads the adapters that models' Services declare (capstan.dev/lora-adapters). 0 turns adapters off.")
	fs.DurationVar(&o.LoRALoadTimeout, "lora-load-timeout", o.LoRALoadTimeout, "Time an engine has to answer a call loading or unloading a LoRA adapter.")
	fs.IntVar(&o.MaxIdleConnsPerEndpoint, "max-idle-conns-per-endpoint", o.MaxIdleConnsPerEndpoint, "Idle keep-alive connections kept to each endpoint.")
	fs.DurationVar(&o.ShutdownDelay, "shutdown-delay", o.ShutdownDelay, "On SIGTERM, keep serving this long while /readyz fails, so the router leaves its Service's endpoints before it stops accepting connections.")
	fs.DurationVar(&o.ShutdownTimeout, "shutdown-timeout", o.ShutdownTimeout, "Then wait at most this long for in-flight requests (streams included) to finish.")
	fs.BoolVar(&o.AccessLog, "access-log", o.AccessLog, "Log every request (request id, model, pod, status, duration).")
	fs.IntVar(&o.Workers, "discovery-workers", o.Workers, "Goroutines rebuilding Service endpoint sets.")
	fs.BoolVar(&o.Profiling, "profiling", o.Profiling, "Serve Go profiles under /debug/pprof/ on --admin-bind-address.")
	fs.DurationVar(&o.EndpointPickerTimeout, "endpoint-picker-timeout", o.EndpointPickerTimeout, "With the Gateway API, how long an InferencePool's endpoint picker may take to answer a request, and again to answer its response headers; a picker that does not answer in time has failed (failureMode FailOpen: the router balances the request; FailClose: 503).")
	fs.BoolVar(&o.EndpointPickerTLS, "endpoint-picker-tls", o.EndpointPickerTLS, "Speak TLS to endpoint pickers without verifying their certificate, as Envoy-based gateways do (the reference pickers serve a self-signed one); false speaks plaintext HTTP/2.")
	fs.StringVar(&o.GatewayAddressPool, "gateway-address-pool", o.GatewayAddressPool, "Serve the Gateway API, giving every Gateway an address of its own from this CIDR; the addresses must be local to the router (see docs/gateway.md).")
	fs.StringVar(&o.GatewayAddress, "gateway-address", o.GatewayAddress, "Serve the Gateway API with every Gateway sharing this address (an IP or hostname that reaches the router); listeners are told apart by port and hostname.")
	fs.StringVar(&o.GatewayPublishService, "gateway-publish-service", o.GatewayPublishService, "Serve the Gateway API with every Gateway sharing the address of this Service (namespace/name; its load balancer's, else an external IP, else its cluster IP), which must route to the router's pods; listeners are told apart by port and hostname.")
	fs.StringVar(&o.GatewayBindAddress, "gateway-bind-address", o.GatewayBindAddress, "With --gateway-address or --gateway-publish-service, the host to listen on for Gateway listeners; empty means every interface.")
	fs.StringSliceVar(&o.GatewaySecretNamespaces, "gateway-secret-namespaces", o.GatewaySecretNamespaces, "With the Gateway API, the only namespaces whose TLS Secrets the router reads for listener certificates, comma-separated; the router then needs RBAC for Secrets only there (manifests/components/gateway-scoped-secrets). A listener whose certificate is elsewhere is not served. Empty means the namespaces of --namespaces.")
	fs.StringVar(&o.GatewayControllerName, "gateway-controller-name", o.GatewayControllerName, "The controllerName of the GatewayClasses this router serves.")
	componentbaseoptions.BindLeaderElectionFlags(&o.LeaderElection, fs)
}

// Validate checks the options and returns every problem at once.
func (o *Options) Validate() error {
	var errs field.ErrorList
	if _, _, err := net.SplitHostPort(o.BindAddress); err != nil {
		errs = append(errs, field.Invalid(field.NewPath("bind-address"), o.BindAddress, err.Error()))
	}
	if _, _, err := net.SplitHostPort(o.AdminBindAddress); err != nil {
		errs = append(errs, field.Invalid(field.NewPath("admin-bind-address"), o.AdminBindAddress, err.Error()))
	} else if o.AdminBindAddress == o.BindAddress {
		errs = append(errs, field.Invalid(field.NewPath("admin-bind-address"), o.AdminBindAddress, "must differ from --bind-address: the API port serves only the API"))
	}
	if !balance.ValidPolicy(o.Balancer) {
		supported := make([]string, len(balance.Policies))
		for i, p := range balance.Policies {
			supported[i] = string(p)
		}
		errs = append(errs, field.NotSupported(field.NewPath("balancer"), o.Balancer, supported))
	}
	if q, err := resource.ParseQuantity(o.MaxBodySize); err != nil {
		errs = append(errs, field.Invalid(field.NewPath("max-body-size"), o.MaxBodySize, err.Error()))
	} else if q.Value() < 1 {
		errs = append(errs, field.Invalid(field.NewPath("max-body-size"), o.MaxBodySize, "must be at least 1 byte"))
	}
	if q, err := resource.ParseQuantity(o.MaxInFlightBodySize); err != nil {
		errs = append(errs, field.Invalid(field.NewPath("max-in-flight-body-size"), o.MaxInFlightBodySize, err.Error()))
	} else if b, _ := resource.ParseQuantity(o.MaxBodySize); q.Value() != 0 && q.Value() < b.Value() {
		errs = append(errs, field.Invalid(field.NewPath("max-in-flight-body-size"), o.MaxInFlightBodySize, "must be 0 or at least --max-body-size"))
	}
	if o.XFFTrustedHops < 0 || o.XFFTrustedHops > 16 {
		errs = append(errs, field.Invalid(field.NewPath("xff-trusted-hops"), o.XFFTrustedHops, "must be between 0 and 16"))
	}
	if o.MaxAttempts < 1 || o.MaxAttempts > balance.MaxAttempts {
		errs = append(errs, field.Invalid(field.NewPath("max-attempts"), o.MaxAttempts, fmt.Sprintf("must be between 1 and %d", balance.MaxAttempts)))
	}
	positive := map[string]time.Duration{
		"connect-timeout": o.ConnectTimeout, "first-byte-timeout": o.FirstByteTimeout, "idle-stream-timeout": o.IdleStreamTimeout,
		"try-duration": o.TryDuration, "read-header-timeout": o.ReadHeaderTimeout, "idle-timeout": o.IdleTimeout,
		"write-timeout": o.WriteTimeout, "endpoint-picker-timeout": o.EndpointPickerTimeout,
		"retry-after": o.RetryAfter, "scrape-interval": o.ScrapeInterval, "scrape-timeout": o.ScrapeTimeout, "shutdown-timeout": o.ShutdownTimeout,
	}
	for _, name := range sortedKeys(positive) {
		if positive[name] <= 0 {
			errs = append(errs, field.Invalid(field.NewPath(name), positive[name].String(), "must be positive"))
		}
	}
	if o.ScrapeTimeout >= o.ScrapeInterval {
		errs = append(errs, field.Invalid(field.NewPath("scrape-timeout"), o.ScrapeTimeout.String(), "must be shorter than --scrape-interval"))
	}
	if o.LoRAPollInterval < 0 {
		errs = append(errs, field.Invalid(field.NewPath("lora-poll-interval"), o.LoRAPollInterval.String(), "must not be negative"))
	}
	if o.LoRALoadTimeout <= 0 {
		errs = append(errs, field.Invalid(field.NewPath("lora-load-timeout"), o.LoRALoadTimeout.String(), "must be positive"))
	}
	if o.EjectionBase < 0 {
		errs = append(errs, field.Invalid(field.NewPath("ejection-base"), o.EjectionBase.String(), "must not be negative"))
	}
	if o.EjectionBase > 0 && o.EjectionMax < o.EjectionBase {
		errs = append(errs, field.Invalid(field.NewPath("ejection-max"), o.EjectionMax.String(), "must be at least --ejection-base"))
	}
	if o.MaxHeaderBytes < 1<<10 {
		errs = append(errs, field.Invalid(field.NewPath("max-header-bytes"), o.MaxHeaderBytes, "must be at least 1024"))
	}
	if o.MaxHeaderFields < 1 {
		errs = append(errs, field.Invalid(field.NewPath("max-header-fields"), o.MaxHeaderFields, "must be positive"))
	}
	if o.HoldTimeout < 0 {
		errs = append(errs, field.Invalid(field.NewPath("hold-timeout"), o.HoldTimeout.String(), "must not be negative"))
	}
	if o.MaxHeldRequestsPerModel < 1 {
		errs = append(errs, field.Invalid(field.NewPath("max-held-requests-per-model"), o.MaxHeldRequestsPerModel, "must be positive"))
	}
	if o.RetryInterval < 0 {
		errs = append(errs, field.Invalid(field.NewPath("retry-interval"), o.RetryInterval.String(), "must not be negative"))
	}
	if o.OutlierConsecutiveErrors < 0 {
		errs = append(errs, field.Invalid(field.NewPath("outlier-consecutive-errors"), o.OutlierConsecutiveErrors, "must not be negative"))
	}
	for i, code := range o.OutlierStatuses {
		if code < 100 || code > 599 {
			errs = append(errs, field.Invalid(field.NewPath("outlier-statuses").Index(i), code, "must be an HTTP status (100-599)"))
		}
	}
	if o.MaxEjectionPercent < 0 || o.MaxEjectionPercent > 100 {
		errs = append(errs, field.Invalid(field.NewPath("max-ejection-percent"), o.MaxEjectionPercent, "must be between 0 and 100"))
	}
	if o.ShutdownDelay < 0 {
		errs = append(errs, field.Invalid(field.NewPath("shutdown-delay"), o.ShutdownDelay.String(), "must not be negative"))
	}
	if o.MaxRequestsPerEndpoint < 0 {
		errs = append(errs, field.Invalid(field.NewPath("max-requests-per-endpoint"), o.MaxRequestsPerEndpoint, "must not be negative"))
	}
	if o.MaxRequestsPerModel < 0 {
		errs = append(errs, field.Invalid(field.NewPath("max-requests-per-model"), o.MaxRequestsPerModel, "must not be negative"))
	}
	if o.PrefixBytes < 1 {
		errs = append(errs, field.Invalid(field.NewPath("prefix-bytes"), o.PrefixBytes, "must be positive"))
	}
	if !(o.LoadFactor > 1) {
		errs = append(errs, field.Invalid(field.NewPath("prefix-load-factor"), o.LoadFactor, "must be above 1"))
	}
	if o.SessionHeader == "" {
		errs = append(errs, field.Required(field.NewPath("session-header"), ""))
	} else if !httpguts.ValidHeaderFieldName(o.SessionHeader) {
		errs = append(errs, field.Invalid(field.NewPath("session-header"), o.SessionHeader, "not a header name"))
	}
	if o.PrefixCacheWeight < 0 {
		errs = append(errs, field.Invalid(field.NewPath("prefix-cache-weight"), o.PrefixCacheWeight, "must not be negative"))
	}
	if o.PrefixCacheBlocksPerEndpoint < 1 {
		errs = append(errs, field.Invalid(field.NewPath("prefix-cache-blocks-per-endpoint"), o.PrefixCacheBlocksPerEndpoint, "must be positive"))
	}
	if o.QueueWeight < 0 || o.KVCacheWeight < 0 {
		errs = append(errs, field.Invalid(field.NewPath("load-queue-weight"), fmt.Sprint(o.QueueWeight, ",", o.KVCacheWeight), "weights must not be negative"))
	}
	if o.MaxIdleConnsPerEndpoint < 1 {
		errs = append(errs, field.Invalid(field.NewPath("max-idle-conns-per-endpoint"), o.MaxIdleConnsPerEndpoint, "must be positive"))
	}
	if o.Workers < 1 {
		errs = append(errs, field.Invalid(field.NewPath("discovery-workers"), o.Workers, "must be positive"))
	}
	for i, ns := range o.Namespaces {
		if ns == "" {
			errs = append(errs, field.Invalid(field.NewPath("namespaces").Index(i), ns, "must not be empty"))
		}
	}
	errs = append(errs, o.validateGateway()...)
	return errs.ToAggregate()
}

// validateGateway checks the Gateway API flags.
func (o *Options) validateGateway() field.ErrorList {
	var errs field.ErrorList
	modes := 0
	for _, v := range []string{o.GatewayAddressPool, o.GatewayAddress, o.GatewayPublishService} {
		if v != "" {
			modes++
		}
	}
	if modes > 1 {
		errs = append(errs, field.Forbidden(field.NewPath("gateway-address"), "set only one of --gateway-address-pool, --gateway-address and --gateway-publish-service"))
	}
	if o.GatewayPublishService != "" {
		ns, name, ok := strings.Cut(o.GatewayPublishService, "/")
		if !ok || len(validation.IsDNS1123Label(ns)) > 0 || len(validation.IsDNS1035Label(name)) > 0 {
			errs = append(errs, field.Invalid(field.NewPath("gateway-publish-service"), o.GatewayPublishService, "must be namespace/name of a Service"))
		}
	}
	if o.GatewayAddressPool != "" {
		if p, err := netip.ParsePrefix(o.GatewayAddressPool); err != nil {
			errs = append(errs, field.Invalid(field.NewPath("gateway-address-pool"), o.GatewayAddressPool, err.Error()))
		} else if p != p.Masked() {
			errs = append(errs, field.Invalid(field.NewPath("gateway-address-pool"), o.GatewayAddressPool, "must be a network address, e.g. "+p.Masked().String()))
		}
	}
	if o.GatewayAddress != "" {
		if _, err := netip.ParseAddr(o.GatewayAddress); err != nil {
			for _, msg := range validation.IsDNS1123Subdomain(o.GatewayAddress) {
				errs = append(errs, field.Invalid(field.NewPath("gateway-address"), o.GatewayAddress, "not an IP address or hostname: "+msg))
			}
		}
	}
	if o.GatewayBindAddress != "" {
		if _, err := netip.ParseAddr(o.GatewayBindAddress); err != nil {
			errs = append(errs, field.Invalid(field.NewPath("gateway-bind-address"), o.GatewayBindAddress, "must be an IP address"))
		}
	}
	for i, ns := range o.GatewaySecretNamespaces {
		p := field.NewPath("gateway-secret-namespaces").Index(i)
		switch {
		case ns == "":
			errs = append(errs, field.Invalid(p, ns, "must not be empty"))
		case len(validation.IsDNS1123Label(ns)) > 0:
			errs = append(errs, field.Invalid(p, ns, "must be a namespace name"))
		case slices.Index(o.GatewaySecretNamespaces, ns) < i:
			errs = append(errs, field.Duplicate(p, ns))
		case len(o.Namespaces) > 0 && !slices.Contains(o.Namespaces, ns):
			errs = append(errs, field.Invalid(p, ns, "must be one of --namespaces: the router watches Gateways and ReferenceGrants only there"))
		}
	}
	if len(o.GatewaySecretNamespaces) > 0 && !o.GatewayEnabled() {
		errs = append(errs, field.Forbidden(field.NewPath("gateway-secret-namespaces"), "needs the Gateway API (--gateway-address-pool, --gateway-address or --gateway-publish-service)"))
	}
	if domain, path, ok := strings.Cut(o.GatewayControllerName, "/"); !ok || path == "" || len(validation.IsDNS1123Subdomain(domain)) > 0 {
		errs = append(errs, field.Invalid(field.NewPath("gateway-controller-name"), o.GatewayControllerName, "must be DOMAIN/PATH, e.g. "+gateway.DefaultControllerName))
	}
	if le := o.LeaderElection; o.elects() && le.LeaderElect {
		if le.LeaseDuration.Duration <= 0 || le.RenewDeadline.Duration <= 0 || le.RetryPeriod.Duration <= 0 {
			errs = append(errs, field.Invalid(field.NewPath("leader-elect-lease-duration"), le.LeaseDuration.Duration.String(),
				"--leader-elect-lease-duration, --leader-elect-renew-deadline and --leader-elect-retry-period must be positive"))
		} else if le.RenewDeadline.Duration >= le.LeaseDuration.Duration {
			errs = append(errs, field.Invalid(field.NewPath("leader-elect-renew-deadline"), le.RenewDeadline.Duration.String(), "must be shorter than --leader-elect-lease-duration"))
		}
		if le.ResourceLock != resourcelock.LeasesResourceLock {
			errs = append(errs, field.NotSupported(field.NewPath("leader-elect-resource-lock"), le.ResourceLock, []string{resourcelock.LeasesResourceLock}))
		}
		if le.ResourceName == "" || le.ResourceNamespace == "" {
			errs = append(errs, field.Required(field.NewPath("leader-elect-resource-namespace"), "--leader-elect-resource-name and --leader-elect-resource-namespace must be set"))
		}
	}
	return errs
}

func sortedKeys(m map[string]time.Duration) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// elects reports whether the router needs a leader: to write Gateway API
// status, or to load declared LoRA adapters.
func (o *Options) elects() bool { return o.GatewayEnabled() || o.LoRAPollInterval > 0 }

// newServer returns an HTTP/1.1 server with the options' limits and
// timeouts, for the API and every cleartext Gateway address.
func (o *Options) newServer() *server.Server {
	return &server.Server{
		ReadHeaderTimeout: o.ReadHeaderTimeout, IdleTimeout: o.IdleTimeout, WriteTimeout: o.WriteTimeout,
		MaxHeaderBytes: o.MaxHeaderBytes, MaxHeaderFields: o.MaxHeaderFields,
	}
}

// maxBodyBytes is MaxBodySize in bytes; Validate has checked it.
func (o *Options) maxBodyBytes() int64 { return quantity(o.MaxBodySize) }

// maxInFlightBodyBytes is MaxInFlightBodySize in bytes; Validate has
// checked it.
func (o *Options) maxInFlightBodyBytes() int64 { return quantity(o.MaxInFlightBodySize) }

func quantity(s string) int64 {
	q := resource.MustParse(s)
	return q.Value()
}
