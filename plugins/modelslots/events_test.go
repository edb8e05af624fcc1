package modelslots

import (
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	v1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2/ktesting"
	fwk "k8s.io/kube-scheduler/framework"
	st "k8s.io/kubernetes/pkg/scheduler/testing"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/plugins/apis/config"
)

func TestEventsToRegister(t *testing.T) {
	tests := []struct {
		name string
		args *config.ModelSlotsArgs
		want []fwk.ClusterEventWithHint
	}{
		{
			name: "slots from labels",
			args: defaultArgs(),
			want: []fwk.ClusterEventWithHint{
				{Event: fwk.ClusterEvent{Resource: fwk.AssignedPod, ActionType: fwk.Delete}},
				{Event: fwk.ClusterEvent{Resource: fwk.AssignedPod, ActionType: fwk.UpdatePodLabel}},
				{Event: fwk.ClusterEvent{Resource: fwk.Node, ActionType: fwk.Add | fwk.UpdateNodeLabel}},
				{Event: fwk.ClusterEvent{Resource: fwk.TargetPod, ActionType: fwk.Update}},
			},
		},
		{
			name: "slots also from a resource",
			args: &config.ModelSlotsArgs{NodeSlotsLabel: NodeSlotsLabel, ScoringStrategy: config.Pack, SlotResource: &config.SlotResource{Name: "nvidia.com/gpu", PerSlot: 1}},
			want: []fwk.ClusterEventWithHint{
				{Event: fwk.ClusterEvent{Resource: fwk.AssignedPod, ActionType: fwk.Delete}},
				{Event: fwk.ClusterEvent{Resource: fwk.AssignedPod, ActionType: fwk.UpdatePodLabel}},
				{Event: fwk.ClusterEvent{Resource: fwk.Node, ActionType: fwk.Add | fwk.UpdateNodeLabel}},
				{Event: fwk.ClusterEvent{Resource: fwk.TargetPod, ActionType: fwk.Update}},
				{Event: fwk.ClusterEvent{Resource: fwk.Node, ActionType: fwk.UpdateNodeAllocatable}},
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, ctx := ktesting.NewTestContext(t)
			pl, _ := setup(t, tc.args, nil, nil)
			got, err := pl.EventsToRegister(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for i := range got {
				if got[i].QueueingHintFn == nil {
					t.Errorf("event %s has no queueing hint", got[i].Event.Label())
				}
				// Functions cannot be compared.
				got[i].QueueingHintFn = nil
			}
			if diff := cmp.Diff(tc.want, got, cmpopts.EquateComparable(fwk.ClusterEvent{})); diff != "" {
				t.Errorf("EventsToRegister (-want +got):\n%s", diff)
			}
		})
	}
}

func Test_isSchedulableAfterAssignedPodDeleted(t *testing.T) {
	pod := modelPod("p", "llama", "").Obj()
	tests := map[string]struct {
		deleted any
		want    fwk.QueueingHint
		wantErr bool
	}{
		"queue-on-model-server-deleted": {
			deleted: modelPod("a", "mistral", "n1").Obj(), want: fwk.Queue,
		},
		"queue-on-model-server-deleted-seen-late": {
			deleted: cache.DeletedFinalStateUnknown{Key: "ns/a", Obj: modelPod("a", "llama", "n1").Obj()}, want: fwk.Queue,
		},
		"skip-queue-on-other-pod-deleted": {
			deleted: st.MakePod().Namespace("ns").Name("web").Node("n1").Obj(), want: fwk.QueueSkip,
		},
		"skip-queue-on-unplaced-model-server-deleted": {
			deleted: modelPod("a", "llama", "").Obj(), want: fwk.QueueSkip,
		},
		"queue-on-wrong-object": {
			deleted: st.MakeNode().Name("n1").Obj(), want: fwk.Queue, wantErr: true,
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			logger, _ := ktesting.NewTestContext(t)
			pl, _ := setup(t, defaultArgs(), nil, nil)
			got, err := pl.isSchedulableAfterAssignedPodDeleted(logger, pod, tc.deleted, nil)
			if (err != nil) != tc.wantErr {
				t.Fatalf("error = %v, want error: %v", err, tc.wantErr)
			}
			if got != tc.want {
				t.Errorf("hint = %v, want %v", got, tc.want)
			}
		})
	}
}

func Test_isSchedulableAfterAssignedPodLabelUpdated(t *testing.T) {
	pod := modelPod("p", "llama", "").Obj()
	relabel := func(from, to string) (*v1.Pod, *v1.Pod) {
		oldPod := modelPod("a", from, "n1").Obj()
		newPod := oldPod.DeepCopy()
		newPod.Labels[modelserver.ModelLabel] = to
		if to == "" {
			delete(newPod.Labels, modelserver.ModelLabel)
		}
		if from == "" {
			delete(oldPod.Labels, modelserver.ModelLabel)
		}
		return oldPod, newPod
	}
	tests := map[string]struct {
		from, to  string
		namespace string // of the relabelled pod, default "ns"
		want      fwk.QueueingHint
	}{
		"queue-on-model-label-removed":                  {from: "mistral", to: "", want: fwk.Queue},
		"queue-on-replica-of-same-model-relabelled":     {from: "llama", to: "mistral", want: fwk.Queue},
		"skip-queue-on-other-model-relabelled":          {from: "mistral", to: "qwen", want: fwk.QueueSkip},
		"skip-queue-on-model-label-added":               {from: "", to: "llama", want: fwk.QueueSkip},
		"skip-queue-on-model-label-unchanged":           {from: "llama", to: "llama", want: fwk.QueueSkip},
		"skip-queue-on-labels-of-other-pod-unchanged":   {from: "", to: "", want: fwk.QueueSkip},
		"skip-queue-on-same-model-in-another-namespace": {from: "llama", to: "qwen", namespace: "other", want: fwk.QueueSkip},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			logger, _ := ktesting.NewTestContext(t)
			pl, _ := setup(t, defaultArgs(), nil, nil)
			oldPod, newPod := relabel(tc.from, tc.to)
			if tc.namespace != "" {
				oldPod.Namespace, newPod.Namespace = tc.namespace, tc.namespace
			}
			got, err := pl.isSchedulableAfterAssignedPodLabelUpdated(logger, pod, oldPod, newPod)
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Errorf("hint = %v, want %v", got, tc.want)
			}
		})
	}
}

func Test_isSchedulableAfterNodeChange(t *testing.T) {
	gpuArgs := &config.ModelSlotsArgs{NodeSlotsLabel: NodeSlotsLabel, ScoringStrategy: config.Pack, SlotResource: &config.SlotResource{Name: "nvidia.com/gpu", PerSlot: 1}}
	pod := modelPod("p", "llama", "").Obj()
	twoSlotPod := modelPod("p", "llama", "").Annotation(SlotsAnnotation, "2").Obj()
	a100Pod := modelPod("p", "llama", "").NodeSelector(map[string]string{"pool": "a100"}).Obj()
	tests := map[string]struct {
		args             *config.ModelSlotsArgs
		pod              *v1.Pod
		oldNode, newNode any
		want             fwk.QueueingHint
		wantErr          bool
	}{
		"queue-on-node-added-with-slots": {
			pod: pod, newNode: slotNode("n", "1"), want: fwk.Queue,
		},
		"skip-queue-on-node-added-without-slots": {
			pod: pod, newNode: slotNode("n", ""), want: fwk.QueueSkip,
		},
		"skip-queue-on-node-added-with-invalid-slots": {
			pod: pod, newNode: slotNode("n", "lots"), want: fwk.QueueSkip,
		},
		"skip-queue-on-node-added-with-fewer-slots-than-needed": {
			pod: twoSlotPod, newNode: slotNode("n", "1"), want: fwk.QueueSkip,
		},
		"skip-queue-on-node-added-outside-the-node-selector": {
			pod: a100Pod, newNode: makeNode("n", "4").Label("pool", "h100").Obj(), want: fwk.QueueSkip,
		},
		"queue-on-node-added-inside-the-node-selector": {
			pod: a100Pod, newNode: makeNode("n", "4").Label("pool", "a100").Obj(), want: fwk.Queue,
		},
		"queue-on-node-added-with-default-slots": {
			args: &config.ModelSlotsArgs{NodeSlotsLabel: NodeSlotsLabel, DefaultNodeSlots: 1, ScoringStrategy: config.Pack},
			pod:  pod, newNode: slotNode("n", ""), want: fwk.Queue,
		},
		"queue-on-node-gaining-slots": {
			pod: pod, oldNode: slotNode("n", "1"), newNode: slotNode("n", "2"), want: fwk.Queue,
		},
		"queue-on-node-getting-the-label": {
			pod: pod, oldNode: slotNode("n", ""), newNode: slotNode("n", "2"), want: fwk.Queue,
		},
		"queue-on-invalid-label-fixed": {
			pod: pod, oldNode: slotNode("n", "2x"), newNode: slotNode("n", "2"), want: fwk.Queue,
		},
		"skip-queue-on-node-losing-slots": {
			pod: pod, oldNode: slotNode("n", "4"), newNode: slotNode("n", "2"), want: fwk.QueueSkip,
		},
		"skip-queue-on-other-label-changed": {
			pod: pod, oldNode: slotNode("n", "2"), newNode: makeNode("n", "2").Label("team", "ml").Obj(), want: fwk.QueueSkip,
		},
		"queue-on-node-starting-to-match-the-node-selector": {
			pod: a100Pod, oldNode: makeNode("n", "2").Obj(), newNode: makeNode("n", "2").Label("pool", "a100").Obj(), want: fwk.Queue,
		},
		"queue-on-gpus-added": {
			args: gpuArgs, pod: pod, oldNode: gpuNode("n", "", "1"), newNode: gpuNode("n", "", "2"), want: fwk.Queue,
		},
		"skip-queue-on-gpus-unchanged": {
			args: gpuArgs, pod: pod, oldNode: gpuNode("n", "", "2"), newNode: gpuNode("n", "", "2"), want: fwk.QueueSkip,
		},
		"skip-queue-on-node-change-for-pod-with-invalid-annotation": {
			pod: modelPod("p", "llama", "").Annotation(SlotsAnnotation, "0").Obj(), newNode: slotNode("n", "8"), want: fwk.QueueSkip,
		},
		"queue-on-wrong-object": {
			pod: pod, newNode: st.MakePod().Obj(), want: fwk.Queue, wantErr: true,
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			logger, _ := ktesting.NewTestContext(t)
			args := tc.args
			if args == nil {
				args = defaultArgs()
			}
			pl, _ := setup(t, args, nil, nil)
			got, err := pl.isSchedulableAfterNodeChange(logger, tc.pod, tc.oldNode, tc.newNode)
			if (err != nil) != tc.wantErr {
				t.Fatalf("error = %v, want error: %v", err, tc.wantErr)
			}
			if got != tc.want {
				t.Errorf("hint = %v, want %v", got, tc.want)
			}
		})
	}
}

func Test_isSchedulableAfterTargetPodUpdated(t *testing.T) {
	base := func() *st.PodWrapper { return modelPod("p", "llama", "") }
	tests := map[string]struct {
		oldPod, newPod *v1.Pod
		want           fwk.QueueingHint
	}{
		"queue-on-model-label-removed": {
			oldPod: base().Obj(), newPod: st.MakePod().Namespace("ns").Name("p").Obj(), want: fwk.Queue,
		},
		"queue-on-fewer-slots": {
			oldPod: base().Annotation(SlotsAnnotation, "2").Obj(), newPod: base().Obj(), want: fwk.Queue,
		},
		"queue-on-invalid-annotation-fixed": {
			oldPod: base().Annotation(SlotsAnnotation, "two").Obj(), newPod: base().Annotation(SlotsAnnotation, "2").Obj(), want: fwk.Queue,
		},
		"queue-on-cap-raised": {
			oldPod: base().Annotation(MaxPerNodeAnnotation, "1").Obj(), newPod: base().Annotation(MaxPerNodeAnnotation, "2").Obj(), want: fwk.Queue,
		},
		"queue-on-cap-lifted": {
			oldPod: base().Annotation(MaxPerNodeAnnotation, "1").Obj(), newPod: base().Obj(), want: fwk.Queue,
		},
		"queue-on-other-model": {
			oldPod: base().Obj(), newPod: modelPod("p", "mistral", "").Obj(), want: fwk.Queue,
		},
		"skip-queue-on-more-slots": {
			oldPod: base().Obj(), newPod: base().Annotation(SlotsAnnotation, "2").Obj(), want: fwk.QueueSkip,
		},
		"skip-queue-on-cap-added": {
			oldPod: base().Obj(), newPod: base().Annotation(MaxPerNodeAnnotation, "1").Obj(), want: fwk.QueueSkip,
		},
		"skip-queue-on-annotation-still-invalid": {
			oldPod: base().Annotation(SlotsAnnotation, "two").Obj(), newPod: base().Annotation(SlotsAnnotation, "zwei").Obj(), want: fwk.QueueSkip,
		},
		"skip-queue-on-unrelated-change": {
			oldPod: base().Obj(), newPod: base().Label("team", "ml").Annotation("note", "x").Obj(), want: fwk.QueueSkip,
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			logger, _ := ktesting.NewTestContext(t)
			pl, _ := setup(t, defaultArgs(), nil, nil)
			got, err := pl.isSchedulableAfterTargetPodUpdated(logger, tc.newPod, tc.oldPod, tc.newPod)
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Errorf("hint = %v, want %v", got, tc.want)
			}
		})
	}
	t.Run("queue-on-wrong-object", func(t *testing.T) {
		logger, _ := ktesting.NewTestContext(t)
		pl, _ := setup(t, defaultArgs(), nil, nil)
		got, err := pl.isSchedulableAfterTargetPodUpdated(logger, base().Obj(), slotNode("n", "1"), base().Obj())
		if err == nil || got != fwk.Queue {
			t.Errorf("hint = %v, %v; want Queue and an error", got, err)
		}
	})
}
