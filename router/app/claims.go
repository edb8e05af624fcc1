package app

import (
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/record"

	"github.com/capstan-dev/capstan/router/route"
)

// claimEvents puts a Warning Event on every Service whose claim on a model
// is refused, where the team that made it looks first. Every replica
// records; the API server's event aggregation counts repeats instead of
// multiplying them.
type claimEvents struct {
	client      kubernetes.Interface
	broadcaster record.EventBroadcaster
	recorder    record.EventRecorder
}

func newClaimEvents(client kubernetes.Interface) *claimEvents {
	b := record.NewBroadcaster()
	return &claimEvents{client: client, broadcaster: b, recorder: b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: userAgent})}
}

// start sends recorded Events to the API server until stop.
func (e *claimEvents) start() {
	e.broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: e.client.CoreV1().Events("")})
}

func (e *claimEvents) stop() { e.broadcaster.Shutdown() }

// ClaimRefused implements route.ClaimRecorder; recording does not block.
func (e *claimEvents) ClaimRefused(model string, c route.RefusedClaim) {
	ref := &corev1.ObjectReference{APIVersion: "v1", Kind: "Service", Namespace: c.Service.Namespace, Name: c.Service.Name, UID: c.UID}
	e.recorder.Event(ref, corev1.EventTypeWarning, "ModelClaimRefused", c.Reason(model))
}
