package app

import (
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

func TestDefaultsAreValid(t *testing.T) {
	if err := NewOptions().Validate(); err != nil {
		t.Fatal(err)
	}
	if got := NewOptions().maxBodyBytes(); got != 10<<20 {
		t.Errorf("default body limit %d, want 10 MiB", got)
	}
}

func TestValidate(t *testing.T) {
	for name, tc := range map[string]struct {
		change func(*Options)
		want   string
	}{
		"balancer":         {func(o *Options) { o.Balancer = "fastest" }, `balancer: Unsupported value: "fastest"`},
		"body size":        {func(o *Options) { o.MaxBodySize = "lots" }, `max-body-size: Invalid value: "lots"`},
		"zero body":        {func(o *Options) { o.MaxBodySize = "0" }, `max-body-size: Invalid value: "0": must be at least 1 byte`},
		"attempts":         {func(o *Options) { o.MaxAttempts = 9 }, "max-attempts: Invalid value: 9: must be between 1 and 8"},
		"connect":          {func(o *Options) { o.ConnectTimeout = 0 }, `connect-timeout: Invalid value: "0s": must be positive`},
		"scrape":           {func(o *Options) { o.ScrapeTimeout = 2 * time.Second }, "scrape-timeout: Invalid value: \"2s\": must be shorter than --scrape-interval"},
		"ejection":         {func(o *Options) { o.EjectionMax = time.Millisecond }, "ejection-max: Invalid value: \"1ms\": must be at least --ejection-base"},
		"load factor":      {func(o *Options) { o.LoadFactor = 1 }, "prefix-load-factor: Invalid value: 1: must be above 1"},
		"session header":   {func(o *Options) { o.SessionHeader = "x session" }, `session-header: Invalid value: "x session": not a header name`},
		"bind address":     {func(o *Options) { o.BindAddress = "8080" }, `bind-address: Invalid value: "8080"`},
		"empty namespace":  {func(o *Options) { o.Namespaces = []string{"a", ""} }, `namespaces[1]: Invalid value: "": must not be empty`},
		"negative limit":   {func(o *Options) { o.MaxRequestsPerModel = -1 }, "max-requests-per-model: Invalid value: -1: must not be negative"},
		"negative delay":   {func(o *Options) { o.ShutdownDelay = -time.Second }, `shutdown-delay: Invalid value: "-1s": must not be negative`},
		"no idle conns":    {func(o *Options) { o.MaxIdleConnsPerEndpoint = 0 }, "max-idle-conns-per-endpoint: Invalid value: 0: must be positive"},
		"no workers":       {func(o *Options) { o.Workers = 0 }, "discovery-workers: Invalid value: 0: must be positive"},
		"no prefix":        {func(o *Options) { o.PrefixBytes = 0 }, "prefix-bytes: Invalid value: 0: must be positive"},
		"negative weights": {func(o *Options) { o.KVCacheWeight = -1 }, "weights must not be negative"},
		"two address modes": {func(o *Options) { o.GatewayAddressPool, o.GatewayAddress = "198.18.254.0/24", "203.0.113.1" },
			"set only one of --gateway-address-pool, --gateway-address and --gateway-publish-service"},
		"pool":            {func(o *Options) { o.GatewayAddressPool = "198.18.254.1/24" }, `gateway-address-pool: Invalid value: "198.18.254.1/24": must be a network address, e.g. 198.18.254.0/24`},
		"pool syntax":     {func(o *Options) { o.GatewayAddressPool = "lots" }, `gateway-address-pool: Invalid value: "lots"`},
		"address":         {func(o *Options) { o.GatewayAddress = "not an address" }, `gateway-address: Invalid value: "not an address": not an IP address or hostname`},
		"publish service": {func(o *Options) { o.GatewayPublishService = "just-a-name" }, `gateway-publish-service: Invalid value: "just-a-name": must be namespace/name of a Service`},
		"controller name": {func(o *Options) { o.GatewayControllerName = "capstan" }, `gateway-controller-name: Invalid value: "capstan": must be DOMAIN/PATH`},
		"secret namespace": {func(o *Options) { o.GatewayAddress, o.GatewaySecretNamespaces = "203.0.113.1", []string{"Certs"} },
			`gateway-secret-namespaces[0]: Invalid value: "Certs": must be a namespace name`},
		"duplicate secret namespace": {func(o *Options) {
			o.GatewayAddress, o.GatewaySecretNamespaces = "203.0.113.1", []string{"certs", "certs"}
		},
			`gateway-secret-namespaces[1]: Duplicate value: "certs"`},
		"secret namespace not watched": {func(o *Options) {
			o.GatewayAddress, o.Namespaces, o.GatewaySecretNamespaces = "203.0.113.1", []string{"a"}, []string{"certs"}
		}, `gateway-secret-namespaces[0]: Invalid value: "certs": must be one of --namespaces`},
		"secret namespaces without gateway": {func(o *Options) { o.GatewaySecretNamespaces = []string{"certs"} },
			"gateway-secret-namespaces: Forbidden: needs the Gateway API"},
		"renew deadline": {func(o *Options) {
			o.GatewayAddress = "203.0.113.1"
			o.LeaderElection.RenewDeadline = o.LeaderElection.LeaseDuration
		}, "leader-elect-renew-deadline: Invalid value: \"15s\": must be shorter than --leader-elect-lease-duration"},
		// Without the Gateway API the leader loads declared adapters.
		"renew deadline, adapters": {func(o *Options) { o.LeaderElection.RenewDeadline = o.LeaderElection.LeaseDuration },
			"leader-elect-renew-deadline: Invalid value: \"15s\": must be shorter than --leader-elect-lease-duration"},
		"load timeout": {func(o *Options) { o.LoRALoadTimeout = 0 }, `lora-load-timeout: Invalid value: "0s": must be positive`},
	} {
		t.Run(name, func(t *testing.T) {
			o := NewOptions()
			tc.change(o)
			err := o.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Validate() = %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

func TestFlags(t *testing.T) {
	o := NewOptions()
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	o.AddFlags(fs)
	err := fs.Parse([]string{"--namespaces=a,b", "--balancer=prefix-affinity", "--max-body-size=1Mi",
		"--first-byte-timeout=30s", "--shutdown-delay=0s", "--access-log=false"})
	if err != nil {
		t.Fatal(err)
	}
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	if len(o.Namespaces) != 2 || o.Balancer != "prefix-affinity" || o.maxBodyBytes() != 1<<20 ||
		o.FirstByteTimeout != 30*time.Second || o.ShutdownDelay != 0 || o.AccessLog {
		t.Errorf("flags not applied: %+v", o)
	}
}

func TestGatewayFlags(t *testing.T) {
	o := NewOptions()
	if o.GatewayEnabled() {
		t.Error("the Gateway API is on by default")
	}
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	o.AddFlags(fs)
	err := fs.Parse([]string{"--gateway-publish-service=capstan-system/capstan-router-gateway", "--gateway-bind-address=0.0.0.0",
		"--leader-elect-lease-duration=4s", "--leader-elect-renew-deadline=3s", "--leader-elect-resource-namespace=router"})
	if err != nil {
		t.Fatal(err)
	}
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	a := o.gatewayAddresses()
	if !o.GatewayEnabled() || a.PublishService.String() != "capstan-system/capstan-router-gateway" || a.BindHost != "0.0.0.0" || a.Pool.IsValid() {
		t.Errorf("addresses %+v", a)
	}
	if le := o.LeaderElection; !le.LeaderElect || le.LeaseDuration.Duration != 4*time.Second || le.ResourceNamespace != "router" || le.ResourceName != "capstan-router" {
		t.Errorf("leader election %+v", le)
	}
	o = NewOptions()
	o.GatewayAddressPool = "198.18.254.0/24"
	if a := o.gatewayAddresses(); a.Pool.String() != "198.18.254.0/24" {
		t.Errorf("pool %v", a.Pool)
	}
}
