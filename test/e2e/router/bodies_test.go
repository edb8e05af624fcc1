package router

import (
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/fleet"
)

// Fifty clients send a 10 MiB body each at once to one router run with the
// manifests' arguments and environment (its GOMEMLIMIT, GOGC and body
// budget): the router stays under the manifests' memory limit, the bodies
// past its budget are answered 429 with Retry-After before they are read,
// and another client's small requests are served all along.
func TestLargeBodiesAreBoundedByTheBudget(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	ns := namespace(t, ctx, "bodies")
	simulate(t, ctx, ns, nil)
	// Each request holds its body in the router for about a second.
	deploy(t, ctx, cluster.ModelServer{Namespace: ns, Name: "big", Model: "big", Replicas: 2,
		Annotations: map[string]string{fleet.TTFTAnnotation: "1s", fleet.MaxRunningAnnotation: "64"}})
	r := startRouter(t, ctx, "router-bodies", "--namespaces="+ns)
	r.waitReady(t, ctx, "big", 2)

	const clients, limitMiB = 50, 512 // the manifests' memory limit
	prefix := `{"model":"big","max_tokens":1,"prompt":"`
	big := prefix + strings.Repeat("x", 10<<20-len(prefix)-2) + `"}` // 10 MiB, --max-body-size
	var (
		mu       sync.Mutex
		statuses = map[int]int{}
		noRetry  int
		wg       sync.WaitGroup
	)
	start := make(chan struct{})
	for range clients {
		wg.Go(func() {
			<-start
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, r.url+"/v1/completions", strings.NewReader(big))
			req.Header.Set("Content-Type", "application/json")
			resp, err := client.Do(req)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				statuses[0]++
				return
			}
			resp.Body.Close()
			statuses[resp.StatusCode]++
			if resp.StatusCode == http.StatusTooManyRequests && resp.Header.Get("Retry-After") == "" {
				noRetry++
			}
		})
	}
	// Small requests from another client while the flood lasts.
	smallDone := make(chan []result, 1)
	go func() {
		<-start
		var out []result
		for range 5 {
			out = append(out, r.post(ctx, "/v1/completions", completion("big")))
		}
		smallDone <- out
	}()
	close(start)
	wg.Wait()
	small := <-smallDone

	mu.Lock()
	defer mu.Unlock()
	t.Logf("50 bodies of 10 MiB: %v (status: count; 0 is a transport error)", statuses)
	if statuses[http.StatusOK]+statuses[http.StatusTooManyRequests] != clients {
		t.Errorf("answers %v, want only 200 and 429", statuses)
	}
	if statuses[http.StatusTooManyRequests] == 0 {
		t.Error("no body was refused: 500 MiB of bodies were all held at once, the budget did nothing")
	}
	if noRetry > 0 {
		t.Errorf("%d 429 answers had no Retry-After", noRetry)
	}
	if f := failures(small); len(f) > 0 {
		t.Errorf("small requests failed during the flood: %v", f)
	}
	bin, err := cluster.Binary("capstan-router")
	if err != nil {
		t.Fatal(err)
	}
	pid, err := cluster.PidOf(bin)
	if err != nil {
		t.Fatal(err)
	}
	peak, err := cluster.MemoryMiB(pid, "VmHWM")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("router peak RSS %.0f MiB (limit %d MiB)", peak, limitMiB)
	if peak >= limitMiB {
		t.Errorf("the router's peak RSS %.0f MiB reached the manifests' memory limit of %d MiB", peak, limitMiB)
	}
}
