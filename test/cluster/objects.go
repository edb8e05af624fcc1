package cluster

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

// ModelServer describes a model-server Deployment and its Service, the shape
// every e2e suite deploys: pods labelled with the model and engine, a
// container port named http on 8000, and a Service labelled with the model.
type ModelServer struct {
	Namespace, Name string
	Model           string
	Engine          modelserver.Engine // default vllm
	Replicas        int32
	// Annotations go on the pod template (simulator and readiness knobs).
	Annotations map[string]string
	// Labels are added to the pod template.
	Labels        map[string]string
	SchedulerName string
	NodeSelector  map[string]string
	// Env is the engine container's environment.
	Env []corev1.EnvVar
	// PreStopSleepSeconds, if set, is the engine container's preStop sleep:
	// how long a deleted pod keeps serving while routers learn it is leaving.
	PreStopSleepSeconds int64
}

// Deployment returns the model server's Deployment.
func (m ModelServer) Deployment() *appsv1.Deployment {
	engine := m.Engine
	if engine == "" {
		engine = modelserver.DefaultEngine
	}
	selector := map[string]string{"app": m.Name}
	labels := map[string]string{modelserver.ModelLabel: m.Model, modelserver.EngineLabel: string(engine)}
	maps.Copy(labels, selector)
	maps.Copy(labels, m.Labels)
	replicas := m.Replicas
	var lifecycle *corev1.Lifecycle
	if m.PreStopSleepSeconds > 0 {
		lifecycle = &corev1.Lifecycle{PreStop: &corev1.LifecycleHandler{
			Sleep: &corev1.SleepAction{Seconds: m.PreStopSleepSeconds}}}
	}
	return &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Namespace: m.Namespace, Name: m.Name, Labels: map[string]string{modelserver.ModelLabel: m.Model}},
		Spec: appsv1.DeploymentSpec{
			Replicas: &replicas,
			Selector: &metav1.LabelSelector{MatchLabels: selector},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels, Annotations: m.Annotations},
				Spec: corev1.PodSpec{
					SchedulerName: m.SchedulerName,
					NodeSelector:  m.NodeSelector,
					Containers: []corev1.Container{{
						Name:      "engine",
						Image:     "capstan.dev/simulated-" + string(engine) + ":latest",
						Ports:     []corev1.ContainerPort{{Name: "http", ContainerPort: modelserver.DefaultPort}},
						Env:       m.Env,
						Lifecycle: lifecycle,
					}},
				},
			},
		},
	}
}

// Service returns the model server's Service, labelled with the model.
func (m ModelServer) Service() *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: m.Namespace, Name: m.Name, Labels: map[string]string{modelserver.ModelLabel: m.Model}},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": m.Name},
			Ports:    []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("http")}},
		},
	}
}

// CreateNamespace creates a namespace with a generated name starting with
// prefix and returns the name.
func (c *Cluster) CreateNamespace(ctx context.Context, prefix string) (string, error) {
	ns, err := c.Client.CoreV1().Namespaces().Create(ctx,
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: prefix + "-"}}, metav1.CreateOptions{})
	if err != nil {
		return "", err
	}
	// Pods need the namespace's default ServiceAccount, which a controller
	// creates a moment later.
	return ns.Name, c.WaitFor(ctx, 30*time.Second, "ServiceAccount default in "+ns.Name, func(ctx context.Context) (bool, error) {
		_, err := c.Client.CoreV1().ServiceAccounts(ns.Name).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, err
	})
}

// Deploy creates the model server's Service and Deployment.
func (c *Cluster) Deploy(ctx context.Context, m ModelServer) error {
	if _, err := c.Client.CoreV1().Services(m.Namespace).Create(ctx, m.Service(), metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating Service %s/%s: %w", m.Namespace, m.Name, err)
	}
	if _, err := c.Client.AppsV1().Deployments(m.Namespace).Create(ctx, m.Deployment(), metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating Deployment %s/%s: %w", m.Namespace, m.Name, err)
	}
	return nil
}

// Pods lists the pods matching a label selector.
func (c *Cluster) Pods(ctx context.Context, namespace, selector string) ([]corev1.Pod, error) {
	list, err := c.Client.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		return nil, err
	}
	return list.Items, nil
}

// WaitForReadyPods waits until exactly n pods match the selector and all are
// Ready, and returns them.
func (c *Cluster) WaitForReadyPods(ctx context.Context, namespace, selector string, n int, timeout time.Duration) ([]corev1.Pod, error) {
	var pods []corev1.Pod
	err := c.WaitFor(ctx, timeout, fmt.Sprintf("%d Ready pods matching %q in %s", n, selector, namespace), func(ctx context.Context) (bool, error) {
		all, err := c.Pods(ctx, namespace, selector)
		if err != nil {
			return false, err
		}
		pods = pods[:0]
		for _, p := range all {
			if p.DeletionTimestamp == nil && modelserver.IsReady(&p) {
				pods = append(pods, p)
			}
		}
		return len(pods) == n && len(all) == n, nil
	})
	return pods, err
}

// Endpoints returns the addresses in a Service's EndpointSlices, split into
// those ready for traffic and the rest.
func (c *Cluster) Endpoints(ctx context.Context, namespace, service string) (ready, notReady []string, err error) {
	list, err := c.Client.DiscoveryV1().EndpointSlices(namespace).List(ctx,
		metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + service})
	if err != nil {
		return nil, nil, err
	}
	for _, s := range list.Items {
		for _, ep := range s.Endpoints {
			if ep.Conditions.Ready == nil || *ep.Conditions.Ready {
				ready = append(ready, ep.Addresses...)
			} else {
				notReady = append(notReady, ep.Addresses...)
			}
		}
	}
	slices.Sort(ready)
	slices.Sort(notReady)
	return ready, notReady, nil
}
