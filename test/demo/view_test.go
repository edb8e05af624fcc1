package demo

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

func TestRenderShowsPendingReason(t *testing.T) {
	views := []ModelView{{
		Model: Model{Name: "llama-3-8b", App: "llama", Engine: modelserver.VLLM}, Desired: 3, Replicas: 3,
		Waiting: "7", Ready: 2, Pending: 1,
		Pods: []PodView{
			{Name: "llama-a", Node: "gpu-node-0", State: "Ready", Waiting: "3", Running: "4", Served: 19},
			{Name: "llama-b", State: "Pending", Waiting: "-", Running: "-", Reason: "model llama-3-8b: all 4 model slots on 2 nodes are in use"},
		},
	}}
	var b bytes.Buffer
	Render(&b, views, 12*time.Second, 16, Figures{Requests: 100})
	out := b.String()
	for _, want := range []string{"llama-3-8b (vllm)  HPA wants 3", "2 ready, 0 loading, 1 pending", "llama-a", "19",
		"all 4 model slots on 2 nodes are in use", "client errors 0"} {
		if !strings.Contains(out, want) {
			t.Errorf("frame lacks %q:\n%s", want, out)
		}
	}
	b.Reset()
	RenderLine(&b, views, 12*time.Second, 16, Figures{Requests: 100, ClientErrors: 2})
	if got := b.String(); !strings.Contains(got, "errors=2") || strings.Count(got, "\n") != 1 {
		t.Errorf("one-line view: %q", got)
	}
}

func TestSummarySaysWhatWasNotReached(t *testing.T) {
	start := time.Now()
	var b bytes.Buffer
	Summary(&b, Config{}.withDefaults(), Figures{LoadStart: start, FirstScaleUp: start.Add(2 * time.Second), PeakBound: 6})
	out := b.String()
	if !strings.Contains(out, "first scale-up decision: 2s") || !strings.Contains(out, "served by a new pod: not reached") ||
		!strings.Contains(out, "6 of 6 slots") {
		t.Errorf("summary:\n%s", out)
	}
}
