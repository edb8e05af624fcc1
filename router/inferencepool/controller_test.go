package inferencepool

import (
	"context"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2/ktesting"
	inferencefake "sigs.k8s.io/gateway-api-inference-extension/client-go/clientset/versioned/fake"
)

// change is one snapshot a handler was given.
type change struct {
	key  types.NamespacedName
	pool *Pool
}

type recorder chan change

func (r recorder) PoolChanged(key types.NamespacedName, pool *Pool) { r <- change{key, pool} }

// next waits for the next snapshot of key whose routable addresses are
// want, and fails the test if another one comes first.
func (r recorder) next(t *testing.T, key types.NamespacedName, want ...string) {
	t.Helper()
	select {
	case c := <-r:
		if c.key != key {
			t.Fatalf("a snapshot of %s, want %s", c.key, key)
		}
		if diff := cmp.Diff(want, routable(c.pool)); diff != "" {
			t.Fatalf("routable endpoints of %s (-want +got):\n%s", key, diff)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("no new snapshot of %s", key)
	}
}

func routable(p *Pool) []string {
	if p == nil {
		return nil
	}
	var out []string
	for _, e := range p.Endpoints {
		if e.Routable() {
			out = append(out, e.Address)
		}
	}
	return out
}

// A pool's endpoints follow its pods at once: a pod that stops being Ready
// or is deleted leaves the snapshot in the next one, and pods of other
// pools or namespaces cause none.
func TestControllerFollowsPods(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	kube := fake.NewClientset(pod("ml", "a", "198.18.0.1"), pod("ml", "b", "198.18.0.2"), pod("other", "c", "198.18.0.3"))
	pools := inferencefake.NewClientset(testPool("ml", "llama", 8000), testPool("other", "llama", 8000))
	rec := make(recorder, 16)
	c := New(kube, pools, rec, []string{"ml"})
	done := make(chan error)
	go func() { done <- c.Run(ctx, 1) }()
	key := types.NamespacedName{Namespace: "ml", Name: "llama"}
	rec.next(t, key, "198.18.0.1:8000", "198.18.0.2:8000")
	// Synced is set once the first snapshots are handed over.
	if !cache.WaitForCacheSync(ctx.Done(), c.HasSynced) {
		t.Fatal("the controller did not sync")
	}
	if len(rec) != 0 {
		t.Fatalf("%d more snapshots after the initial one; the pool of an unwatched namespace is followed", len(rec))
	}
	if got := testutil.ToFloat64(c); got != 2 {
		t.Errorf("ready endpoints gauge %v, want 2", got)
	}

	podsAPI := kube.CoreV1().Pods("ml")
	a, err := podsAPI.Get(ctx, "a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	a = a.DeepCopy()
	notReady(a)
	// (The fake clientset does not bump resourceVersion; the informer
	// treats an update with an unchanged one as a resync.)
	a.ResourceVersion = "2"
	if _, err := podsAPI.UpdateStatus(ctx, a, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	rec.next(t, key, "198.18.0.2:8000")

	// A pod no pool selects is no change; the next real one shows it was
	// processed without a snapshot.
	web := pod("ml", "web", "198.18.0.9", func(p *corev1.Pod) { p.Labels = map[string]string{"app": "web"} })
	if _, err := podsAPI.Create(ctx, web, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := podsAPI.Delete(ctx, "b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	rec.next(t, key)

	// Relabelling a pod into the pool adds it.
	web.Labels = map[string]string{"app": "llama"}
	web.ResourceVersion = "2"
	if _, err := podsAPI.Update(ctx, web, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	rec.next(t, key, "198.18.0.9:8000")

	// Deleting the pool drops its snapshot.
	if err := pools.InferenceV1().InferencePools("ml").Delete(ctx, "llama", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	rec.next(t, key)
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}
	if c.Len() != 0 {
		t.Errorf("%d pools after the only one was deleted", c.Len())
	}
}
