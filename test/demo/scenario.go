// Package demo is Capstan's closed loop on a local cluster: model servers
// behind capstan-router, autoscaled by the HPA on capstan-metrics-adapter's
// metrics, placed by capstan-scheduler on GPU nodes with fewer model slots
// than the HPAs may ask for. A load ramp drives it up to the capacity cap and
// back down. A third model, idle, is scaled to zero replicas by its HPA; a
// burst of requests later is held by the router until the HPA brings a
// replica back, and the model returns to zero. `make demo` shows it live
// (cmd/capstan-demo); the e2e suite test/e2e/loop asserts on the same run.
package demo

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/components"
	"github.com/capstan-dev/capstan/test/fleet"
)

// Model is one model the demo serves.
type Model struct {
	// Name is what clients send as "model".
	Name string
	// App names its Deployment, Service and HPA.
	App    string
	Engine modelserver.Engine
}

// DefaultModels are served by two different engines, so the adapter's
// mappings for both are on show.
var DefaultModels = []Model{
	{Name: "llama-3-8b", App: "llama", Engine: modelserver.VLLM},
	{Name: "qwen-2-7b", App: "qwen", Engine: modelserver.SGLang},
}

// Config shapes the scenario. Zero fields take the defaults in
// withDefaults.
type Config struct {
	Namespace string
	Models    []Model
	// GPUNodes × SlotsPerNode is the cluster's model capacity; it is meant
	// to be below len(Models) × MaxReplicas.
	GPUNodes, SlotsPerNode int
	MaxReplicas            int32
	// TargetWaiting is the HPA target: waiting requests per replica.
	TargetWaiting int64
	// ScaleDownWindow is the HPA's scale-down stabilization window.
	ScaleDownWindow time.Duration
	// ReadyAfter is how long a new model server "loads weights" (Running,
	// not Ready) before it may take traffic.
	ReadyAfter time.Duration
	// Clients is the peak number of concurrent clients per model; the load
	// ramps to it over Ramp, holds for Hold, then stops.
	Clients    int
	Ramp, Hold time.Duration
	// RouterAddr is where capstan-router listens.
	RouterAddr string
	// Idle is the model that scales to zero; Burst is how many requests it
	// gets at once once it is there (RunBurst).
	Idle  Model
	Burst int
}

func (c Config) withDefaults() Config {
	if c.Namespace == "" {
		c.Namespace = "demo"
	}
	if c.Models == nil {
		c.Models = DefaultModels
	}
	if c.GPUNodes == 0 {
		c.GPUNodes = 3
	}
	if c.SlotsPerNode == 0 {
		c.SlotsPerNode = 2
	}
	if c.MaxReplicas == 0 {
		c.MaxReplicas = 5
	}
	if c.TargetWaiting == 0 {
		c.TargetWaiting = 2
	}
	if c.ScaleDownWindow == 0 {
		c.ScaleDownWindow = 10 * time.Second
	}
	if c.ReadyAfter == 0 {
		c.ReadyAfter = 2 * time.Second
	}
	if c.Clients == 0 {
		c.Clients = 24
	}
	if c.Ramp == 0 {
		c.Ramp = 20 * time.Second
	}
	if c.Hold == 0 {
		c.Hold = 30 * time.Second
	}
	if c.RouterAddr == "" {
		c.RouterAddr = "198.18.255.10:8080"
	}
	if c.Idle.Name == "" {
		c.Idle = Model{Name: "mistral-7b", App: "mistral", Engine: modelserver.VLLM}
	}
	if c.Burst == 0 {
		c.Burst = 20
	}
	return c
}

// Demo is a set-up scenario: components running, models deployed.
type Demo struct {
	Config
	c        *cluster.Cluster
	fleet    *fleet.Fleet
	Router   *components.Component
	Adapter  *components.Component
	Sched    *components.Component
	Stats    *Stats
	clients  atomic.Int64
	stopSim  context.CancelFunc
	progress io.Writer
}

// Setup starts the fleet simulator and Capstan's three components on c,
// creates the GPU nodes and deploys one replica of each model with its
// Service and HPA. progress receives a line per step.
func Setup(ctx context.Context, c *cluster.Cluster, cfg Config, progress io.Writer) (d *Demo, err error) {
	cfg = cfg.withDefaults()
	d = &Demo{Config: cfg, c: c, progress: progress, Stats: newStats()}
	defer func() {
		if err != nil {
			d.Close()
		}
	}()
	step := func(format string, args ...any) { fmt.Fprintf(progress, "  "+format+"\n", args...) }

	nodes := make([]cluster.Node, cfg.GPUNodes)
	for i := range nodes {
		nodes[i] = cluster.Node{Name: fmt.Sprintf("gpu-node-%d", i),
			Labels: map[string]string{"capstan.dev/model-slots": strconv.Itoa(cfg.SlotsPerNode)}}
	}
	if err := c.CreateNodes(ctx, nodes...); err != nil {
		return nil, err
	}
	step("%d kwok GPU nodes with %d model slots each (%d slots; the HPAs may ask for %d)",
		cfg.GPUNodes, cfg.SlotsPerNode, cfg.GPUNodes*cfg.SlotsPerNode, int(cfg.MaxReplicas)*len(cfg.Models))

	if _, err := c.Client.CoreV1().Namespaces().Create(ctx,
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: cfg.Namespace}}, metav1.CreateOptions{}); err != nil {
		return nil, err
	}
	simCtx, stop := context.WithCancel(context.Background())
	d.stopSim = stop
	d.fleet = fleet.New(c.Client, fleet.Options{Namespace: cfg.Namespace, OnRequest: d.Stats.arrived})
	if err := d.fleet.Start(simCtx); err != nil {
		return nil, err
	}
	step("fleet simulator serving model pods on their pod IPs")

	if d.Sched, err = components.StartScheduler(ctx, c); err != nil {
		return nil, fmt.Errorf("starting capstan-scheduler: %w", err)
	}
	step("capstan-scheduler running (profile capstan-scheduler, ModelSlots plugin)")
	if d.Adapter, err = components.StartAdapter(ctx, c, "--window=10s"); err != nil {
		return nil, fmt.Errorf("starting capstan-metrics-adapter: %w", err)
	}
	step("capstan-metrics-adapter serving custom.metrics.k8s.io through its APIServices")
	// The router runs outside the cluster; a stand-in pod with its labels
	// is how the adapter finds its admin port, as it finds the Deployment's
	// pods.
	ip, err := components.RouterPod(ctx, c, "capstan-router")
	if err != nil {
		return nil, err
	}
	installed, err := components.InstallRouter(ctx, c, "router", "Deployment")
	if err != nil {
		return nil, err
	}
	if d.Router, err = installed.Start(ctx, components.RouterOptions{Addr: cfg.RouterAddr, AdminAddr: ip + ":8081"}); err != nil {
		return nil, fmt.Errorf("starting capstan-router: %w", err)
	}
	step("capstan-router listening on http://%s", cfg.RouterAddr)

	for _, m := range append(slices.Clone(cfg.Models), cfg.Idle) {
		ms := cluster.ModelServer{Namespace: cfg.Namespace, Name: m.App, Model: m.Name, Engine: m.Engine,
			Replicas: 1, SchedulerName: "capstan-scheduler",
			Annotations: map[string]string{
				// Four requests run at once, ~0.2 s each; the rest queue.
				fleet.MaxRunningAnnotation:    "4",
				fleet.TTFTAnnotation:          "40ms",
				fleet.TPOTAnnotation:          "10ms",
				fleet.OutputTokensAnnotation:  "16",
				"sim.capstan.dev/ready-after": cfg.ReadyAfter.String(),
			}}
		if err := c.Deploy(ctx, ms); err != nil {
			return nil, err
		}
		hpa := d.hpa(m)
		if m == cfg.Idle {
			hpa = d.zeroHPA(m)
		}
		if _, err := c.Client.AutoscalingV2().HorizontalPodAutoscalers(cfg.Namespace).Create(ctx, hpa, metav1.CreateOptions{}); err != nil {
			return nil, err
		}
	}
	for _, m := range append(slices.Clone(cfg.Models), cfg.Idle) {
		if _, err := c.WaitForReadyPods(ctx, cfg.Namespace, "app="+m.App, 1, time.Minute); err != nil {
			return nil, err
		}
	}
	step("models deployed, 1 replica each, HPAs on requests_waiting (target %d per replica, max %d); %s idle, its HPA (minReplicas 0, requests_demand) takes it to zero",
		cfg.TargetWaiting, cfg.MaxReplicas, cfg.Idle.Name)
	return d, nil
}

// zeroHPA scales the idle model between 0 and 2 replicas on
// requests_demand, the requests the routers hold or have in flight for it,
// which has a value at zero replicas.
func (d *Demo) zeroHPA(m Model) *autoscalingv2.HorizontalPodAutoscaler {
	h := d.hpa(m)
	h.Spec.MinReplicas, h.Spec.MaxReplicas = ptr.To[int32](0), 2
	h.Spec.Metrics = []autoscalingv2.MetricSpec{{
		Type: autoscalingv2.ObjectMetricSourceType,
		Object: &autoscalingv2.ObjectMetricSource{
			DescribedObject: autoscalingv2.CrossVersionObjectReference{APIVersion: "apps/v1", Kind: "Deployment", Name: m.App},
			Metric:          autoscalingv2.MetricIdentifier{Name: "requests_demand"},
			Target:          autoscalingv2.MetricTarget{Type: autoscalingv2.AverageValueMetricType, AverageValue: resource.NewQuantity(8, resource.DecimalSI)},
		},
	}}
	return h
}

// hpa scales a model's Deployment on its waiting requests, as the adapter
// reports them for the Deployment (an Object metric: the total over the
// Ready pods with fresh samples, divided by the replica count).
func (d *Demo) hpa(m Model) *autoscalingv2.HorizontalPodAutoscaler {
	return &autoscalingv2.HorizontalPodAutoscaler{
		ObjectMeta: metav1.ObjectMeta{Name: m.App, Namespace: d.Namespace},
		Spec: autoscalingv2.HorizontalPodAutoscalerSpec{
			ScaleTargetRef: autoscalingv2.CrossVersionObjectReference{APIVersion: "apps/v1", Kind: "Deployment", Name: m.App},
			MinReplicas:    ptr.To[int32](1),
			MaxReplicas:    d.MaxReplicas,
			Metrics: []autoscalingv2.MetricSpec{{
				Type: autoscalingv2.ObjectMetricSourceType,
				Object: &autoscalingv2.ObjectMetricSource{
					DescribedObject: autoscalingv2.CrossVersionObjectReference{APIVersion: "apps/v1", Kind: "Deployment", Name: m.App},
					Metric:          autoscalingv2.MetricIdentifier{Name: "requests_waiting"},
					Target:          autoscalingv2.MetricTarget{Type: autoscalingv2.AverageValueMetricType, AverageValue: resource.NewQuantity(d.TargetWaiting, resource.DecimalSI)},
				},
			}},
			Behavior: &autoscalingv2.HorizontalPodAutoscalerBehavior{
				ScaleUp:   &autoscalingv2.HPAScalingRules{StabilizationWindowSeconds: ptr.To[int32](0)},
				ScaleDown: &autoscalingv2.HPAScalingRules{StabilizationWindowSeconds: ptr.To(int32(d.ScaleDownWindow.Seconds()))},
			},
		},
	}
}

// Close stops the simulator. The cluster and the components it ran are
// stopped with the cluster.
func (d *Demo) Close() {
	if d.stopSim != nil {
		d.stopSim()
		d.fleet.Wait()
	}
}
