package main

import (
	"fmt"
	"os"
	"time"

	"github.com/spf13/pflag"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation/field"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/demand"
	"github.com/capstan-dev/capstan/metricsadapter/scrape"
	"github.com/capstan-dev/capstan/metricsadapter/store"
)

// options are Capstan's own flags, beside the library's serving,
// authentication and authorization flags.
type options struct {
	// Kubeconfig, when set, is the default of --lister-kubeconfig,
	// --authentication-kubeconfig and --authorization-kubeconfig.
	Kubeconfig string

	ScrapeInterval    time.Duration
	ScrapeTimeout     time.Duration
	ScrapeConcurrency int
	ScrapeBackoffMax  time.Duration
	MaxPageBytes      int64
	MaxSeries         int
	MaxBuckets        int
	MaxAge            time.Duration
	Window            time.Duration
	CatalogueFile     string
	// RouterNamespace and RouterSelector find the capstan-router pods
	// whose demand is served as requests_demand; an empty selector turns
	// requests_demand off.
	RouterNamespace string
	RouterSelector  string
}

func newOptions() *options {
	return &options{
		ScrapeInterval:    time.Second,
		ScrapeConcurrency: 64,
		ScrapeBackoffMax:  30 * time.Second,
		MaxPageBytes:      4 << 20,
		MaxSeries:         4096,
		MaxBuckets:        200,
		MaxAge:            5 * time.Second,
		Window:            30 * time.Second,
		RouterNamespace:   "capstan-system",
		RouterSelector:    "app.kubernetes.io/name=capstan-router",
	}
}

func (o *options) addFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.Kubeconfig, "kubeconfig", o.Kubeconfig,
		"Path to a kubeconfig to watch pods and objects with, and to delegate authentication and authorization to. "+
			"Default: in-cluster configuration. The --lister-kubeconfig, --authentication-kubeconfig and --authorization-kubeconfig flags override it for their part.")
	fs.DurationVar(&o.ScrapeInterval, "scrape-interval", o.ScrapeInterval, "How often each Ready model-server pod's metrics are scraped.")
	fs.DurationVar(&o.ScrapeTimeout, "scrape-timeout", o.ScrapeTimeout,
		"Deadline of one scrape, connecting included; must be shorter than --scrape-interval. Default: 3/4 of --scrape-interval.")
	fs.IntVar(&o.ScrapeConcurrency, "scrape-concurrency", o.ScrapeConcurrency, "How many scrapes may run at once.")
	fs.DurationVar(&o.ScrapeBackoffMax, "scrape-backoff-max", o.ScrapeBackoffMax,
		"Longest wait before retrying a pod whose scrapes fail; the wait doubles from --scrape-interval, with jitter.")
	fs.Int64Var(&o.MaxPageBytes, "scrape-max-page-bytes", o.MaxPageBytes, "Largest metrics page accepted, after decompression.")
	fs.IntVar(&o.MaxSeries, "scrape-max-series-per-family", o.MaxSeries,
		"Most series a metric family the adapter reads may have on a page; a page with more fails its scrape (too_many_series). A family read only for its newest series (vllm:lora_requests_info) counts as one.")
	fs.IntVar(&o.MaxBuckets, "scrape-max-buckets-per-histogram", o.MaxBuckets,
		"Most buckets a histogram series the adapter reads may have; a page with more fails its scrape (too_many_buckets).")
	fs.DurationVar(&o.MaxAge, "max-age", o.MaxAge,
		"A pod's last good sample is served until it is this old; after that the pod is left out of answers (never reported as 0).")
	fs.DurationVar(&o.Window, "window", o.Window, "Span over which rates (tokens per second) and latency quantiles are computed.")
	fs.StringVar(&o.RouterNamespace, "router-namespace", o.RouterNamespace, "Namespace of the capstan-router pods whose held and in-flight requests are served as requests_demand.")
	fs.StringVar(&o.RouterSelector, "router-selector", o.RouterSelector,
		"Label selector of those pods; their admin port (named admin) is scraped every --scrape-interval. Empty turns requests_demand off.")
	fs.StringVar(&o.CatalogueFile, "metrics-catalogue", o.CatalogueFile,
		"YAML file merged over the built-in metric catalogue (engine metric names and what they are served as); see docs/metricsadapter.md.")
}

// catalogue loads the built-in catalogue with the user's file merged in.
func (o *options) catalogue() (*catalogue.Catalogue, error) {
	if o.CatalogueFile == "" {
		return catalogue.Builtin(), nil
	}
	data, err := os.ReadFile(o.CatalogueFile)
	if err != nil {
		return nil, fmt.Errorf("--metrics-catalogue: %w", err)
	}
	c, err := catalogue.Load(data)
	if err != nil {
		return nil, fmt.Errorf("--metrics-catalogue %s: %w", o.CatalogueFile, err)
	}
	return c, nil
}

// scrapeOptions and storeOptions turn the flags into the packages' options,
// which validate them; flag names are the field paths of their errors.
func (o *options) scrapeOptions(c *catalogue.Catalogue, obs scrape.Observer) (scrape.Options, error) {
	if err := o.checkSet(); err != nil {
		return scrape.Options{}, err
	}
	opts := scrape.Options{
		Interval: o.ScrapeInterval, Timeout: o.ScrapeTimeout, Concurrency: o.ScrapeConcurrency,
		BackoffInitial: o.ScrapeInterval, BackoffMax: o.ScrapeBackoffMax,
		MaxPageBytes: o.MaxPageBytes, MaxSeriesPerFamily: o.MaxSeries, MaxBucketsPerHistogram: o.MaxBuckets,
		Catalogue: c, Observer: obs,
		// Histograms are read as often as the store keeps a checkpoint of
		// them, and no more: they are most of the parsing.
		HistogramInterval: max(o.ScrapeInterval, o.Window/6),
	}
	scrape.SetDefaults(&opts)
	return opts, flagErrors(scrape.Validate(nil, &opts), map[string]string{
		"interval": "--scrape-interval", "timeout": "--scrape-timeout", "concurrency": "--scrape-concurrency",
		"backoffInitial": "--scrape-interval", "backoffMax": "--scrape-backoff-max",
		"maxPageBytes": "--scrape-max-page-bytes", "histogramInterval": "--window",
		"maxSeriesPerFamily": "--scrape-max-series-per-family", "maxBucketsPerHistogram": "--scrape-max-buckets-per-histogram",
	})
}

func (o *options) storeOptions(c *catalogue.Catalogue) (store.Options, error) {
	if err := o.checkSet(); err != nil {
		return store.Options{}, err
	}
	if o.MaxAge < o.ScrapeInterval {
		return store.Options{}, field.Invalid(field.NewPath("--max-age"), o.MaxAge.String(),
			fmt.Sprintf("must be at least the scrape interval (%s), or no sample would ever be fresh", o.ScrapeInterval))
	}
	opts := store.Options{Window: o.Window, MaxAge: o.MaxAge, Catalogue: c}
	store.SetDefaults(&opts)
	return opts, flagErrors(store.Validate(nil, &opts), map[string]string{"window": "--window", "maxAge": "--max-age"})
}

// demandOptions configure the scrapes of the router replicas from the same
// flags as the model servers'.
func (o *options) demandOptions(scrapeOpts scrape.Options) (demand.Options, labels.Selector, error) {
	sel, err := labels.Parse(o.RouterSelector)
	if err != nil {
		return demand.Options{}, nil, field.Invalid(field.NewPath("--router-selector"), o.RouterSelector, err.Error())
	}
	return demand.Options{Interval: scrapeOpts.Interval, Timeout: scrapeOpts.Timeout, MaxAge: o.MaxAge,
		MaxPageBytes: o.MaxPageBytes, MaxModels: o.MaxSeries, Port: "admin"}, sel, nil
}

// checkSet rejects zero for the flags whose zero the packages would take
// as "use the default": a user who typed 0 gets an error, not a default.
func (o *options) checkSet() error {
	var errs field.ErrorList
	for _, f := range []struct {
		flag  string
		value int64
	}{
		{"--scrape-interval", int64(o.ScrapeInterval)}, {"--scrape-concurrency", int64(o.ScrapeConcurrency)},
		{"--scrape-backoff-max", int64(o.ScrapeBackoffMax)}, {"--scrape-max-page-bytes", o.MaxPageBytes},
		{"--scrape-max-series-per-family", int64(o.MaxSeries)}, {"--scrape-max-buckets-per-histogram", int64(o.MaxBuckets)},
		{"--max-age", int64(o.MaxAge)}, {"--window", int64(o.Window)},
	} {
		if f.value == 0 {
			errs = append(errs, field.Invalid(field.NewPath(f.flag), 0, "must be positive"))
		}
	}
	return errs.ToAggregate()
}

// flagErrors renames the fields of validation errors to the flags that set
// them, so that "--scrape-timeout: Invalid value" tells the user what to fix.
func flagErrors(err error, flags map[string]string) error {
	if err == nil {
		return nil
	}
	agg, ok := err.(interface{ Errors() []error })
	if !ok {
		return err
	}
	var out field.ErrorList
	for _, e := range agg.Errors() {
		fe, ok := e.(*field.Error)
		if !ok {
			return err
		}
		renamed := *fe
		if flag, ok := flags[fe.Field]; ok {
			renamed.Field = flag
		}
		out = append(out, &renamed)
	}
	return out.ToAggregate()
}
