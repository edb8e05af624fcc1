package replicas

import (
	"fmt"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	appsinformers "k8s.io/client-go/informers/apps/v1"
	autoscalinginformers "k8s.io/client-go/informers/autoscaling/v2"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

// modelIndex indexes Deployments and StatefulSets by "<namespace>/<model>",
// the model of their pod template.
const modelIndex = "model"

// workloads are the informers of one namespace (or all) for the objects that
// say whether a model with no pod gets one back: the Deployments and
// StatefulSets whose pod template serves a model, and the HPAs.
type workloads struct {
	deployments, statefulSets, hpas cache.SharedIndexInformer
}

func newWorkloads(client kubernetes.Interface, ns string) workloads {
	byModel := cache.Indexers{
		cache.NamespaceIndex: cache.MetaNamespaceIndexFunc,
		modelIndex: func(obj any) ([]string, error) {
			if w, ok := asWorkload(obj); ok && w.model != "" {
				return []string{w.namespace + "/" + w.model}, nil
			}
			return nil, nil
		},
	}
	w := workloads{
		deployments:  appsinformers.NewDeploymentInformer(client, ns, 0, byModel),
		statefulSets: appsinformers.NewStatefulSetInformer(client, ns, 0, byModel),
		hpas: autoscalinginformers.NewHorizontalPodAutoscalerInformer(client, ns, 0,
			cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc}),
	}
	// Only fails once an informer has started.
	_ = w.deployments.SetTransform(slimWorkload)
	_ = w.statefulSets.SetTransform(slimWorkload)
	_ = w.hpas.SetTransform(slimHPA)
	return w
}

func (w workloads) informers() []cache.SharedIndexInformer {
	return []cache.SharedIndexInformer{w.deployments, w.statefulSets, w.hpas}
}

// slimWorkload keeps of a Deployment or StatefulSet its identity, replica
// count and pod template labels.
func slimWorkload(obj any) (any, error) {
	meta := func(m metav1.ObjectMeta) metav1.ObjectMeta {
		return metav1.ObjectMeta{Name: m.Name, Namespace: m.Namespace, UID: m.UID, ResourceVersion: m.ResourceVersion}
	}
	template := func(t corev1.PodTemplateSpec) corev1.PodTemplateSpec {
		return corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: t.Labels}}
	}
	switch o := obj.(type) {
	case *appsv1.Deployment:
		return &appsv1.Deployment{ObjectMeta: meta(o.ObjectMeta),
			Spec: appsv1.DeploymentSpec{Replicas: o.Spec.Replicas, Template: template(o.Spec.Template)}}, nil
	case *appsv1.StatefulSet:
		return &appsv1.StatefulSet{ObjectMeta: meta(o.ObjectMeta),
			Spec: appsv1.StatefulSetSpec{Replicas: o.Spec.Replicas, Template: template(o.Spec.Template)}}, nil
	}
	return obj, nil // a tombstone, passed through
}

// slimHPA keeps of an HPA its target and conditions.
func slimHPA(obj any) (any, error) {
	hpa, ok := obj.(*autoscalingv2.HorizontalPodAutoscaler)
	if !ok {
		return obj, nil
	}
	return &autoscalingv2.HorizontalPodAutoscaler{
		ObjectMeta: metav1.ObjectMeta{Name: hpa.Name, Namespace: hpa.Namespace, UID: hpa.UID, ResourceVersion: hpa.ResourceVersion},
		Spec:       autoscalingv2.HorizontalPodAutoscalerSpec{ScaleTargetRef: hpa.Spec.ScaleTargetRef},
		Status:     autoscalingv2.HorizontalPodAutoscalerStatus{Conditions: hpa.Status.Conditions},
	}, nil
}

// workload is what a Deployment or StatefulSet says about its model.
type workload struct {
	kind, namespace, name string
	model                 string
	replicas              int32
}

func asWorkload(obj any) (workload, bool) {
	switch o := obj.(type) {
	case *appsv1.Deployment:
		return workload{"Deployment", o.Namespace, o.Name, modelserver.Model(o.Spec.Template.Labels), replicasOf(o.Spec.Replicas)}, true
	case *appsv1.StatefulSet:
		return workload{"StatefulSet", o.Namespace, o.Name, modelserver.Model(o.Spec.Template.Labels), replicasOf(o.Spec.Replicas)}, true
	}
	return workload{}, false
}

// replicasOf is the API's default of one replica for an unset count.
func replicasOf(n *int32) int32 {
	if n == nil {
		return 1
	}
	return *n
}

func (w workloads) ofModel(ns, model string) []workload {
	var out []workload
	for _, informer := range []cache.SharedIndexInformer{w.deployments, w.statefulSets} {
		objs, _ := informer.GetIndexer().ByIndex(modelIndex, ns+"/"+model)
		for _, o := range objs {
			if wl, ok := asWorkload(o); ok {
				out = append(out, wl)
			}
		}
	}
	return out
}

// hpaOf returns the HPA in the workload's namespace that scales it.
func (w workloads) hpaOf(wl workload) *autoscalingv2.HorizontalPodAutoscaler {
	objs, _ := w.hpas.GetIndexer().ByIndex(cache.NamespaceIndex, wl.namespace)
	for _, o := range objs {
		hpa, ok := o.(*autoscalingv2.HorizontalPodAutoscaler)
		if !ok {
			continue
		}
		ref := hpa.Spec.ScaleTargetRef
		if ref.Kind == wl.kind && ref.Name == wl.name && strings.HasPrefix(ref.APIVersion, appsv1.GroupName+"/") {
			return hpa
		}
	}
	return nil
}

// atZero says why a model with no pod in namespaces has none, and whether
// one is coming back: off is true when every Deployment and StatefulSet of
// the model is scaled to zero and nothing will scale it up, either because
// no HPA scales it or because its HPA has scaling disabled (an HPA scales up
// from zero only when it set the zero itself: a zero set by hand means off).
func (p *Pods) atZero(model string, namespaces []string) (why string, off bool) {
	var stopped []string
	for _, ns := range namespaces {
		w, ok := inNamespace(p.workloads, ns)
		if !ok {
			continue
		}
		for _, wl := range w.ofModel(ns, model) {
			ref := fmt.Sprintf("%s %s/%s", wl.kind, wl.namespace, wl.name)
			if wl.replicas > 0 {
				return fmt.Sprintf("no replica exists yet (%s asks for %d)", ref, wl.replicas), false
			}
			hpa := w.hpaOf(wl)
			if hpa == nil {
				stopped = append(stopped, ref+" is scaled to 0 and no HPA scales it")
				continue
			}
			active := hpaCondition(hpa, autoscalingv2.ScalingActive)
			if active != nil && active.Status == corev1.ConditionFalse && active.Reason == "ScalingDisabled" {
				stopped = append(stopped, fmt.Sprintf("%s is scaled to 0 and scaling is disabled (HPA %s: ScalingActive=False, ScalingDisabled: an HPA scales up only from a zero it set itself)", ref, hpa.Name))
				continue
			}
			if z := hpaCondition(hpa, autoscalingv2.ScaledToZero); z != nil && z.Status == corev1.ConditionTrue {
				return fmt.Sprintf("no replica exists: HPA %s/%s scaled %s to zero and scales it up on demand", hpa.Namespace, hpa.Name, ref), false
			}
			return fmt.Sprintf("no replica exists: %s is at 0 replicas and HPA %s/%s scales it", ref, hpa.Namespace, hpa.Name), false
		}
	}
	if len(stopped) == 0 {
		return "no replica exists (no Deployment or StatefulSet of the model is in view)", false
	}
	return "the model is switched off: " + strings.Join(stopped, "; ") + "; scale it to at least 1 replica to turn it back on", true
}

func hpaCondition(hpa *autoscalingv2.HorizontalPodAutoscaler, t autoscalingv2.HorizontalPodAutoscalerConditionType) *autoscalingv2.HorizontalPodAutoscalerCondition {
	for i := range hpa.Status.Conditions {
		if hpa.Status.Conditions[i].Type == t {
			return &hpa.Status.Conditions[i]
		}
	}
	return nil
}
