package demand

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

func routerPage(demand map[string]float64) string {
	var b strings.Builder
	b.WriteString("# TYPE go_goroutines gauge\ngo_goroutines 12\n# TYPE " + Family + " gauge\n")
	for m, v := range demand {
		fmt.Fprintf(&b, "%s{model=%q} %g\n", Family, m, v)
	}
	return b.String()
}

func serve(t *testing.T, page string) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, page) }))
	t.Cleanup(srv.Close)
	return srv
}

func newDemand() *Demand {
	return New(Options{Interval: time.Second, Timeout: time.Second, MaxAge: 5 * time.Second, MaxPageBytes: 1 << 10, MaxModels: 3, Port: "admin"})
}

func (d *Demand) add(name, url string) {
	d.replicas[types.NamespacedName{Namespace: "capstan-system", Name: name}] = &replica{url: url + "/metrics"}
}

// The demand of a model is summed over the replicas that answered; one that
// did not is left out, and with none answering there is no value at all.
func TestDemandSumsTheReplicasThatAnswer(t *testing.T) {
	d := newDemand()
	a := serve(t, routerPage(map[string]float64{"llama": 3, "qwen": 1}))
	b := serve(t, routerPage(map[string]float64{"llama": 2}))
	down := serve(t, "")
	down.Close()
	d.add("a", a.URL)
	d.add("b", b.URL)
	d.add("down", down.URL)
	d.scrapeAll(t.Context())
	now := time.Now()
	for model, want := range map[string]float64{"llama": 5, "qwen": 1, "mistral": 0} {
		if v, _, ok := d.Value(model, now); !ok || v != want {
			t.Errorf("%s: %v (ok %v), want %v", model, v, ok, want)
		}
	}
	// Too old to count.
	if _, _, ok := d.Value("llama", now.Add(6*time.Second)); ok {
		t.Error("pages older than MaxAge still count")
	}
	// Every replica gone: no value rather than 0.
	a.Close()
	b.Close()
	d2 := newDemand()
	d2.add("a", a.URL)
	d2.scrapeAll(t.Context())
	if v, _, ok := d2.Value("llama", time.Now()); ok {
		t.Errorf("with no replica answering: %v, want no value", v)
	}
}

// Router pages are bounded like engines' pages: too large, or too many
// models, and the replica is left out.
func TestHostileRouterPagesAreRefused(t *testing.T) {
	many := map[string]float64{}
	for i := range 4 {
		many[fmt.Sprintf("m%d", i)] = 1
	}
	for name, page := range map[string]string{
		"too large":       routerPage(map[string]float64{"llama": 1}) + strings.Repeat("# padding\n", 200),
		"too many models": routerPage(many),
		"not a page":      "llama 1 2 3 4\n",
	} {
		t.Run(name, func(t *testing.T) {
			d := newDemand()
			d.add("a", serve(t, page).URL)
			d.scrapeAll(t.Context())
			if v, _, ok := d.Value("llama", time.Now()); ok {
				t.Errorf("a refused page counts: %v", v)
			}
		})
	}
}

func TestRouterPodURL(t *testing.T) {
	d := newDemand()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "capstan-system", Name: "r"},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "router", Ports: []corev1.ContainerPort{
			{Name: "http", ContainerPort: 8080}, {Name: "admin", ContainerPort: 8081}}}}},
		Status: corev1.PodStatus{PodIP: "198.18.0.4", Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}},
	}
	if url, ok := d.urlOf(pod); !ok || url != "http://198.18.0.4:8081/metrics" {
		t.Errorf("url %q (ok %v)", url, ok)
	}
	pod.Status.Conditions[0].Status = corev1.ConditionFalse
	if _, ok := d.urlOf(pod); ok {
		t.Error("an unready router pod is scraped")
	}
}
