package app

import (
	"context"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/scrape"
	"github.com/capstan-dev/capstan/metricsadapter/targets"
	"github.com/capstan-dev/capstan/router/engineload"
	"github.com/capstan-dev/capstan/router/route"
)

// engineLoadFeed is what the load-aware balancer reads the engines' own load
// from: the metrics adapter's target tracking (on the router's informers
// over the model pods of each namespace, which make the Ready ones the
// scraper's targets) and its scraper, observed by engineload, whose feeder
// copies each pod's load into the routing table's hosts.
type engineLoadFeed struct {
	scraper *scrape.Scraper
	feeder  *engineload.Feeder
}

func newEngineLoadFeed(logger klog.Logger, pods []cache.SharedIndexInformer, o *Options, routes *route.Builder, reg prometheus.Registerer) (*engineLoadFeed, error) {
	c := catalogue.Builtin()
	// A sample is served for as long as the metrics adapter serves one by
	// default: five scrape intervals.
	observer := engineload.NewObserver(c, 5*o.ScrapeInterval)
	scraper, err := scrape.New(scrape.Options{
		Interval:   o.ScrapeInterval,
		Timeout:    o.ScrapeTimeout,
		Catalogue:  c,
		Observer:   observer,
		Wants:      engineload.Wants,
		Registerer: reg,
		UserAgent:  userAgent,
	})
	if err != nil {
		return nil, err
	}
	f := &engineLoadFeed{
		scraper: scraper,
		feeder:  &engineload.Feeder{Source: observer, Table: routes.Table, Interval: o.ScrapeInterval / 4},
	}
	for _, informer := range pods {
		if err := targets.AddEventHandler(logger, informer, scraper); err != nil {
			return nil, err
		}
	}
	return f, nil
}

// Run scrapes and feeds until ctx ends, and waits for all of it to stop.
func (f *engineLoadFeed) Run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return f.scraper.Run(ctx) })
	g.Go(func() error { f.feeder.Run(ctx); return nil })
	return g.Wait()
}
