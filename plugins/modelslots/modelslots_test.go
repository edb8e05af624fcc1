package modelslots

import (
	"context"
	"fmt"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/klog/v2/ktesting"
	fwk "k8s.io/kube-scheduler/framework"
	schedconfig "k8s.io/kubernetes/pkg/scheduler/apis/config"
	"k8s.io/kubernetes/pkg/scheduler/backend/cache"
	"k8s.io/kubernetes/pkg/scheduler/framework"
	"k8s.io/kubernetes/pkg/scheduler/framework/plugins/defaultbinder"
	"k8s.io/kubernetes/pkg/scheduler/framework/plugins/queuesort"
	plugintesting "k8s.io/kubernetes/pkg/scheduler/framework/plugins/testing"
	frameworkruntime "k8s.io/kubernetes/pkg/scheduler/framework/runtime"
	"k8s.io/kubernetes/pkg/scheduler/metrics"
	st "k8s.io/kubernetes/pkg/scheduler/testing"
	tf "k8s.io/kubernetes/pkg/scheduler/testing/framework"

	"github.com/capstan-dev/capstan/plugins/apis/config"
	// The framework helpers decode default args through the scheme.
	_ "github.com/capstan-dev/capstan/plugins/apis/config/scheme"
)

func defaultArgs() *config.ModelSlotsArgs {
	return &config.ModelSlotsArgs{NodeSlotsLabel: NodeSlotsLabel, ScoringStrategy: config.Pack}
}

// setup builds the plugin over a snapshot of nodes and the pods on them.
func setup(t testing.TB, args *config.ModelSlotsArgs, nodes []*v1.Node, pods []*v1.Pod) (*ModelSlots, []fwk.NodeInfo) {
	t.Helper()
	_, ctx := ktesting.NewTestContext(t)
	snapshot := cache.NewSnapshot(pods, nodes)
	pl := plugintesting.SetupPlugin(ctx, t, New, args, snapshot).(*ModelSlots)
	nodeInfos, err := snapshot.NodeInfos().List()
	if err != nil {
		t.Fatal(err)
	}
	return pl, nodeInfos
}

func TestNew(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	tests := []struct {
		name    string
		args    runtime.Object
		wantErr string
	}{
		{name: "defaulted args", args: defaultArgs()},
		{name: "no args", args: nil, wantErr: "want args to be of type ModelSlotsArgs, got <nil>"},
		{name: "another plugin's args", args: &schedconfig.NodeResourcesFitArgs{},
			wantErr: "want args to be of type ModelSlotsArgs, got *config.NodeResourcesFitArgs"},
		{name: "invalid args", args: &config.ModelSlotsArgs{NodeSlotsLabel: NodeSlotsLabel, DefaultNodeSlots: -1, ScoringStrategy: config.Spread},
			wantErr: "invalid ModelSlots args: defaultNodeSlots: Invalid value: -1: must be greater than or equal to 0"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(ctx, tc.args, nil)
			var got string
			if err != nil {
				got = err.Error()
			}
			if got != tc.wantErr {
				t.Errorf("New error = %q, want %q", got, tc.wantErr)
			}
		})
	}
}

func TestPreFilter(t *testing.T) {
	twoNodes := []*v1.Node{slotNode("n1", "2"), slotNode("n2", "2")}
	unresolvable := func(msg string) *fwk.Status { return fwk.NewStatus(fwk.UnschedulableAndUnresolvable, msg) }
	tests := []struct {
		name      string
		args      *config.ModelSlotsArgs
		nodes     []*v1.Node
		pods      []*v1.Pod
		pod       *v1.Pod
		want      *fwk.Status
		wantState bool
	}{
		{
			name:  "pod without the model label is skipped",
			nodes: twoNodes, pod: st.MakePod().Namespace("ns").Name("web").Obj(),
			want: fwk.NewStatus(fwk.Skip),
		},
		{
			name:  "a node has room",
			nodes: twoNodes, pods: []*v1.Pod{modelPod("a", "llama", "n1").Obj(), modelPod("b", "llama", "n1").Obj()},
			pod: modelPod("p", "llama", "").Obj(), wantState: true,
		},
		{
			name:  "all slots in use",
			nodes: twoNodes,
			pods: []*v1.Pod{modelPod("a", "llama", "n1").Obj(), modelPod("b", "llama", "n1").Obj(),
				modelPod("c", "llama", "n2").Obj(), modelPod("d", "mistral", "n2").Obj()},
			pod:  modelPod("p", "llama", "").Obj(),
			want: unresolvable("model llama: all 4 model slots on 2 nodes are in use"), wantState: true,
		},
		{
			name:  "pods without the model label hold no slots",
			nodes: twoNodes,
			pods: []*v1.Pod{modelPod("a", "llama", "n1").Obj(), modelPod("b", "llama", "n1").Obj(),
				st.MakePod().Namespace("ns").Name("web").Node("n2").Obj()},
			pod: modelPod("p", "llama", "").Obj(), wantState: true,
		},
		{
			name:  "one slot in the whole cluster",
			nodes: []*v1.Node{slotNode("n1", "1"), slotNode("n2", "")}, pods: []*v1.Pod{modelPod("a", "llama", "n1").Obj()},
			pod:  modelPod("p", "llama", "").Obj(),
			want: unresolvable("model llama: the 1 model slot on 1 node is in use"), wantState: true,
		},
		{
			name:  "no node has slots",
			nodes: []*v1.Node{slotNode("n1", ""), slotNode("n2", "0")},
			pod:   modelPod("p", "llama", "").Obj(),
			want:  unresolvable("model llama: no node has model slots (nodes declare them with the capstan.dev/model-slots label)"), wantState: true,
		},
		{
			name:  "invalid node labels are named",
			nodes: []*v1.Node{slotNode("n1", "two"), slotNode("n2", "-2"), slotNode("n3", "")},
			pod:   modelPod("p", "llama", "").Obj(),
			want:  unresolvable("model llama: no node has model slots (2 nodes with an invalid capstan.dev/model-slots label)"), wantState: true,
		},
		{
			name:  "unlabelled nodes take the default from the args",
			args:  &config.ModelSlotsArgs{NodeSlotsLabel: NodeSlotsLabel, DefaultNodeSlots: 1, ScoringStrategy: config.Pack},
			nodes: []*v1.Node{slotNode("n1", "")},
			pod:   modelPod("p", "llama", "").Obj(), wantState: true,
		},
		{
			name:  "unlabelled nodes take slots from GPUs",
			args:  &config.ModelSlotsArgs{NodeSlotsLabel: NodeSlotsLabel, ScoringStrategy: config.Pack, SlotResource: &config.SlotResource{Name: "nvidia.com/gpu", PerSlot: 1}},
			nodes: []*v1.Node{gpuNode("n1", "", "2")},
			pods:  []*v1.Pod{modelPod("a", "llama", "n1").Obj(), modelPod("b", "llama", "n1").Obj()},
			pod:   modelPod("p", "llama", "").Obj(),
			want:  unresolvable("model llama: all 2 model slots on 1 node are in use"), wantState: true,
		},
		{
			name:  "replica larger than any node",
			nodes: twoNodes, pod: modelPod("p", "llama", "").Annotation(SlotsAnnotation, "3").Obj(),
			want: unresolvable("model llama needs 3 model slots per replica, but the largest of 2 nodes has 2"), wantState: true,
		},
		{
			name:  "free slots are scattered",
			nodes: twoNodes, pods: []*v1.Pod{modelPod("a", "llama", "n1").Obj(), modelPod("b", "mistral", "n2").Obj()},
			pod:  modelPod("p", "llama", "").Annotation(SlotsAnnotation, "2").Obj(),
			want: unresolvable("model llama needs 2 model slots per replica, but no node has that many free (2 of 4 model slots on 2 nodes are free)"), wantState: true,
		},
		{
			name:  "every node with room is at the model's cap",
			nodes: twoNodes, pods: []*v1.Pod{modelPod("a", "llama", "n1").Obj(), modelPod("b", "llama", "n2").Obj()},
			pod:  modelPod("p", "llama", "").Annotation(MaxPerNodeAnnotation, "1").Obj(),
			want: unresolvable("model llama: every node with 1 model slot free already runs 1 replica of it, max 1 per node (2 of 4 model slots on 2 nodes are in use)"), wantState: true,
		},
		{
			name:  "cap from the args",
			args:  &config.ModelSlotsArgs{NodeSlotsLabel: NodeSlotsLabel, MaxReplicasPerNode: 1, ScoringStrategy: config.Pack},
			nodes: twoNodes, pods: []*v1.Pod{modelPod("a", "llama", "n1").Obj(), modelPod("b", "llama", "n2").Obj()},
			pod:  modelPod("p", "llama", "").Obj(),
			want: unresolvable("model llama: every node with 1 model slot free already runs 1 replica of it, max 1 per node (2 of 4 model slots on 2 nodes are in use)"), wantState: true,
		},
		{
			name:  "the cap counts the same model in the same namespace only",
			nodes: twoNodes,
			pods: []*v1.Pod{modelPod("a", "llama", "n1").Namespace("other").Obj(), modelPod("b", "mistral", "n2").Obj(),
				modelPod("c", "llama", "n2").Obj()},
			pod: modelPod("p", "llama", "").Annotation(MaxPerNodeAnnotation, "1").Obj(), wantState: true,
		},
		{
			name:  "only nodes matching the node selector count",
			nodes: []*v1.Node{makeNode("n1", "2").Label("pool", "a100").Obj(), makeNode("n2", "2").Label("pool", "h100").Obj()},
			pods:  []*v1.Pod{modelPod("a", "llama", "n1").Obj(), modelPod("b", "llama", "n1").Obj()},
			pod:   modelPod("p", "llama", "").NodeSelector(map[string]string{"pool": "a100"}).Obj(),
			want:  unresolvable("model llama: all 2 model slots on 1 node matching its node selector and affinity are in use"), wantState: true,
		},
		{
			name:  "only nodes matching the required node affinity count",
			nodes: []*v1.Node{makeNode("n1", "2").Label("pool", "a100").Obj(), makeNode("n2", "2").Label("pool", "h100").Obj()},
			pods:  []*v1.Pod{modelPod("a", "llama", "n1").Obj(), modelPod("b", "llama", "n1").Obj()},
			pod:   modelPod("p", "llama", "").NodeAffinityIn("pool", []string{"h100"}, st.NodeSelectorTypeMatchExpressions).Obj(), wantState: true,
		},
		{
			name:  "terminating pods still hold their slots",
			nodes: []*v1.Node{slotNode("n1", "1")}, pods: []*v1.Pod{modelPod("a", "llama", "n1").Terminating().Obj()},
			pod:  modelPod("p", "llama", "").Obj(),
			want: unresolvable("model llama: the 1 model slot on 1 node is in use"), wantState: true,
		},
		{
			name:  "invalid annotation on the pod",
			nodes: twoNodes, pod: modelPod("p", "llama", "").Annotation(SlotsAnnotation, "lots").Obj(),
			want: unresolvable(`pod annotation capstan.dev/slots="lots" is invalid: must be an integer from 1 to 1048576`),
		},
		{
			name:  "preemption may make room for a higher-priority pod",
			nodes: []*v1.Node{slotNode("n1", "1")}, pods: []*v1.Pod{modelPod("a", "llama", "n1").Priority(10).Obj()},
			pod:  modelPod("p", "llama", "").Priority(100).Obj(),
			want: fwk.NewStatus(fwk.Unschedulable, "model llama: the 1 model slot on 1 node is in use"), wantState: true,
		},
		{
			name:  "a pod that never preempts cannot make room",
			nodes: []*v1.Node{slotNode("n1", "1")}, pods: []*v1.Pod{modelPod("a", "llama", "n1").Priority(10).Obj()},
			pod:  modelPod("p", "llama", "").Priority(100).PreemptionPolicy(v1.PreemptNever).Obj(),
			want: unresolvable("model llama: the 1 model slot on 1 node is in use"), wantState: true,
		},
		{
			name:  "equal priority cannot preempt",
			nodes: []*v1.Node{slotNode("n1", "1")}, pods: []*v1.Pod{modelPod("a", "llama", "n1").Priority(100).Obj()},
			pod:  modelPod("p", "llama", "").Priority(100).Obj(),
			want: unresolvable("model llama: the 1 model slot on 1 node is in use"), wantState: true,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			args := tc.args
			if args == nil {
				args = defaultArgs()
			}
			pl, nodeInfos := setup(t, args, tc.nodes, tc.pods)
			state := framework.NewCycleState()
			_, got := pl.PreFilter(context.Background(), state, tc.pod, nodeInfos)
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("PreFilter status (-want +got):\n%s", diff)
			}
			if _, err := getPreFilterState(state); (err == nil) != tc.wantState {
				t.Errorf("PreFilter state present: %v, want %v", err == nil, tc.wantState)
			}
		})
	}
}

func TestFilter(t *testing.T) {
	nodes := []*v1.Node{
		slotNode("none", ""), slotNode("invalid", "many"), slotNode("small", "1"),
		slotNode("full", "2"), slotNode("capped", "4"), slotNode("full-and-capped", "2"), slotNode("room", "4"),
	}
	pods := []*v1.Pod{
		modelPod("f1", "mistral", "full").Obj(), modelPod("f2", "mistral", "full").Obj(),
		modelPod("c1", "llama", "capped").Obj(),
		modelPod("fc1", "llama", "full-and-capped").Annotation(SlotsAnnotation, "2").Obj(),
		modelPod("r1", "llama", "room").Namespace("other").Obj(), modelPod("r2", "mistral", "room").Obj(),
	}
	tests := []struct {
		name string
		pod  *v1.Pod
		want map[string]*fwk.Status
	}{
		{
			name: "one slot, at most one replica per node",
			pod:  modelPod("p", "llama", "").Annotation(MaxPerNodeAnnotation, "1").Obj(),
			want: map[string]*fwk.Status{
				"none":    fwk.NewStatus(fwk.UnschedulableAndUnresolvable, ErrReasonNoSlots),
				"invalid": fwk.NewStatus(fwk.UnschedulableAndUnresolvable, ErrReasonInvalidNodeSlots),
				"full":    fwk.NewStatus(fwk.Unschedulable, "node(s) had 2/2 model slots in use"),
				"capped":  fwk.NewStatus(fwk.Unschedulable, "node(s) already run 1 replica of llama, max 1 per node"),
				"full-and-capped": fwk.NewStatus(fwk.Unschedulable, "node(s) had 2/2 model slots in use",
					"node(s) already run 1 replica of llama, max 1 per node"),
			},
		},
		{
			name: "two slots, no cap",
			pod:  modelPod("p", "llama", "").Annotation(SlotsAnnotation, "2").Obj(),
			want: map[string]*fwk.Status{
				"none":            fwk.NewStatus(fwk.UnschedulableAndUnresolvable, ErrReasonNoSlots),
				"invalid":         fwk.NewStatus(fwk.UnschedulableAndUnresolvable, ErrReasonInvalidNodeSlots),
				"small":           fwk.NewStatus(fwk.UnschedulableAndUnresolvable, "node(s) had 1 model slot, fewer than the 2 the pod needs"),
				"full":            fwk.NewStatus(fwk.Unschedulable, "node(s) had 2/2 model slots in use, the pod needs 2"),
				"full-and-capped": fwk.NewStatus(fwk.Unschedulable, "node(s) had 2/2 model slots in use, the pod needs 2"),
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pl, nodeInfos := setup(t, defaultArgs(), nodes, pods)
			state := framework.NewCycleState()
			if _, s := pl.PreFilter(context.Background(), state, tc.pod, nodeInfos); !s.IsSuccess() {
				t.Fatalf("PreFilter: %v", s)
			}
			got := map[string]*fwk.Status{}
			for _, ni := range nodeInfos {
				if s := pl.Filter(context.Background(), state, tc.pod, ni); !s.IsSuccess() {
					got[ni.Node().Name] = s
				}
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("Filter statuses by node (-want +got):\n%s", diff)
			}
		})
	}
}

func TestFilterWithoutPreFilter(t *testing.T) {
	pl, nodeInfos := setup(t, defaultArgs(), []*v1.Node{slotNode("n1", "1")}, nil)
	got := pl.Filter(context.Background(), framework.NewCycleState(), modelPod("p", "llama", "").Obj(), nodeInfos[0])
	if want := fwk.AsStatus(fwk.ErrNotFound); !got.Equal(want) {
		t.Errorf("Filter without PreFilter state = %v, want %v", got, want)
	}
}

func TestScore(t *testing.T) {
	nodes := []*v1.Node{slotNode("almost-full", "4"), slotNode("empty", "4"), slotNode("big", "8")}
	pods := []*v1.Pod{
		modelPod("a1", "llama", "almost-full").Obj(), modelPod("a2", "llama", "almost-full").Obj(), modelPod("a3", "mistral", "almost-full").Obj(),
		modelPod("b1", "llama", "big").Annotation(SlotsAnnotation, "2").Obj(),
	}
	tests := []struct {
		name     string
		strategy config.ScoringStrategyType
		nodes    []*v1.Node
		want     fwk.NodeScoreList
	}{
		// One slot for the pod leaves 0, 3 and 5 free.
		{name: "pack prefers the fullest node", strategy: config.Pack, nodes: nodes,
			want: fwk.NodeScoreList{{Name: "almost-full", Score: 100}, {Name: "empty", Score: 40}, {Name: "big", Score: 0}}},
		{name: "spread prefers the emptiest node", strategy: config.Spread, nodes: nodes,
			want: fwk.NodeScoreList{{Name: "almost-full", Score: 0}, {Name: "empty", Score: 60}, {Name: "big", Score: 100}}},
		{name: "equal nodes score alike", strategy: config.Pack, nodes: []*v1.Node{slotNode("x", "2"), slotNode("y", "2")},
			want: fwk.NodeScoreList{{Name: "x", Score: 0}, {Name: "y", Score: 0}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var onNodes []*v1.Pod
			for _, p := range pods {
				if slices.Contains(nodeNames(tc.nodes), p.Spec.NodeName) {
					onNodes = append(onNodes, p)
				}
			}
			pl, nodeInfos := setup(t, &config.ModelSlotsArgs{NodeSlotsLabel: NodeSlotsLabel, ScoringStrategy: tc.strategy}, tc.nodes, onNodes)
			pod := modelPod("p", "llama", "").Obj()
			state := framework.NewCycleState()
			if _, s := pl.PreFilter(context.Background(), state, pod, nodeInfos); !s.IsSuccess() {
				t.Fatalf("PreFilter: %v", s)
			}
			if s := pl.PreScore(context.Background(), state, pod, nodeInfos); !s.IsSuccess() {
				t.Fatalf("PreScore: %v", s)
			}
			var got fwk.NodeScoreList
			for _, name := range nodeNames(tc.nodes) {
				ni := nodeInfoNamed(t, nodeInfos, name)
				score, s := pl.Score(context.Background(), state, pod, ni)
				if !s.IsSuccess() {
					t.Fatalf("Score %s: %v", name, s)
				}
				got = append(got, fwk.NodeScore{Name: name, Score: score})
			}
			if s := pl.ScoreExtensions().NormalizeScore(context.Background(), state, pod, got); !s.IsSuccess() {
				t.Fatalf("NormalizeScore: %v", s)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("normalized scores (-want +got):\n%s", diff)
			}
		})
	}
}

// Score works out the pod's demand itself when no PreFilter ran.
func TestScoreWithoutPreFilter(t *testing.T) {
	pl, nodeInfos := setup(t, defaultArgs(), []*v1.Node{slotNode("n1", "4")}, nil)
	got, s := pl.Score(context.Background(), framework.NewCycleState(), modelPod("p", "llama", "").Annotation(SlotsAnnotation, "3").Obj(), nodeInfos[0])
	if !s.IsSuccess() || got != 1 {
		t.Errorf("Score = %d, %v; want 1 free slot left", got, s)
	}
}

// The slots a node has in use follow its NodeInfo, which includes the pods
// the scheduler has assumed but not yet bound: once a pod is assumed onto
// the last slot, the next cycle sees the node full, and when that pod is
// forgotten again the slot is free.
func TestUsageFollowsAssumedPods(t *testing.T) {
	pl, nodeInfos := setup(t, defaultArgs(), []*v1.Node{slotNode("n1", "1")}, nil)
	ni := nodeInfos[0]
	pod := modelPod("p", "llama", "").Obj()
	cycle := func() (*fwk.Status, *fwk.Status) {
		state := framework.NewCycleState()
		_, pre := pl.PreFilter(context.Background(), state, pod, nodeInfos)
		if !pre.IsSuccess() {
			return pre, nil
		}
		return pre, pl.Filter(context.Background(), state, pod, ni)
	}
	if pre, filter := cycle(); !pre.IsSuccess() || !filter.IsSuccess() {
		t.Fatalf("empty node: PreFilter %v, Filter %v; want both to pass", pre, filter)
	}
	assumed := modelPod("assumed", "llama", "n1").Obj()
	ni.AddPodInfo(mustPodInfo(t, assumed))
	if pre, _ := cycle(); pre.Code() != fwk.UnschedulableAndUnresolvable {
		t.Errorf("after assuming a pod onto the only slot: PreFilter %v, want UnschedulableAndUnresolvable", pre)
	}
	if err := ni.RemovePod(ktesting.NewLogger(t, ktesting.NewConfig()), assumed); err != nil {
		t.Fatal(err)
	}
	if pre, filter := cycle(); !pre.IsSuccess() || !filter.IsSuccess() {
		t.Errorf("after forgetting the assumed pod: PreFilter %v, Filter %v; want both to pass", pre, filter)
	}
}

// Preemption filters a copy of a node with its victims removed. The copy's
// usage must reflect the removal without replacing the cached usage of the
// real node.
func TestFilterOnPreemptionCopy(t *testing.T) {
	victim := modelPod("victim", "llama", "n1").Priority(1).Obj()
	pl, nodeInfos := setup(t, defaultArgs(), []*v1.Node{slotNode("n1", "1")}, []*v1.Pod{victim})
	ni := nodeInfos[0]
	pod := modelPod("p", "llama", "").Priority(100).Obj()
	state := framework.NewCycleState()
	if _, s := pl.PreFilter(context.Background(), state, pod, nodeInfos); s.Code() != fwk.Unschedulable {
		t.Fatalf("PreFilter = %v, want Unschedulable so that preemption runs", s)
	}
	copied := ni.Snapshot()
	if err := copied.RemovePod(ktesting.NewLogger(t, ktesting.NewConfig()), victim); err != nil {
		t.Fatal(err)
	}
	if s := pl.Filter(context.Background(), state, pod, copied); !s.IsSuccess() {
		t.Errorf("Filter on the node without its victim = %v, want success", s)
	}
	if s := pl.Filter(context.Background(), state, pod, ni); s.IsSuccess() {
		t.Error("Filter on the real node passed after filtering its preemption copy")
	}
	if v, _ := pl.usage.byName.Load("n1"); v == nil || v.(*nodeUsage).generation != ni.GetGeneration() {
		t.Error("the preemption copy replaced the cached usage of the real node")
	}
}

func TestSweepForgetsDeletedNodes(t *testing.T) {
	c := newUsageCache(Capacity{})
	var nodeInfos []fwk.NodeInfo
	for i := range 40 {
		ni := framework.NewNodeInfo()
		ni.SetNode(slotNode(fmt.Sprintf("n%d", i), "1"))
		nodeInfos = append(nodeInfos, ni)
	}
	c.walk(nodeInfos, 0, func(int, *nodeUsage) bool { return true })
	alive := func(name string) bool { return name == "n0" || name == "n1" }
	if removed := c.sweep(20, alive); removed != 0 {
		t.Errorf("sweep with 40 entries for 20 nodes removed %d, want 0 (not worth it yet)", removed)
	}
	if removed := c.sweep(2, alive); removed != 38 {
		t.Errorf("sweep removed %d entries, want 38", removed)
	}
	if got := c.names.Load(); got != 2 {
		t.Errorf("cache size after sweep = %d, want 2", got)
	}
}

func TestSignPod(t *testing.T) {
	pl, _ := setup(t, defaultArgs(), nil, nil)
	sign := func(pod *v1.Pod) ([]fwk.SignFragment, *fwk.Status) {
		return pl.SignPod(context.Background(), pod)
	}
	a, sa := sign(modelPod("a", "llama", "").Obj())
	b, sb := sign(modelPod("b", "llama", "").Obj())
	if !sa.IsSuccess() || !sb.IsSuccess() || !cmp.Equal(a, b) {
		t.Errorf("replicas of one model signed differently: %v %v / %v %v", a, sa, b, sb)
	}
	c, _ := sign(modelPod("c", "llama", "").Annotation(SlotsAnnotation, "2").Obj())
	if cmp.Equal(a, c) {
		t.Error("pods needing different slots signed alike")
	}
	web, s := sign(st.MakePod().Name("web").Obj())
	if !s.IsSuccess() || len(web) != 1 || web[0].Value != nil {
		t.Errorf("pod without the model label signed %v, %v; want one empty fragment", web, s)
	}
	if _, s := sign(modelPod("bad", "llama", "").Annotation(SlotsAnnotation, "x").Obj()); s.Code() != fwk.Unschedulable {
		t.Errorf("pod with an invalid annotation: status %v, want Unschedulable (not batched)", s)
	}
}

// Through the scheduling framework itself: the plugin takes no part in
// filtering or scoring pods without the model label.
func TestFrameworkSkipsPodsWithoutModelLabel(t *testing.T) {
	metrics.Register()
	_, ctx := ktesting.NewTestContext(t)
	snapshot := cache.NewSnapshot(nil, []*v1.Node{slotNode("n1", ""), slotNode("n2", "1")})
	fw, err := tf.NewFramework(ctx, []tf.RegisterPluginFunc{
		tf.RegisterQueueSortPlugin(queuesort.Name, queuesort.New),
		tf.RegisterBindPlugin(defaultbinder.Name, defaultbinder.New),
		tf.RegisterPluginAsExtensions(Name, New, "PreFilter", "Filter", "PreScore", "Score"),
	}, "capstan-scheduler", frameworkruntime.WithSnapshotSharedLister(snapshot))
	if err != nil {
		t.Fatal(err)
	}
	nodeInfos, _ := snapshot.NodeInfos().List()

	web := st.MakePod().Namespace("ns").Name("web").Obj()
	state := framework.NewCycleState()
	if _, s, _ := fw.RunPreFilterPlugins(ctx, state, web); !s.IsSuccess() || !state.GetSkipFilterPlugins().Has(Name) {
		t.Errorf("PreFilter for a pod without the model label: %v, Filter skipped: %v", s, state.GetSkipFilterPlugins().Has(Name))
	}
	for _, ni := range nodeInfos {
		if s := fw.RunFilterPlugins(ctx, state, web, ni); !s.IsSuccess() {
			t.Errorf("Filter rejected %s for a pod without the model label: %v", ni.Node().Name, s)
		}
	}
	if s := fw.RunPreScorePlugins(ctx, state, web, nodeInfos); !s.IsSuccess() || !state.GetSkipScorePlugins().Has(Name) {
		t.Errorf("PreScore for a pod without the model label: %v, Score skipped: %v", s, state.GetSkipScorePlugins().Has(Name))
	}

	llama := modelPod("p", "llama", "").Obj()
	state = framework.NewCycleState()
	if _, s, _ := fw.RunPreFilterPlugins(ctx, state, llama); !s.IsSuccess() {
		t.Fatalf("PreFilter for a model server: %v", s)
	}
	var feasible []string
	for _, ni := range nodeInfos {
		if fw.RunFilterPlugins(ctx, state, llama, ni).IsSuccess() {
			feasible = append(feasible, ni.Node().Name)
		}
	}
	if diff := cmp.Diff([]string{"n2"}, feasible); diff != "" {
		t.Errorf("nodes a model server fits on (-want +got):\n%s", diff)
	}
}

func mustPodInfo(t testing.TB, pod *v1.Pod) fwk.PodInfo {
	t.Helper()
	pi, err := framework.NewPodInfo(pod)
	if err != nil {
		t.Fatal(err)
	}
	return pi
}

func nodeNames(nodes []*v1.Node) []string {
	var names []string
	for _, n := range nodes {
		names = append(names, n.Name)
	}
	return names
}

func nodeInfoNamed(t *testing.T, nodeInfos []fwk.NodeInfo, name string) fwk.NodeInfo {
	t.Helper()
	for _, ni := range nodeInfos {
		if ni.Node().Name == name {
			return ni
		}
	}
	t.Fatalf("no node %s", name)
	return nil
}

// The walk remembers usage by position in the node list; when the list is
// reordered, a node is replaced, or a node changes, it must still hand out
// each node's own, current usage.
func TestWalkFollowsNodeListChanges(t *testing.T) {
	c := newUsageCache(Capacity{})
	mk := func(name, slots string) fwk.NodeInfo {
		ni := framework.NewNodeInfo()
		ni.SetNode(slotNode(name, slots))
		return ni
	}
	a, b, d := mk("a", "1"), mk("b", "2"), mk("d", "4")
	check := func(nodes []fwk.NodeInfo) {
		t.Helper()
		c.walk(nodes, 1, func(i int, u *nodeUsage) bool {
			want, _ := c.capacity.NodeSlots(nodes[i].Node())
			if u.capacity != want || u.generation != nodes[i].GetGeneration() {
				t.Errorf("node %s: usage with %d slots at generation %d, want %d at %d",
					nodes[i].Node().Name, u.capacity, u.generation, want, nodes[i].GetGeneration())
			}
			return true
		})
	}
	check([]fwk.NodeInfo{a, b, d})
	check([]fwk.NodeInfo{d, a, b})            // reordered
	check([]fwk.NodeInfo{d, mk("e", "3"), b}) // a replaced at the same position
	b.AddPodInfo(mustPodInfo(t, modelPod("x", "llama", "b").Obj()))
	c.walk([]fwk.NodeInfo{d, b}, 0, func(i int, u *nodeUsage) bool { // shorter, and b changed
		if i == 1 && u.used != 1 {
			t.Errorf("node b after a pod was added: %d slots used, want 1", u.used)
		}
		return true
	})
}

// Filter and Score find a node's usage through the walked list by NodeInfo;
// a node that changed after the walk must not be served its old usage.
func TestGetSeesChangesAfterTheWalk(t *testing.T) {
	c := newUsageCache(Capacity{})
	ni := framework.NewNodeInfo()
	ni.SetNode(slotNode("a", "2"))
	c.walk([]fwk.NodeInfo{ni}, 0, func(int, *nodeUsage) bool { return true })
	if u := c.get(ni, func(fwk.NodeInfo) bool { return true }); u.used != 0 {
		t.Fatalf("empty node: %d slots used", u.used)
	}
	ni.AddPodInfo(mustPodInfo(t, modelPod("x", "llama", "a").Obj()))
	if u := c.get(ni, func(fwk.NodeInfo) bool { return true }); u.used != 1 {
		t.Errorf("after a pod was added: %d slots used, want 1", u.used)
	}
}
