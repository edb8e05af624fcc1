// Package targets keeps a scraper's targets in step with the model-server
// pods an informer sees: a pod is a target exactly while it may be scraped
// (Ready, with a pod IP, not being deleted; see modelserver.Scrapable), so
// Pending, unready and terminating pods are never contacted, and a pod that
// stops being Ready is dropped at once, samples and all.
package targets

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/metricsadapter/scrape"
)

// Scraper is the part of *scrape.Scraper the handler drives.
type Scraper interface {
	Upsert(scrape.Target)
	Remove(types.NamespacedName)
}

var _ Scraper = &scrape.Scraper{}

// NewPodInformer returns an informer over the pods labelled
// capstan.dev/model only, in namespace ("" for all): other pods are not
// model servers, and the adapter neither needs nor caches them. Cached pods
// keep only what scraping and selecting them needs (see Slim).
func NewPodInformer(client kubernetes.Interface, namespace string) cache.SharedIndexInformer {
	informer := coreinformers.NewFilteredPodInformer(client, namespace, 0,
		cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc},
		func(o *metav1.ListOptions) { o.LabelSelector = modelserver.ModelLabel })
	// Only fails once the informer has started.
	_ = informer.SetTransform(Slim)
	return informer
}

// Slim is the informer's transform: of a pod it keeps the metadata that
// identifies and selects it, its containers' ports, and its IP, phase and
// conditions; managed fields, the rest of the spec and status go. For a
// fleet of thousands of pods this is most of the cache.
func Slim(obj any) (any, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil // a tombstone, passed through
	}
	slim := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: pod.Name, Namespace: pod.Namespace, UID: pod.UID, ResourceVersion: pod.ResourceVersion,
			Labels: pod.Labels, Annotations: pod.Annotations, DeletionTimestamp: pod.DeletionTimestamp,
		},
		Status: corev1.PodStatus{Phase: pod.Status.Phase, PodIP: pod.Status.PodIP, Conditions: pod.Status.Conditions},
	}
	for _, c := range pod.Spec.Containers {
		slim.Spec.Containers = append(slim.Spec.Containers, corev1.Container{Name: c.Name, Ports: c.Ports})
	}
	return slim, nil
}

// AddEventHandler makes the informer's pod events set s's targets.
func AddEventHandler(logger klog.Logger, informer cache.SharedIndexInformer, s Scraper) error {
	h := handler{logger: logger.WithValues("component", "targets"), scraper: s}
	_, err := informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    h.update,
		UpdateFunc: func(_, obj any) { h.update(obj) },
		DeleteFunc: h.delete,
	})
	return err
}

type handler struct {
	logger  klog.Logger
	scraper Scraper
}

func (h handler) update(obj any) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	key := types.NamespacedName{Namespace: pod.Namespace, Name: pod.Name}
	if !modelserver.Scrapable(pod) {
		h.logger.V(5).Info("Not scraping pod", "pod", klog.KObj(pod), "ready", modelserver.IsReady(pod),
			"podIP", pod.Status.PodIP, "deleting", pod.DeletionTimestamp != nil)
		h.scraper.Remove(key)
		return
	}
	t, err := scrape.TargetForPod(pod)
	if err != nil {
		h.logger.V(2).Info("Cannot scrape pod", "pod", klog.KObj(pod), "err", err)
		h.scraper.Remove(key)
		return
	}
	h.scraper.Upsert(t)
}

func (h handler) delete(obj any) {
	if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = tomb.Obj
	}
	if pod, ok := obj.(*corev1.Pod); ok {
		h.scraper.Remove(types.NamespacedName{Namespace: pod.Namespace, Name: pod.Name})
	}
}
