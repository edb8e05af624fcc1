package app

import (
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/record"

	"github.com/capstan-dev/capstan/router/route"
)

// serviceEvents puts Events on model Services, where the team that owns one
// looks first: a refused claim on a model, an invalid adapter declaration
// and, from the leader, what loading its adapters does. Every replica
// records the first two; the API server's event aggregation counts repeats
// instead of multiplying them.
type serviceEvents struct {
	client      kubernetes.Interface
	broadcaster record.EventBroadcaster
	recorder    record.EventRecorder
}

func newServiceEvents(client kubernetes.Interface) *serviceEvents {
	b := record.NewBroadcaster()
	return &serviceEvents{client: client, broadcaster: b, recorder: b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: userAgent})}
}

// start sends recorded Events to the API server until stop.
func (e *serviceEvents) start() {
	e.broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: e.client.CoreV1().Events("")})
}

func (e *serviceEvents) stop() { e.broadcaster.Shutdown() }

// ClaimRefused implements route.Recorder; recording does not block.
func (e *serviceEvents) ClaimRefused(model string, c route.RefusedClaim) {
	e.recorder.Event(serviceRef(c.Service, c.UID), corev1.EventTypeWarning, "ModelClaimRefused", c.Reason(model))
}

// AdaptersInvalid implements route.Recorder.
func (e *serviceEvents) AdaptersInvalid(svc types.NamespacedName, uid types.UID, err error) {
	e.recorder.Event(serviceRef(svc, uid), corev1.EventTypeWarning, "InvalidLoRAAdapters", err.Error()+"; no adapter of this Service is loaded")
}

// Eventf records an Event on a Service; for the adapter loader.
func (e *serviceEvents) Eventf(svc types.NamespacedName, uid types.UID, eventType, reason, format string, args ...any) {
	e.recorder.Eventf(serviceRef(svc, uid), eventType, reason, format, args...)
}

func serviceRef(svc types.NamespacedName, uid types.UID) *corev1.ObjectReference {
	return &corev1.ObjectReference{APIVersion: "v1", Kind: "Service", Namespace: svc.Namespace, Name: svc.Name, UID: uid}
}
