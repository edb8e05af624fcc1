package demo

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"sort"
	"strings"
	"time"

	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"
	cmv1beta2 "k8s.io/metrics/pkg/apis/custom_metrics/v1beta2"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

// PodView is one model pod as the live view shows it.
type PodView struct {
	Name, Node string
	// State is Ready, Loading (Running, not Ready), Pending or Terminating.
	State string
	// Waiting and Running are what the metrics adapter serves for the pod
	// ("-" when it has no fresh sample, as for pods it must not scrape).
	Waiting, Running string
	// Served is how many requests per second the router sent it since the
	// last sample.
	Served int64
	// Reason is the scheduler's message for a Pending pod.
	Reason string
}

// ModelView is one model in the live view.
type ModelView struct {
	Model
	// Desired is the HPA's decision; Replicas the Deployment's.
	Desired, Replicas int32
	// Waiting is the Deployment's requests_waiting, the value the HPA
	// divides by the replica count.
	Waiting                        string
	Ready, Loading, Pending, Other int
	Pods                           []PodView
	// Idle marks the model that scales to zero; for it, Held is what the
	// router holds for it and Demand its requests_demand.
	Idle   bool
	Held   int
	Demand string
}

// Observe samples the cluster every interval until ctx ends: it records the
// figures (first scale-up decision, peaks, Pending reasons, the end of the
// scale-down) and hands each sample to show, if not nil.
func (d *Demo) Observe(ctx context.Context, interval time.Duration, show func([]ModelView)) error {
	// HPA decisions are caught from a watch, not the sampling, so their
	// time is exact.
	factory := informers.NewSharedInformerFactoryWithOptions(d.c.Client, 0, informers.WithNamespace(d.Namespace))
	hpas := factory.Autoscaling().V2().HorizontalPodAutoscalers().Informer()
	_, err := hpas.AddEventHandler(cache.ResourceEventHandlerFuncs{
		UpdateFunc: func(_, obj any) {
			h, ok := obj.(*autoscalingv2.HorizontalPodAutoscaler)
			if !ok || h.Status.DesiredReplicas <= 1 {
				return
			}
			d.Stats.update(func(f *Figures) {
				if !f.LoadStart.IsZero() && f.FirstScaleUp.IsZero() {
					f.FirstScaleUp = time.Now()
				}
			})
		},
	})
	if err != nil {
		return err
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	cache.WaitForCacheSync(ctx.Done(), hpas.HasSynced)

	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		views, err := d.sample(ctx)
		if err == nil {
			d.record(views)
			if show != nil {
				show(views)
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

// sample reads what the live view shows.
func (d *Demo) sample(ctx context.Context) ([]ModelView, error) {
	served, since := d.Stats.takeServed()
	var views []ModelView
	for _, m := range append(slices.Clone(d.Models), d.Idle) {
		v := ModelView{Model: m, Idle: m == d.Idle}
		if v.Idle {
			v.Held = d.held(ctx, m.Name)
			v.Demand = d.objectMetric(ctx, m.App, "requests_demand")
		}
		if h, err := d.c.Client.AutoscalingV2().HorizontalPodAutoscalers(d.Namespace).Get(ctx, m.App, metav1.GetOptions{}); err == nil {
			v.Desired = h.Status.DesiredReplicas
		}
		dep, err := d.c.Client.AppsV1().Deployments(d.Namespace).Get(ctx, m.App, metav1.GetOptions{})
		if err != nil {
			return nil, err
		}
		v.Replicas = *dep.Spec.Replicas
		pods, err := d.c.Pods(ctx, d.Namespace, "app="+m.App)
		if err != nil {
			return nil, err
		}
		selector := "app=" + m.App
		waiting := d.podMetric(ctx, "requests_waiting", selector)
		running := d.podMetric(ctx, "requests_running", selector)
		v.Waiting = d.objectMetric(ctx, m.App, "requests_waiting")
		for _, p := range pods {
			pv := PodView{Name: p.Name, Node: p.Spec.NodeName, Waiting: orDash(waiting[p.Name]), Running: orDash(running[p.Name]),
				Served: int64(float64(served[p.Namespace+"/"+p.Name]) / max(since.Seconds(), 0.001))}
			switch {
			case p.DeletionTimestamp != nil:
				pv.State = "Terminating"
				v.Other++
			case p.Spec.NodeName == "":
				pv.State = "Pending"
				pv.Reason = unschedulableMessage(&p)
				v.Pending++
			case modelserver.IsReady(&p):
				pv.State = "Ready"
				v.Ready++
			default:
				pv.State = "Loading"
				v.Loading++
			}
			v.Pods = append(v.Pods, pv)
		}
		sort.Slice(v.Pods, func(i, j int) bool {
			if v.Pods[i].State != v.Pods[j].State {
				return stateOrder(v.Pods[i].State) < stateOrder(v.Pods[j].State)
			}
			return v.Pods[i].Name < v.Pods[j].Name
		})
		views = append(views, v)
	}
	return views, nil
}

func stateOrder(s string) int {
	return strings.Index("Ready Loading Pending Terminating", s)
}

// record updates the figures from one sample.
func (d *Demo) record(views []ModelView) {
	d.Stats.update(func(f *Figures) {
		bound := 0
		allOne := true
		for _, v := range views {
			if v.Idle {
				f.PeakHeld = max(f.PeakHeld, v.Held)
				if v.Replicas == 0 && len(v.Pods) == 0 && f.ZeroReached.IsZero() {
					f.ZeroReached = time.Now()
				}
			}
			n := v.Ready + v.Loading
			bound += n
			f.PeakReplicas[v.Name] = max(f.PeakReplicas[v.Name], n)
			for _, p := range v.Pods {
				if p.Reason != "" {
					f.PendingReasons[p.Reason]++
				}
			}
			if !v.Idle && (v.Replicas != 1 || v.Ready != 1 || len(v.Pods) != 1) {
				allOne = false
			}
		}
		f.PeakBound = max(f.PeakBound, bound)
		if !f.LoadEnd.IsZero() && allOne && f.ScaledDown.IsZero() {
			f.ScaledDown = time.Now()
		}
	})
}

// held is how many requests the router holds for a model.
func (d *Demo) held(ctx context.Context, model string) int {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, d.Router.URL+"/v1/models/"+model, nil)
	if err != nil {
		return 0
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	var m struct {
		Held int `json:"held"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&m)
	return m.Held
}

// unschedulableMessage is the scheduler's reason for not placing the pod.
func unschedulableMessage(p *corev1.Pod) string {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionFalse {
			return c.Message
		}
	}
	return ""
}

// podMetric asks the custom metrics API for a metric of the selected pods,
// as the HPA controller would, and returns the values by pod name.
func (d *Demo) podMetric(ctx context.Context, metric, selector string) map[string]string {
	path := fmt.Sprintf("/apis/custom.metrics.k8s.io/v1beta2/namespaces/%s/pods/*/%s", d.Namespace, metric)
	list, err := d.metricValues(ctx, path, selector)
	if err != nil {
		return nil
	}
	out := map[string]string{}
	for _, v := range list.Items {
		out[v.DescribedObject.Name] = v.Value.String()
	}
	return out
}

// objectMetric is the Deployment's value of a metric.
func (d *Demo) objectMetric(ctx context.Context, deployment, metric string) string {
	path := fmt.Sprintf("/apis/custom.metrics.k8s.io/v1beta2/namespaces/%s/deployments.apps/%s/%s", d.Namespace, deployment, metric)
	list, err := d.metricValues(ctx, path, "")
	if err != nil || len(list.Items) == 0 {
		return "-"
	}
	return list.Items[0].Value.String()
}

func (d *Demo) metricValues(ctx context.Context, path, selector string) (*cmv1beta2.MetricValueList, error) {
	req := d.c.Client.CoreV1().RESTClient().Get().AbsPath(path)
	if selector != "" {
		req = req.Param("labelSelector", selector)
	}
	raw, err := req.DoRaw(ctx)
	if err != nil {
		return nil, err
	}
	var list cmv1beta2.MetricValueList
	return &list, json.Unmarshal(raw, &list)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// Render writes one frame of the live view.
func Render(w io.Writer, views []ModelView, elapsed time.Duration, clients int, f Figures) {
	fmt.Fprintf(w, "Capstan demo  %s   clients/model %-3d requests %-7d client errors %d\n\n",
		elapsed.Round(time.Second), clients, f.Requests, f.ClientErrors)
	for _, v := range views {
		fmt.Fprintf(w, "%s (%s)  HPA wants %d, Deployment %d: %d ready, %d loading, %d pending   waiting requests (Deployment): %s\n",
			v.Name, v.Engine, v.Desired, v.Replicas, v.Ready, v.Loading, v.Pending, v.Waiting)
		if v.Idle {
			fmt.Fprintf(w, "  scales to zero: held by the router %d, requests_demand %s\n", v.Held, v.Demand)
		}
		fmt.Fprintf(w, "  %-28s %-12s %-12s %8s %8s %7s\n", "POD", "STATE", "NODE", "WAITING", "RUNNING", "REQ/S")
		for _, p := range v.Pods {
			line := fmt.Sprintf("  %-28s %-12s %-12s %8s %8s %7d", p.Name, p.State, orDash(p.Node), p.Waiting, p.Running, p.Served)
			if p.Reason != "" {
				line += "  " + p.Reason
			}
			fmt.Fprintln(w, line)
		}
		fmt.Fprintln(w)
	}
}

// RenderLine writes a one-line summary of a sample, for logs and scripts.
func RenderLine(w io.Writer, views []ModelView, elapsed time.Duration, clients int, f Figures) {
	var b strings.Builder
	fmt.Fprintf(&b, "%6s clients=%-3d requests=%-6d errors=%d", elapsed.Round(time.Second), clients, f.Requests, f.ClientErrors)
	for _, v := range views {
		fmt.Fprintf(&b, " | %s: want %d, %d ready %d loading %d pending, waiting %s", v.Name, v.Desired, v.Ready, v.Loading, v.Pending, v.Waiting)
		if v.Idle {
			fmt.Fprintf(&b, ", held %d, demand %s", v.Held, v.Demand)
		}
	}
	fmt.Fprintln(w, b.String())
}

// Summary writes what a run measured.
func Summary(w io.Writer, cfg Config, f Figures) {
	since := func(from, to time.Time) string {
		if from.IsZero() || to.IsZero() {
			return "not reached"
		}
		return to.Sub(from).Round(10 * time.Millisecond).String()
	}
	capacity := cfg.GPUNodes * cfg.SlotsPerNode
	fmt.Fprintf(w, "\nSummary\n")
	fmt.Fprintf(w, "  requests through the router:        %d, client errors: %d\n", f.Requests, f.ClientErrors)
	for _, e := range f.ErrorSamples {
		fmt.Fprintf(w, "    error: %s\n", e)
	}
	fmt.Fprintf(w, "  load start → first scale-up decision: %s\n", since(f.LoadStart, f.FirstScaleUp))
	fmt.Fprintf(w, "  load start → first request served by a new pod: %s\n", since(f.LoadStart, f.FirstNewPodServed))
	fmt.Fprintf(w, "  model pods bound at the peak:       %d of %d slots (per model: %v)\n", f.PeakBound, capacity, f.PeakReplicas)
	for reason := range f.PendingReasons {
		fmt.Fprintf(w, "  replicas waited Pending because:    %s\n", reason)
	}
	fmt.Fprintf(w, "  load end → back to one replica each: %s\n", since(f.LoadEnd, f.ScaledDown))
	fmt.Fprintf(w, "  %s: at zero replicas %s after the load started; a burst of %d requests (at most %d held at once):\n",
		cfg.Idle.Name, since(f.LoadStart, f.ZeroReached), cfg.Burst, f.PeakHeld)
	fmt.Fprintf(w, "    time to first byte from zero:     %s, last answer after %s\n", since(f.BurstStart, f.BurstFirstByte), since(f.BurstStart, f.BurstEnd))
	fmt.Fprintf(w, "    last answer → back at zero:       %s\n", since(f.BurstEnd, f.ZeroReturned))
}
