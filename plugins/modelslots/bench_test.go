package modelslots

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	v1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2/ktesting"
	fwk "k8s.io/kube-scheduler/framework"
	"k8s.io/kubernetes/pkg/scheduler/framework"
	st "k8s.io/kubernetes/pkg/scheduler/testing"
)

const (
	benchNodes       = 5000
	benchSlots       = 8 // per node
	benchOtherPods   = 6 // pods without the model label per node (daemons, sidecars)
	benchModels      = 4 // distinct models
	benchFullPercent = 90
)

// benchCluster is 5,000 nodes of 8 slots, each with 6 pods that are not
// model servers; the first freeNodeAt nodes are full of model servers and
// the others half full, so PreFilter has to look that deep for room.
func benchCluster(b *testing.B, freeNodeAt int) (*ModelSlots, []fwk.NodeInfo) {
	b.Helper()
	var nodes []*v1.Node
	var pods []*v1.Pod
	for i := range benchNodes {
		name := fmt.Sprintf("node-%05d", i)
		nodes = append(nodes, slotNode(name, fmt.Sprint(benchSlots)))
		for j := range benchOtherPods {
			pods = append(pods, st.MakePod().Namespace("kube-system").Name(fmt.Sprintf("daemon-%d-%d", i, j)).
				UID(fmt.Sprintf("daemon-%d-%d", i, j)).Node(name).Obj())
		}
		models := benchSlots / 2
		if i < freeNodeAt {
			models = benchSlots
		}
		for j := range models {
			pods = append(pods, modelPod(fmt.Sprintf("m-%d-%d", i, j), fmt.Sprintf("model-%d", j%benchModels), name).Obj())
		}
	}
	pl, nodeInfos := setup(b, defaultArgs(), nodes, pods)
	// The snapshot lists nodes in no particular order; walk them in the
	// order above so that "the first nodes are full" holds.
	slices.SortFunc(nodeInfos, func(a, b fwk.NodeInfo) int { return strings.Compare(a.Node().Name, b.Node().Name) })
	return pl, nodeInfos
}

func BenchmarkPreFilter(b *testing.B) {
	pod := modelPod("p", "model-0", "").Obj()
	cases := []struct {
		name       string
		freeNodeAt int
		// cold drops the cache before every cycle: the cost of counting
		// every pod on every node in every cycle, which the cache avoids.
		cold bool
		// churn changes one node per cycle, as assuming one pod does.
		churn bool
		// rewind makes every walk start at the first node, as if the last
		// room had been found there: the worst single walk.
		rewind bool
	}{
		{name: "room-on-first-node", freeNodeAt: 0},
		{name: "room-after-90%-full-nodes", freeNodeAt: benchNodes * benchFullPercent / 100},
		{name: "room-after-90%-full-nodes/walk-from-first-node", freeNodeAt: benchNodes * benchFullPercent / 100, rewind: true},
		{name: "room-after-90%-full-nodes/one-node-changed-per-cycle", freeNodeAt: benchNodes * benchFullPercent / 100, churn: true},
		{name: "no-room/rejected-with-reason", freeNodeAt: benchNodes},
		{name: "no-room/rejected-with-reason/cold-cache", freeNodeAt: benchNodes, cold: true},
	}
	for _, tc := range cases {
		b.Run(fmt.Sprintf("%dnodes/%s", benchNodes, tc.name), func(b *testing.B) {
			pl, nodeInfos := benchCluster(b, tc.freeNodeAt)
			logger, _ := ktesting.NewTestContext(b)
			churner := modelPod("churn", "model-1", "").Obj()
			// Warm the cache as the previous cycles would have.
			pl.PreFilter(context.Background(), framework.NewCycleState(), pod, nodeInfos)
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				if tc.cold {
					pl.usage = newUsageCache(pl.capacity)
				}
				if tc.rewind {
					pl.walkFrom.Store(0)
				}
				if tc.churn {
					ni := nodeInfos[i%len(nodeInfos)]
					if i%2 == 0 {
						ni.AddPodInfo(mustPodInfo(b, churner))
					} else {
						ni = nodeInfos[(i-1)%len(nodeInfos)]
						if err := ni.RemovePod(logger, churner); err != nil {
							b.Fatal(err)
						}
					}
				}
				_, s := pl.PreFilter(context.Background(), framework.NewCycleState(), pod, nodeInfos)
				if wantRoom := tc.freeNodeAt < benchNodes; s.IsSuccess() != wantRoom {
					b.Fatalf("PreFilter = %v, want room: %v", s, wantRoom)
				}
			}
		})
	}
}

// BenchmarkFilter filters every node once per op, as a scheduling cycle
// that has to look at all of them does; 90% of the nodes are full, so most
// calls reject with a reason.
func BenchmarkFilter(b *testing.B) {
	cases := []struct {
		name string
		pod  *v1.Pod
	}{
		{name: "one-slot", pod: modelPod("p", "model-0", "").Obj()},
		{name: "one-slot/max-2-per-node", pod: modelPod("p", "model-0", "").Annotation(MaxPerNodeAnnotation, "2").Obj()},
	}
	for _, tc := range cases {
		b.Run(fmt.Sprintf("%dnodes/%s", benchNodes, tc.name), func(b *testing.B) {
			pl, nodeInfos := benchCluster(b, benchNodes*benchFullPercent/100)
			state := framework.NewCycleState()
			if _, s := pl.PreFilter(context.Background(), state, tc.pod, nodeInfos); !s.IsSuccess() {
				b.Fatal(s)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				for _, ni := range nodeInfos {
					pl.Filter(context.Background(), state, tc.pod, ni)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(nodeInfos)), "ns/node")
		})
	}
	// As the scheduler calls it: many goroutines, one node each.
	b.Run(fmt.Sprintf("%dnodes/one-slot/parallel", benchNodes), func(b *testing.B) {
		pod := cases[0].pod
		pl, nodeInfos := benchCluster(b, benchNodes*benchFullPercent/100)
		state := framework.NewCycleState()
		if _, s := pl.PreFilter(context.Background(), state, pod, nodeInfos); !s.IsSuccess() {
			b.Fatal(s)
		}
		var next atomic.Int64
		b.ReportAllocs()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				pl.Filter(context.Background(), state, pod, nodeInfos[next.Add(1)%int64(len(nodeInfos))])
			}
		})
	})
}

// BenchmarkScore scores and normalizes every node once per op.
func BenchmarkScore(b *testing.B) {
	pod := modelPod("p", "model-0", "").Obj()
	b.Run(fmt.Sprintf("%dnodes", benchNodes), func(b *testing.B) {
		pl, nodeInfos := benchCluster(b, benchNodes*benchFullPercent/100)
		state := framework.NewCycleState()
		if _, s := pl.PreFilter(context.Background(), state, pod, nodeInfos); !s.IsSuccess() {
			b.Fatal(s)
		}
		scores := make(fwk.NodeScoreList, len(nodeInfos))
		b.ReportAllocs()
		b.ResetTimer()
		for range b.N {
			for i, ni := range nodeInfos {
				score, _ := pl.Score(context.Background(), state, pod, ni)
				scores[i] = fwk.NodeScore{Name: ni.Node().Name, Score: score}
			}
			pl.NormalizeScore(context.Background(), state, pod, scores)
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(nodeInfos)), "ns/node")
	})
}
