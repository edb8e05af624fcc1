package modelslots

import (
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	v1 "k8s.io/api/core/v1"
	st "k8s.io/kubernetes/pkg/scheduler/testing"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/plugins/apis/config"
)

func TestNodeSlots(t *testing.T) {
	gpu := &config.ModelSlotsArgs{NodeSlotsLabel: NodeSlotsLabel, DefaultNodeSlots: 1, SlotResource: &config.SlotResource{Name: "nvidia.com/gpu", PerSlot: 2}}
	const restrictedLabel = "node-restriction.kubernetes.io/capstan-model-slots"
	restricted := &config.ModelSlotsArgs{NodeSlotsLabel: restrictedLabel, DefaultNodeSlots: 1}
	tests := []struct {
		name        string
		args        *config.ModelSlotsArgs
		node        *v1.Node
		want        int64
		wantInvalid bool
	}{
		{name: "label", args: &config.ModelSlotsArgs{NodeSlotsLabel: NodeSlotsLabel}, node: slotNode("n", "3"), want: 3},
		{name: "zero label", args: &config.ModelSlotsArgs{NodeSlotsLabel: NodeSlotsLabel, DefaultNodeSlots: 5}, node: slotNode("n", "0"), want: 0},
		{name: "no label and no default holds none", args: &config.ModelSlotsArgs{NodeSlotsLabel: NodeSlotsLabel}, node: slotNode("n", ""), want: 0},
		{name: "no label takes the default", args: &config.ModelSlotsArgs{NodeSlotsLabel: NodeSlotsLabel, DefaultNodeSlots: 2}, node: slotNode("n", ""), want: 2},
		{name: "negative label is invalid", args: &config.ModelSlotsArgs{NodeSlotsLabel: NodeSlotsLabel, DefaultNodeSlots: 2}, node: slotNode("n", "-1"), wantInvalid: true},
		{name: "word label is invalid", args: &config.ModelSlotsArgs{NodeSlotsLabel: NodeSlotsLabel}, node: slotNode("n", "four"), wantInvalid: true},
		{name: "huge label is invalid", args: &config.ModelSlotsArgs{NodeSlotsLabel: NodeSlotsLabel}, node: slotNode("n", "99999999999"), wantInvalid: true},
		{name: "configured label", args: restricted, node: makeNode("n", "").Label(restrictedLabel, "4").Obj(), want: 4},
		{name: "configured label ignores the default label", args: restricted, node: slotNode("n", "3"), want: 1},
		{name: "configured label wins over the default label", args: restricted, node: makeNode("n", "3").Label(restrictedLabel, "2").Obj(), want: 2},
		{name: "invalid configured label", args: restricted, node: makeNode("n", "3").Label(restrictedLabel, "x").Obj(), wantInvalid: true},
		{name: "slots from the resource, rounded down", args: gpu, node: gpuNode("n", "", "7"), want: 3},
		{name: "label wins over the resource", args: gpu, node: gpuNode("n", "8", "2"), want: 8},
		{name: "node without the resource takes the default", args: gpu, node: slotNode("n", ""), want: 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := NewCapacity(tc.args).NodeSlots(tc.node)
			if tc.wantInvalid != errors.Is(err, errInvalidNodeSlots) {
				t.Fatalf("NodeSlots error = %v, want invalid: %v", err, tc.wantInvalid)
			}
			if got != tc.want {
				t.Errorf("NodeSlots = %d, want %d", got, tc.want)
			}
			if err != nil && !strings.Contains(err.Error(), tc.args.NodeSlotsLabel+"=") {
				t.Errorf("NodeSlots error %q does not name the label %s", err, tc.args.NodeSlotsLabel)
			}
		})
	}
}

func TestPodDemand(t *testing.T) {
	llama := ModelKey{Namespace: "ns", Model: "llama"}
	tests := []struct {
		name              string
		pod               *v1.Pod
		defaultMaxPerNode int64
		want              Demand
		wantModelServer   bool
		wantErr           string
	}{
		{name: "no model label", pod: st.MakePod().Namespace("ns").Name("p").Obj()},
		{name: "empty model label", pod: st.MakePod().Namespace("ns").Name("p").Label(modelserver.ModelLabel, "").Obj()},
		{
			name: "model server with defaults", pod: modelPod("p", "llama", "").Obj(),
			want: Demand{Key: llama, Slots: 1}, wantModelServer: true,
		},
		{
			name: "default cap from the args", pod: modelPod("p", "llama", "").Obj(), defaultMaxPerNode: 2,
			want: Demand{Key: llama, Slots: 1, MaxPerNode: 2}, wantModelServer: true,
		},
		{
			name: "annotations", defaultMaxPerNode: 2,
			pod:  modelPod("p", "llama", "").Annotation(SlotsAnnotation, "4").Annotation(MaxPerNodeAnnotation, "1").Obj(),
			want: Demand{Key: llama, Slots: 4, MaxPerNode: 1}, wantModelServer: true,
		},
		{
			name: "annotation lifts the args' cap", defaultMaxPerNode: 2,
			pod:  modelPod("p", "llama", "").Annotation(MaxPerNodeAnnotation, "0").Obj(),
			want: Demand{Key: llama, Slots: 1}, wantModelServer: true,
		},
		{
			name: "zero slots", pod: modelPod("p", "llama", "").Annotation(SlotsAnnotation, "0").Obj(), wantModelServer: true,
			wantErr: `pod annotation capstan.dev/slots="0" is invalid: must be an integer from 1 to 1048576`,
		},
		{
			name: "garbage slots", pod: modelPod("p", "llama", "").Annotation(SlotsAnnotation, "two").Obj(), wantModelServer: true,
			wantErr: `pod annotation capstan.dev/slots="two" is invalid: must be an integer from 1 to 1048576`,
		},
		{
			name: "negative cap", pod: modelPod("p", "llama", "").Annotation(MaxPerNodeAnnotation, "-1").Obj(), wantModelServer: true,
			wantErr: `pod annotation capstan.dev/max-per-node="-1" is invalid: must be an integer from 0 to 1048576`,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, isModelServer, err := PodDemand(tc.pod, tc.defaultMaxPerNode)
			var gotErr string
			if err != nil {
				gotErr = err.Error()
			}
			if gotErr != tc.wantErr || isModelServer != tc.wantModelServer {
				t.Fatalf("PodDemand = _, %v, %q; want _, %v, %q", isModelServer, gotErr, tc.wantModelServer, tc.wantErr)
			}
			if err != nil {
				return
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("PodDemand (-want +got):\n%s", diff)
			}
		})
	}
}

func TestPodSlots(t *testing.T) {
	for value, want := range map[string]int64{"": 1, "3": 3, "0": 1, "x": 1} {
		p := modelPod("p", "m", "n")
		if value != "" {
			p.Annotation(SlotsAnnotation, value)
		}
		if got := podSlots(p.Obj()); got != want {
			t.Errorf("podSlots with %s=%q = %d, want %d (a placed pod holds at least one slot)", SlotsAnnotation, value, got, want)
		}
	}
}

// slotNode is a node with the NodeSlotsLabel (none when slots is "").
func slotNode(name, slots string) *v1.Node {
	return makeNode(name, slots).Obj()
}

// gpuNode is a slotNode with gpus nvidia.com/gpu allocatable.
func gpuNode(name, slots, gpus string) *v1.Node {
	return makeNode(name, slots).Capacity(map[v1.ResourceName]string{"nvidia.com/gpu": gpus}).Obj()
}

func makeNode(name, slots string) *st.NodeWrapper {
	n := st.MakeNode().Name(name).Label(v1.LabelHostname, name)
	if slots != "" {
		n.Label(NodeSlotsLabel, slots)
	}
	return n
}

// modelPod is a model server of model in namespace "ns", bound to node unless
// node is "".
func modelPod(name, model, node string) *st.PodWrapper {
	p := st.MakePod().Namespace("ns").Name(name).UID(name).Label(modelserver.ModelLabel, model)
	if node != "" {
		p.Node(node)
	}
	return p
}
