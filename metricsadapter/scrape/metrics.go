package scrape

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// The scraper's own Prometheus metrics. Per-target series are produced at
// collection time from the targets present then, so a removed pod's series
// disappear with it.
var (
	targetsDesc = prometheus.NewDesc("capstan_scrape_targets",
		"Targets being scraped.", nil, nil)
	scrapesDesc = prometheus.NewDesc("capstan_scrape_target_scrapes_total",
		"Scrapes of a target by result: success, or why it failed (refused, timeout, network_error, http_error, too_large, parse_error, unmapped, too_many_series, too_many_buckets).",
		[]string{"namespace", "pod", "result"}, nil)
	targetsByStateDesc = prometheus.NewDesc("capstan_scrape_targets_by_state",
		"Targets by the outcome of their last scrape: up (succeeded), failing (failed), unscraped (not scraped yet).",
		[]string{"state"}, nil)
	oldestSampleAgeDesc = prometheus.NewDesc("capstan_scrape_oldest_sample_age_seconds",
		"Age of the oldest last good sample among the targets that have one; absent when none has.", nil, nil)
	upDesc = prometheus.NewDesc("capstan_scrape_target_up",
		"Whether the target's last scrape succeeded.", []string{"namespace", "pod"}, nil)
	lastDurationDesc = prometheus.NewDesc("capstan_scrape_target_last_duration_seconds",
		"How long the target's last scrape took.", []string{"namespace", "pod"}, nil)
	sampleAgeDesc = prometheus.NewDesc("capstan_scrape_target_sample_age_seconds",
		"Age of the target's last good sample; absent until it has one.", []string{"namespace", "pod"}, nil)
	failuresDesc = prometheus.NewDesc("capstan_scrape_target_consecutive_failures",
		"Scrapes of the target that failed in a row; the next one waits an exponential backoff.", []string{"namespace", "pod"}, nil)
)

type metrics struct {
	s        *Scraper
	duration *prometheus.HistogramVec
}

func newMetrics(s *Scraper, reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{s: s, duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "capstan_scrape_duration_seconds",
		Help:    "Duration of scrapes of all targets, by whether they succeeded.",
		Buckets: []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5},
	}, []string{"result"})}
	for _, c := range []prometheus.Collector{m.duration, m} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func (m *metrics) observe(r Result, d time.Duration) {
	label := "success"
	if r != Success {
		label = "failure"
	}
	m.duration.WithLabelValues(label).Observe(d.Seconds())
}

// Describe implements prometheus.Collector.
func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{targetsDesc, targetsByStateDesc, oldestSampleAgeDesc, scrapesDesc, upDesc, lastDurationDesc, sampleAgeDesc, failuresDesc} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	m.s.mu.RLock()
	states := make([]*state, 0, len(m.s.targets))
	for _, st := range m.s.targets {
		states = append(states, st)
	}
	m.s.mu.RUnlock()
	ch <- prometheus.MustNewConstMetric(targetsDesc, prometheus.GaugeValue, float64(len(states)))
	now := time.Now()
	var up, failing, unscraped int
	var oldest time.Duration
	sampled := false
	for _, st := range states {
		switch {
		case st.up.Load():
			up++
		case st.failing.Load() > 0:
			failing++
		default:
			unscraped++
		}
		if at := st.sampledAt.Load(); at != 0 {
			oldest, sampled = max(oldest, now.Sub(time.Unix(0, at))), true
		}
	}
	for state, n := range map[string]int{"up": up, "failing": failing, "unscraped": unscraped} {
		ch <- prometheus.MustNewConstMetric(targetsByStateDesc, prometheus.GaugeValue, float64(n), state)
	}
	if sampled {
		ch <- prometheus.MustNewConstMetric(oldestSampleAgeDesc, prometheus.GaugeValue, oldest.Seconds())
	}
	for _, st := range states {
		ns, pod := st.target.Key.Namespace, st.target.Key.Name
		for r := range numResults {
			if n := st.scrapes[r].Load(); n > 0 || r == Success {
				ch <- prometheus.MustNewConstMetric(scrapesDesc, prometheus.CounterValue, float64(n), ns, pod, r.String())
			}
		}
		up := 0.0
		if st.up.Load() {
			up = 1
		}
		ch <- prometheus.MustNewConstMetric(upDesc, prometheus.GaugeValue, up, ns, pod)
		ch <- prometheus.MustNewConstMetric(lastDurationDesc, prometheus.GaugeValue, time.Duration(st.lastNano.Load()).Seconds(), ns, pod)
		ch <- prometheus.MustNewConstMetric(failuresDesc, prometheus.GaugeValue, float64(st.failing.Load()), ns, pod)
		if at := st.sampledAt.Load(); at != 0 {
			ch <- prometheus.MustNewConstMetric(sampleAgeDesc, prometheus.GaugeValue, now.Sub(time.Unix(0, at)).Seconds(), ns, pod)
		}
	}
}

var _ prometheus.Collector = &metrics{}
