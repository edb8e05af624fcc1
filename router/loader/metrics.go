package loader

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/capstan-dev/capstan/router/route"
)

type metrics struct {
	calls *prometheus.CounterVec
}

var declaredDesc = prometheus.NewDesc("capstan_router_lora_declared_adapter_endpoints",
	"Ready endpoints of each declared LoRA adapter's model by state: loaded (the engine lists it) and wanted (what the declaration asks for).",
	[]string{"model", "adapter", "state"}, nil)

func newMetrics(reg prometheus.Registerer, table func() *route.Table) *metrics {
	m := &metrics{calls: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "capstan_router", Subsystem: "lora", Name: "adapter_calls_total",
		Help: "Calls the leader made to engines to load or unload declared LoRA adapters, by operation and result (success once the engine's model list agrees).",
	}, []string{"operation", "result"})}
	reg.MustRegister(m.calls, declared{table})
	return m
}

// declared reports, at scrape time, how far each declared adapter is
// loaded; adapter names come from Services, not from pods.
type declared struct{ table func() *route.Table }

func (d declared) Describe(ch chan<- *prometheus.Desc) { ch <- declaredDesc }

func (d declared) Collect(ch chan<- prometheus.Metric) {
	t := d.table()
	for _, m := range t.Models() {
		for _, a := range m.Adapters {
			loaded := 0
			if e := t.Lookup(a.Name); e != nil && e.Base == m.Name && e.Declared {
				loaded = e.Pool.Len()
			}
			ch <- prometheus.MustNewConstMetric(declaredDesc, prometheus.GaugeValue, float64(loaded), m.Name, a.Name, "loaded")
			ch <- prometheus.MustNewConstMetric(declaredDesc, prometheus.GaugeValue, float64(a.Want(m.Pool.Len())), m.Name, a.Name, "wanted")
		}
	}
}
