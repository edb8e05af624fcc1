// Package docs checks that documentation shipped with Capstan matches the
// code: the Grafana dashboard queries only metrics the router and the
// metrics adapter really export.
package docs

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/scrape"
	"github.com/capstan-dev/capstan/router/engineload"
	"github.com/capstan-dev/capstan/router/metrics"
	"github.com/capstan-dev/capstan/router/route"
	"github.com/capstan-dev/capstan/test/cluster"
)

// names records the fully-qualified name of every metric registered with it.
type names map[string]bool

var fqName = regexp.MustCompile(`fqName: "([^"]+)"`)

func (n names) Register(c prometheus.Collector) error {
	ch := make(chan *prometheus.Desc)
	go func() { c.Describe(ch); close(ch) }()
	for d := range ch {
		if m := fqName.FindStringSubmatch(d.String()); m != nil {
			n[m[1]] = true
		}
	}
	return nil
}

func (n names) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		_ = n.Register(c)
	}
}

func (n names) Unregister(prometheus.Collector) bool { return true }

func exported(t *testing.T) names {
	n := names{}
	metrics.New(n, func() *route.Table { return nil }, nil)
	// The scraper as the load-aware router runs it.
	observer := engineload.NewObserver(catalogue.Builtin(), time.Second)
	if _, err := scrape.New(scrape.Options{Registerer: n, Observer: observer}); err != nil {
		t.Fatal(err)
	}
	if len(n) < 10 {
		t.Fatalf("found only %d exported metrics: %v", len(n), n)
	}
	return n
}

var metricRef = regexp.MustCompile(`\bcapstan_[a-z_]+`)

func TestDashboardQueriesExportedMetrics(t *testing.T) {
	root, err := cluster.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(root, "docs", "grafana-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("the dashboard is not valid JSON: %v", err)
	}
	have := exported(t)
	used := map[string]bool{}
	for _, p := range dash.Panels {
		for _, target := range p.Targets {
			for _, ref := range metricRef.FindAllString(target.Expr, -1) {
				name := ref
				for _, suffix := range []string{"_bucket", "_sum", "_count"} {
					if base := strings.TrimSuffix(ref, suffix); base != ref && have[base] {
						name = base
					}
				}
				used[name] = true
				if !have[name] {
					t.Errorf("panel %q queries %s, which neither the router nor the adapter exports", p.Title, ref)
				}
			}
		}
	}
	var unused []string
	for name := range have {
		if !used[name] {
			unused = append(unused, name)
		}
	}
	sort.Strings(unused)
	if len(unused) > 0 {
		t.Logf("exported but not on the dashboard: %v", unused)
	}
}
