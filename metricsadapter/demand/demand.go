// Package demand reads, from every capstan-router replica, how many
// requests of each model it holds or has in flight
// (capstan_router_model_demand on the router's admin port), and sums them
// over the replicas: the requests_demand metric, which lets an HPA scale a
// model up from zero replicas on its first held request, when the model has
// no pod to scrape.
//
// A replica that cannot be scraped is left out of the sum until it answers
// again; its last page is not reused and it is never counted as 0. When no
// replica has a fresh page, a model has no value at all, so that an HPA
// does not take "no router answered" for "no demand".
package demand

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

// Family is the router's metric this package reads.
const Family = "capstan_router_model_demand"

// Options configure a Demand.
type Options struct {
	// Interval between scrapes of each replica, and Timeout of one.
	Interval, Timeout time.Duration
	// MaxAge is how old a replica's page may be and still count.
	MaxAge time.Duration
	// MaxPageBytes caps a router's metrics page.
	MaxPageBytes int64
	// MaxModels caps the models one page may report; a page over it is
	// refused.
	MaxModels int
	// Port names the router container's admin port.
	Port string
	// Client fetches pages; default a client with Timeout and no proxy.
	Client *http.Client
	// Registerer, if set, gets the scrape counters.
	Registerer prometheus.Registerer
}

// Demand keeps the last page of every router replica.
type Demand struct {
	opts    Options
	results *prometheus.CounterVec

	mu       sync.Mutex
	replicas map[types.NamespacedName]*replica
}

type replica struct {
	url string
	// at is when models was read; zero until the first good scrape.
	at     time.Time
	models map[string]float64
}

// New returns a Demand with no replicas.
func New(opts Options) *Demand {
	if opts.Client == nil {
		opts.Client = &http.Client{Timeout: opts.Timeout, Transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 1,
			DialContext: (&net.Dialer{Timeout: opts.Timeout}).DialContext}}
	}
	d := &Demand{opts: opts, replicas: map[types.NamespacedName]*replica{},
		results: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "capstan_adapter_router_scrapes_total",
			Help: "Scrapes of capstan-router replicas for requests_demand, by result (ok, unreachable, bad_page).",
		}, []string{"result"})}
	if opts.Registerer != nil {
		opts.Registerer.MustRegister(d.results)
	}
	return d
}

// Value is the demand for a model summed over the replicas with a fresh
// page, stamped with the oldest of those pages; false when no replica has
// one.
func (d *Demand) Value(modelName string, now time.Time) (float64, time.Time, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var sum float64
	var oldest time.Time
	fresh := false
	for _, r := range d.replicas {
		if r.at.IsZero() || now.Sub(r.at) > d.opts.MaxAge {
			continue
		}
		sum += r.models[modelName]
		if !fresh || r.at.Before(oldest) {
			oldest = r.at
		}
		fresh = true
	}
	return sum, oldest, fresh
}

// AddEventHandler makes the informer's router pods the replicas scraped:
// Ready pods with an IP and the admin port, not being deleted.
func (d *Demand) AddEventHandler(logger klog.Logger, informer cache.SharedIndexInformer) error {
	update := func(obj any) {
		pod, ok := obj.(*corev1.Pod)
		if !ok {
			return
		}
		key := types.NamespacedName{Namespace: pod.Namespace, Name: pod.Name}
		url, ok := d.urlOf(pod)
		if !ok {
			d.remove(key)
			return
		}
		d.mu.Lock()
		if r := d.replicas[key]; r == nil || r.url != url {
			logger.V(2).Info("Scraping router replica for demand", "pod", klog.KObj(pod), "url", url)
			d.replicas[key] = &replica{url: url}
		}
		d.mu.Unlock()
	}
	_, err := informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    update,
		UpdateFunc: func(_, obj any) { update(obj) },
		DeleteFunc: func(obj any) {
			if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = tomb.Obj
			}
			if pod, ok := obj.(*corev1.Pod); ok {
				d.remove(types.NamespacedName{Namespace: pod.Namespace, Name: pod.Name})
			}
		},
	})
	return err
}

func (d *Demand) remove(key types.NamespacedName) {
	d.mu.Lock()
	delete(d.replicas, key)
	d.mu.Unlock()
}

func (d *Demand) urlOf(pod *corev1.Pod) (string, bool) {
	if !modelserver.Scrapable(pod) {
		return "", false
	}
	for _, c := range pod.Spec.Containers {
		for _, p := range c.Ports {
			if p.Name == d.opts.Port {
				return "http://" + net.JoinHostPort(pod.Status.PodIP, strconv.Itoa(int(p.ContainerPort))) + "/metrics", true
			}
		}
	}
	return "", false
}

// Run scrapes every replica each Interval until ctx ends.
func (d *Demand) Run(ctx context.Context) {
	wait.UntilWithContext(ctx, d.scrapeAll, d.opts.Interval)
}

func (d *Demand) scrapeAll(ctx context.Context) {
	d.mu.Lock()
	urls := make(map[types.NamespacedName]string, len(d.replicas))
	for k, r := range d.replicas {
		urls[k] = r.url
	}
	d.mu.Unlock()
	var wg sync.WaitGroup
	for key, url := range urls {
		wg.Go(func() {
			models, err := d.scrape(ctx, url)
			at := time.Now()
			result := "ok"
			switch {
			case err == nil:
			case isPageError(err):
				result = "bad_page"
			default:
				result = "unreachable"
			}
			d.results.WithLabelValues(result).Inc()
			if err != nil {
				klog.FromContext(ctx).V(2).Info("Router replica not scraped", "pod", key, "err", err)
				return
			}
			d.mu.Lock()
			if r := d.replicas[key]; r != nil && r.url == url {
				r.at, r.models = at, models
			}
			d.mu.Unlock()
		})
	}
	wg.Wait()
}

type pageError struct{ error }

func isPageError(err error) bool {
	_, ok := err.(pageError)
	return ok
}

func (d *Demand) scrape(ctx context.Context, url string) (map[string]float64, error) {
	ctx, cancel := context.WithTimeout(ctx, d.opts.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", string(expfmt.NewFormat(expfmt.TypeTextPlain)))
	resp, err := d.opts.Client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, pageError{fmt.Errorf("%s answered %s", url, resp.Status)}
	}
	// One byte over the cap tells a page that is too large from one that
	// fits exactly.
	body := io.LimitReader(resp.Body, d.opts.MaxPageBytes+1)
	counted := &countingReader{r: body}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(counted)
	if counted.n > d.opts.MaxPageBytes {
		return nil, pageError{fmt.Errorf("%s: the page is larger than %d bytes", url, d.opts.MaxPageBytes)}
	}
	if err != nil {
		return nil, pageError{fmt.Errorf("%s: %w", url, err)}
	}
	models := map[string]float64{}
	fam := families[Family]
	if fam == nil {
		return models, nil
	}
	if len(fam.Metric) > d.opts.MaxModels {
		return nil, pageError{fmt.Errorf("%s: %d models in %s, more than %d", url, len(fam.Metric), Family, d.opts.MaxModels)}
	}
	for _, m := range fam.Metric {
		for _, l := range m.Label {
			if l.GetName() == "model" && m.Gauge != nil {
				models[l.GetValue()] += m.Gauge.GetValue()
			}
		}
	}
	return models, nil
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}
