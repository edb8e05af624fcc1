// Package lora finds which LoRA adapters each Ready model endpoint has
// loaded, from what the engine itself says: its OpenAI model list (GET
// /v1/models), where vLLM lists every loaded adapter with the base model as
// its parent. A Poller asks every Ready endpoint of every model each
// interval and reports the endpoints whose set changed; the routing table
// then serves each adapter from exactly the endpoints that report it.
//
// The answer comes from tenants' code: it is read only up to MaxBodyBytes,
// adapters beyond MaxAdapters are ignored, and a name that is not a sane
// model name is skipped. An endpoint that does not answer keeps its last
// report for a few passes (a slow answer is not an unload), then loses it.
package lora

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/klog/v2"
)

const (
	// MaxBodyBytes bounds a model list.
	MaxBodyBytes = 1 << 20
	// MaxAdapters bounds the adapters taken from one endpoint's list.
	MaxAdapters = 256
	// MaxNameBytes bounds an adapter's name.
	MaxNameBytes = 256
	// staleAfter is how many passes in a row an endpoint may fail to
	// answer before its last report is dropped.
	staleAfter = 3
	// parallel bounds the lists fetched at once.
	parallel = 16
)

// Reporter takes an endpoint's adapters whenever they change; nil when the
// endpoint has none, or is gone.
type Reporter interface {
	AdaptersChanged(address string, adapters []string)
}

// Options configures a Poller.
type Options struct {
	// Interval between passes over the endpoints; Timeout bounds one
	// endpoint's answer.
	Interval, Timeout time.Duration
	// Endpoints returns the addresses to ask: the Ready endpoints of every
	// model.
	Endpoints func() []string
	Reporter  Reporter
	// Errors, when set, counts the model lists that could not be had.
	Errors prometheus.Counter
	// Transport, when set, replaces the default one (tests).
	Transport http.RoundTripper
	UserAgent string
}

// Poller asks endpoints for their adapters.
type Poller struct {
	opts   Options
	client *Client

	mu    sync.Mutex
	known map[string]*report
}

type report struct {
	adapters []string
	failures int // passes in a row without an answer
}

// New returns a Poller.
func New(opts Options) *Poller {
	return &Poller{opts: opts, client: NewClient(opts.Timeout, 3*opts.Interval, opts.Transport, opts.UserAgent), known: map[string]*report{}}
}

// Loaded returns the adapters addr last reported; false when it has no
// report.
func (p *Poller) Loaded(addr string) ([]string, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	r := p.known[addr]
	if r == nil {
		return nil, false
	}
	return r.adapters, true
}

// Refresh asks addr for its adapters now, as after loading or unloading
// one, and reports a change.
func (p *Poller) Refresh(ctx context.Context, addr string) error {
	adapters, err := p.client.Adapters(ctx, addr)
	if err != nil {
		return err
	}
	p.update(addr, adapters)
	return nil
}

// Run polls every Interval until ctx ends.
func (p *Poller) Run(ctx context.Context) {
	wait.UntilWithContext(ctx, p.Sync, p.opts.Interval)
}

// Sync makes one pass: asks every current endpoint, reports the changes, and
// forgets the endpoints that are gone.
func (p *Poller) Sync(ctx context.Context) {
	logger := klog.FromContext(ctx)
	addrs := p.opts.Endpoints()
	var g errgroup.Group
	g.SetLimit(parallel)
	for _, addr := range addrs {
		g.Go(func() error {
			adapters, err := p.client.Adapters(ctx, addr)
			if err != nil {
				if ctx.Err() == nil {
					logger.V(4).Info("Reading the loaded LoRA adapters", "endpoint", addr, "err", err)
				}
				if p.opts.Errors != nil {
					p.opts.Errors.Inc()
				}
				p.failed(addr)
				return nil
			}
			p.update(addr, adapters)
			return nil
		})
	}
	_ = g.Wait()
	p.mu.Lock()
	var gone []string
	for addr := range p.known {
		if !slices.Contains(addrs, addr) {
			gone = append(gone, addr)
			delete(p.known, addr)
		}
	}
	p.mu.Unlock()
	for _, addr := range gone {
		p.opts.Reporter.AdaptersChanged(addr, nil)
	}
}

func (p *Poller) update(addr string, adapters []string) {
	p.mu.Lock()
	r := p.known[addr]
	changed := r == nil && len(adapters) > 0 || r != nil && !slices.Equal(r.adapters, adapters)
	p.known[addr] = &report{adapters: adapters}
	p.mu.Unlock()
	if changed {
		p.opts.Reporter.AdaptersChanged(addr, adapters)
	}
}

// failed keeps addr's last report until it has failed staleAfter passes in
// a row.
func (p *Poller) failed(addr string) {
	p.mu.Lock()
	r := p.known[addr]
	drop := false
	if r != nil {
		r.failures++
		drop = r.failures >= staleAfter
	}
	if drop {
		delete(p.known, addr)
	}
	p.mu.Unlock()
	if drop && len(r.adapters) > 0 {
		p.opts.Reporter.AdaptersChanged(addr, nil)
	}
}

// modelList is the part of an OpenAI model list read: vLLM gives an
// adapter the base model as parent, and the base model none.
type modelList struct {
	Data []struct {
		ID     string  `json:"id"`
		Parent *string `json:"parent"`
	} `json:"data"`
}

// Parse returns the adapters of a model list, sorted and without
// duplicates: the entries with a parent, whose names are sane, at most
// MaxAdapters of them.
func Parse(body []byte) ([]string, error) {
	var list modelList
	if err := json.Unmarshal(body, &list); err != nil {
		return nil, fmt.Errorf("GET /v1/models: %w", err)
	}
	var adapters []string
	for _, m := range list.Data {
		if m.Parent == nil || *m.Parent == "" || !ValidName(m.ID) || slices.Contains(adapters, m.ID) {
			continue
		}
		if len(adapters) == MaxAdapters {
			break
		}
		adapters = append(adapters, m.ID)
	}
	slices.Sort(adapters)
	return adapters, nil
}

// ValidName reports whether s can name an adapter: 1 to MaxNameBytes
// printable characters, no spaces.
func ValidName(s string) bool {
	return s != "" && len(s) <= MaxNameBytes && !strings.ContainsFunc(s, func(r rune) bool {
		return !unicode.IsPrint(r) || unicode.IsSpace(r)
	})
}
