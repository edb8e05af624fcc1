// Command capstan-metrics-adapter serves custom.metrics.k8s.io (v1beta1 and
// v1beta2) for inference servers: it scrapes every Ready model-server pod's
// Prometheus endpoint and serves engine-neutral per-pod and per-object
// metrics to the HorizontalPodAutoscaler. See docs/metricsadapter.md.
package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"time"

	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/apiserver/pkg/server/healthz"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	logsapi "k8s.io/component-base/logs/api/v1"
	"k8s.io/component-base/metrics/legacyregistry"
	"k8s.io/klog/v2"
	"sigs.k8s.io/controller-runtime/pkg/manager/signals"
	cmmetrics "sigs.k8s.io/custom-metrics-apiserver/pkg/apiserver/metrics"
	basecmd "sigs.k8s.io/custom-metrics-apiserver/pkg/cmd"

	"github.com/capstan-dev/capstan/metricsadapter/demand"
	"github.com/capstan-dev/capstan/metricsadapter/provider"
	"github.com/capstan-dev/capstan/metricsadapter/scrape"
	"github.com/capstan-dev/capstan/metricsadapter/store"
	"github.com/capstan-dev/capstan/metricsadapter/targets"
)

// adapter is the library's adapter base next to Capstan's flags.
type adapter struct {
	basecmd.AdapterBase
	*options
	logging *logsapi.LoggingConfiguration
}

func main() {
	a := &adapter{AdapterBase: basecmd.AdapterBase{Name: "capstan-metrics-adapter"}, options: newOptions(),
		logging: logsapi.NewLoggingConfiguration()}
	fs := a.Flags()
	a.addFlags(fs)
	logsapi.AddFlags(a.logging, fs)
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if err := logsapi.ValidateAndApply(a.logging, nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	// The first SIGINT or SIGTERM starts a graceful shutdown; a second
	// exits at once. The router's main does the same.
	ctx := signals.SetupSignalHandler()
	if err := a.run(ctx); err != nil {
		klog.ErrorS(err, "capstan-metrics-adapter failed")
		klog.FlushAndExit(klog.ExitFlushTimeout, 1)
	}
	klog.Flush()
}

func (a *adapter) run(ctx context.Context) error {
	logger := klog.FromContext(ctx)
	if a.Kubeconfig != "" {
		for _, f := range []*string{&a.RemoteKubeConfigFile, &a.Authentication.RemoteKubeConfigFile, &a.Authorization.RemoteKubeConfigFile} {
			if *f == "" {
				*f = a.Kubeconfig
			}
		}
	}
	cat, err := a.catalogue()
	if err != nil {
		return err
	}
	storeOpts, err := a.storeOptions(cat)
	if err != nil {
		return err
	}
	st, err := store.New(storeOpts)
	if err != nil {
		return err
	}
	scrapeOpts, err := a.scrapeOptions(cat, st)
	if err != nil {
		return err
	}
	scrapeOpts.Registerer = legacyregistry.Registerer()
	scraper, err := scrape.New(scrapeOpts)
	if err != nil {
		return err
	}

	// Every informer lives in the library's factory, which the API server
	// starts and whose sync /readyz reports. Pods are the one exception to
	// its defaults: only those labelled capstan.dev/model are listed.
	factory, err := a.Informers()
	if err != nil {
		return err
	}
	podInformer := factory.InformerFor(&corev1.Pod{}, func(client kubernetes.Interface, _ time.Duration) cache.SharedIndexInformer {
		return targets.NewPodInformer(client, "")
	})
	if err := targets.AddEventHandler(logger, podInformer, scraper); err != nil {
		return err
	}
	mapper, err := a.RESTMapper()
	if err != nil {
		return err
	}
	demandOpts, routerSelector, err := a.demandOptions(scrapeOpts)
	if err != nil {
		return err
	}
	var routers *demand.Demand
	var routerInformer cache.SharedIndexInformer
	if !routerSelector.Empty() {
		demandOpts.Registerer = legacyregistry.Registerer()
		routers = demand.New(demandOpts)
		cfg, err := a.ClientConfig()
		if err != nil {
			return err
		}
		client, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			return err
		}
		routerInformer = coreinformers.NewFilteredPodInformer(client, a.RouterNamespace, 0, cache.Indexers{},
			func(o *metav1.ListOptions) { o.LabelSelector = routerSelector.String() })
		if err := routers.AddEventHandler(logger, routerInformer); err != nil {
			return err
		}
	}
	a.WithCustomMetrics(provider.New(provider.Config{
		Catalogue:    cat,
		Store:        st,
		Pods:         corelisters.NewPodLister(podInformer.GetIndexer()),
		Deployments:  factory.Apps().V1().Deployments().Lister(),
		StatefulSets: factory.Apps().V1().StatefulSets().Lister(),
		Services:     factory.Core().V1().Services().Lister(),
		Mapper:       mapper,
		Demand:       demandSource(routers),
	}))
	if err := cmmetrics.RegisterMetrics(legacyregistry.Register); err != nil {
		return err
	}
	cfg, err := a.Config()
	if err != nil {
		return err
	}
	chain := cfg.GenericConfig.BuildHandlerChainFunc
	cfg.GenericConfig.BuildHandlerChainFunc = func(h http.Handler, c *genericapiserver.Config) http.Handler {
		return chain(provider.MetricSelectorFilter(h), c)
	}
	srv, err := a.Server()
	if err != nil {
		return err
	}
	if err := srv.GenericAPIServer.AddReadyzChecks(healthz.NamedCheck("model-pods-synced", func(*http.Request) error {
		if !podInformer.HasSynced() {
			return errors.New("the model-server pod informer has not synced")
		}
		return nil
	})); err != nil {
		return err
	}
	scrapeDone := make(chan error, 1)
	go func() { scrapeDone <- scraper.Run(ctx) }()
	if routers != nil {
		go routerInformer.Run(ctx.Done())
		go routers.Run(ctx)
	}
	logger.Info("Starting", "scrapeInterval", scrapeOpts.Interval, "scrapeTimeout", scrapeOpts.Timeout,
		"maxAge", storeOpts.MaxAge, "window", storeOpts.Window, "metrics", len(cat.Served()))
	err = a.Run(ctx)
	<-scrapeDone
	return err
}

// demandSource keeps a nil *demand.Demand a nil provider.Demand.
func demandSource(d *demand.Demand) provider.Demand {
	if d == nil {
		return nil
	}
	return d
}
