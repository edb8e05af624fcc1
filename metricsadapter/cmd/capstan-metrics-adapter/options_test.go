package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/metricsadapter/catalogue"
	"github.com/capstan-dev/capstan/metricsadapter/scrape"
)

func parse(t *testing.T, args ...string) *options {
	t.Helper()
	o := newOptions()
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	o.addFlags(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	return o
}

func TestDefaults(t *testing.T) {
	o := parse(t)
	so, err := o.scrapeOptions(nil, nopObserver{})
	if err != nil {
		t.Fatal(err)
	}
	if so.Interval != time.Second || so.Timeout != 750*time.Millisecond || so.Concurrency != 64 ||
		so.MaxSeriesPerFamily != 4096 || so.MaxBucketsPerHistogram != 200 {
		t.Errorf("scrape defaults: %+v", so)
	}
	st, err := o.storeOptions(nil)
	if err != nil || st.Window != 30*time.Second || st.MaxAge != 5*time.Second {
		t.Errorf("store defaults: %+v, %v", st, err)
	}
}

func TestPageBoundFlags(t *testing.T) {
	so, err := parse(t, "--scrape-max-series-per-family=10", "--scrape-max-buckets-per-histogram=20").scrapeOptions(nil, nopObserver{})
	if err != nil || so.MaxSeriesPerFamily != 10 || so.MaxBucketsPerHistogram != 20 {
		t.Errorf("got %d series, %d buckets, %v; want 10, 20", so.MaxSeriesPerFamily, so.MaxBucketsPerHistogram, err)
	}
}

func TestInvalidFlagsNameTheFlag(t *testing.T) {
	cases := map[string]struct {
		args     []string
		errMatch string
	}{
		"timeout as long as the interval": {[]string{"--scrape-interval=500ms", "--scrape-timeout=500ms"}, `--scrape-timeout: Invalid value: "500ms": must be shorter than the interval`},
		"no concurrency":                  {[]string{"--scrape-concurrency=0"}, "--scrape-concurrency: Invalid value: 0"},
		"backoff below the interval":      {[]string{"--scrape-interval=2s", "--scrape-backoff-max=1s"}, "--scrape-backoff-max"},
		"no series":                       {[]string{"--scrape-max-series-per-family=0"}, "--scrape-max-series-per-family: Invalid value: 0"},
		"negative buckets":                {[]string{"--scrape-max-buckets-per-histogram=-1"}, "--scrape-max-buckets-per-histogram: Invalid value: -1"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := parse(t, tc.args...).scrapeOptions(nil, nopObserver{})
			if err == nil || !strings.Contains(err.Error(), tc.errMatch) {
				t.Fatalf("got %v, want an error containing %q", err, tc.errMatch)
			}
		})
	}
	if _, err := parse(t, "--window=100ms").storeOptions(nil); err == nil || !strings.Contains(err.Error(), "--window") {
		t.Errorf("--window=100ms: %v", err)
	}
	if _, err := parse(t, "--max-age=200ms").storeOptions(nil); err == nil || !strings.Contains(err.Error(), `--max-age: Invalid value: "200ms"`) {
		t.Errorf("--max-age=200ms: %v", err)
	}
}

type nopObserver struct{}

func (nopObserver) Observe(scrape.Target, time.Time, *catalogue.Values) {}
func (nopObserver) Forget(types.NamespacedName)                         {}

func TestCatalogueFile(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(good, []byte("raw:\n  vllm:\n  - series: vllm:num_requests_swapped\n    name: swapped\n"), 0o644)
	os.WriteFile(bad, []byte("metrics:\n- name: x\n  kind: gauge\n  engines: {vllm: [{serie: a}]}\n"), 0o644)
	c, err := parse(t, "--metrics-catalogue="+good).catalogue()
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := c.Lookup("swapped"); !ok {
		t.Error("the file's raw gauge is not served")
	}
	if _, err := parse(t, "--metrics-catalogue="+bad).catalogue(); err == nil || !strings.Contains(err.Error(), bad) || !strings.Contains(err.Error(), `unknown field "serie"`) {
		t.Errorf("a bad file: %v", err)
	}
	if _, err := parse(t, "--metrics-catalogue="+filepath.Join(dir, "missing.yaml")).catalogue(); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("a missing file: %v", err)
	}
}
