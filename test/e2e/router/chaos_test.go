package router

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/fleet"
)

// clientOutcome sorts what a client saw.
func clientOutcome(res result) string {
	var errno syscall.Errno
	switch {
	case res.err == nil && res.status == http.StatusOK:
		return "ok"
	case res.err == nil:
		return "status " + strconv.Itoa(res.status)
	case errors.As(res.err, &errno) && errno == syscall.ECONNREFUSED:
		return "connection refused"
	case errors.As(res.err, &errno) && errno == syscall.ECONNRESET:
		return "connection reset"
	case errors.Is(res.err, io.EOF) || errors.Is(res.err, io.ErrUnexpectedEOF) || strings.Contains(res.err.Error(), "EOF"):
		return "connection closed (EOF)"
	}
	return "other: " + res.err.Error()
}

// TestChaosRouterReplicaKilled: two router replicas in front of one model,
// under load from clients of each; one is SIGKILLed mid-load. The other
// serves every one of its requests, before and after; what the killed
// replica's clients saw is logged.
func TestChaosRouterReplicaKilled(t *testing.T) {
	ctx := testContext(t, 2*time.Minute)
	ns := namespace(t, ctx, "chaosrouter")
	simulate(t, ctx, ns, nil)
	deploy(t, ctx, cluster.ModelServer{Namespace: ns, Name: "chaos", Model: "chaos", Replicas: 3})
	survivor := startRouter(t, ctx, "router-chaos-0", "--namespaces="+ns)
	victim := startRouter(t, ctx, "router-chaos-1", "--namespaces="+ns)
	for _, r := range []*router{survivor, victim} {
		r.waitReady(t, ctx, "chaos", 3)
	}

	// Each client sends at most maxPerClient requests; a client of the
	// killed replica paces itself after an error, so the bound holds in
	// time too.
	const clientsPerRouter, maxPerClient = 3, 1500
	type record struct {
		timedResult
		router int
	}
	var (
		mu      sync.Mutex
		records []record
		ok      [2]atomic.Int64
		wg      sync.WaitGroup
	)
	loadCtx, stopLoad := context.WithCancel(ctx)
	defer stopLoad()
	for i, r := range []*router{survivor, victim} {
		for range clientsPerRouter {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for n := 0; n < maxPerClient && loadCtx.Err() == nil; n++ {
					start := time.Now()
					res := r.post(context.WithoutCancel(loadCtx), "/v1/completions", completion("chaos"))
					mu.Lock()
					records = append(records, record{timedResult{res, start, time.Now()}, i})
					mu.Unlock()
					if res.err == nil && res.status == http.StatusOK {
						ok[i].Add(1)
					} else {
						select { // pace a client whose router is gone
						case <-loadCtx.Done():
						case <-time.After(10 * time.Millisecond):
						}
					}
				}
			}()
		}
	}
	err := testCluster.WaitFor(ctx, 20*time.Second, "both replicas to serve 100 requests", func(context.Context) (bool, error) {
		return ok[0].Load() >= 100 && ok[1].Load() >= 100, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	killedAt := time.Now()
	victim.proc.Kill()
	servedBefore := ok[0].Load()
	err = testCluster.WaitFor(ctx, 20*time.Second, "the survivor to serve 300 more requests", func(context.Context) (bool, error) {
		return ok[0].Load() >= servedBefore+300, nil
	})
	if err != nil {
		t.Error(err)
	}
	stopLoad()
	wg.Wait()

	err = testCluster.WaitFor(ctx, 10*time.Second, "the killed replica to exit", func(context.Context) (bool, error) {
		exited, _ := victim.proc.Exited()
		return exited, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, how := victim.proc.Exited(); how == nil || !strings.Contains(how.Error(), "killed") {
		t.Errorf("the replica exited with %v, want killed by SIGKILL", how)
	}

	var survived []result
	seen := map[string]int{}
	var victimTotal, victimBefore, lateOK int
	for _, rec := range records {
		if rec.router == 0 {
			survived = append(survived, rec.result)
			continue
		}
		victimTotal++
		if rec.end.Before(killedAt) {
			victimBefore++
			continue
		}
		outcome := clientOutcome(rec.result)
		seen[outcome]++
		if outcome == "ok" && rec.start.After(killedAt.Add(100*time.Millisecond)) {
			lateOK++
		}
	}
	if f := failures(survived); len(f) > 0 {
		t.Errorf("%d of %d requests through the surviving replica failed: %v", len(f), len(survived), f[:min(len(f), 5)])
	}
	if lateOK > 0 {
		t.Errorf("%d requests sent to the killed replica after the kill succeeded: it was not killed", lateOK)
	}
	errorsSeen := 0
	for outcome, n := range seen {
		if outcome != "ok" {
			errorsSeen += n
		}
	}
	if errorsSeen == 0 {
		t.Error("the killed replica's clients saw no error: the kill did not happen mid-load")
	}
	t.Logf("surviving replica: %d requests, %d failed (%d after the kill)", len(survived), len(failures(survived)), ok[0].Load()-servedBefore)
	t.Logf("killed replica: %d requests, %d finished before the kill; after it its clients saw %d errors: %v", victimTotal, victimBefore, errorsSeen, seen)
}

// TestChaosModelPodKilledMidStream: the model server streaming a completion
// dies mid-stream. The client's stream must end abnormally at once — never
// with "data: [DONE]" and the chunked terminator, which would make a cut
// generation look complete — and the model keeps serving on its other pod.
func TestChaosModelPodKilledMidStream(t *testing.T) {
	ctx := testContext(t, 2*time.Minute)
	ns := namespace(t, ctx, "chaosstream")
	var seen arrivals
	sim := simulate(t, ctx, ns, seen.add)
	const tokens = 100
	deploy(t, ctx, cluster.ModelServer{Namespace: ns, Name: "cut", Model: "cut", Replicas: 2,
		Annotations: map[string]string{fleet.TPOTAnnotation: "50ms", fleet.OutputTokensAnnotation: strconv.Itoa(tokens)}})
	r := startRouter(t, ctx, "router-chaos-stream", "--namespaces="+ns)
	r.waitReady(t, ctx, "cut", 2)

	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, r.url+"/v1/completions",
		strings.NewReader(`{"model":"cut","prompt":"tell a long story","stream":true}`))
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.TransferEncoding == nil || resp.TransferEncoding[0] != "chunked" {
		t.Fatalf("stream answered %d with transfer encoding %v", resp.StatusCode, resp.TransferEncoding)
	}
	podNS, name, _ := strings.Cut(resp.Header.Get("X-Capstan-Pod"), "/")
	pod := types.NamespacedName{Namespace: podNS, Name: name}
	br := bufio.NewReader(resp.Body)
	chunks := 0
	for chunks < 3 {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("after %d chunks: %v", chunks, err)
		}
		if strings.HasPrefix(line, "data: ") {
			chunks++
		}
	}
	killedAt := time.Now()
	if !sim.Kill(pod) {
		t.Fatalf("the simulator does not serve %s", pod)
	}
	// Read the rest the way a client does; a clean end is io.EOF, which
	// ReadString reports only after the chunked terminator.
	var readErr error
	done := false
	for {
		line, err := br.ReadString('\n')
		if strings.TrimSpace(line) == "data: [DONE]" {
			done = true
		}
		if strings.HasPrefix(line, "data: ") {
			chunks++
		}
		if err != nil {
			readErr = err
			break
		}
	}
	ended := time.Since(killedAt)
	if done {
		t.Error("the cut stream ended with data: [DONE]")
	}
	if errors.Is(readErr, io.EOF) {
		t.Errorf("the cut stream ended cleanly (chunked terminator, io.EOF) after %d chunks", chunks)
	}
	if chunks >= tokens {
		t.Errorf("%d chunks: the stream was not cut", chunks)
	}
	if ended > 3*time.Second {
		t.Errorf("the client's stream ended %s after the model server died; want at once", ended)
	}
	t.Logf("stream from %s cut after %d of %d chunks; the client's read ended %s after the kill with %v",
		pod.Name, chunks, tokens, ended.Round(time.Millisecond), readErr)

	// The model keeps serving on its other pod: the dead one refuses
	// connections, so requests are retried there and it is ejected.
	before := seen.count(pod.Name)
	for i := range 20 {
		if res := r.post(ctx, "/v1/completions", completion("cut")); res.err != nil || res.status != http.StatusOK {
			t.Fatalf("request %d after the pod died: %d %v %s", i, res.status, res.err, res.body)
		}
	}
	if n := seen.count(pod.Name) - before; n != 0 {
		t.Errorf("the dead pod got %d requests", n)
	}
}

// TestChaosBlackHoledPod: a pod whose network drops every packet (the
// simulator's black-hole fault: SYNs go unanswered, so connecting times out
// rather than being refused). With a short --connect-timeout, the first
// request sent to it waits out the connect timeout and goes to another
// endpoint (a connection that never opened reached no server), the pod is
// ejected, and no client sees an error.
func TestChaosBlackHoledPod(t *testing.T) {
	ctx := testContext(t, 2*time.Minute)
	ns := namespace(t, ctx, "chaoshole")
	var seen arrivals
	simulate(t, ctx, ns, seen.add)
	hole := faultyModel(t, ctx, ns, "hole", 2, map[string]string{fleet.FaultAnnotation: string(fleet.FaultBlackHole)})
	pods, err := testCluster.Pods(ctx, ns, "app=hole-faulty")
	if err != nil || len(pods) != 1 {
		t.Fatalf("the black-holed pod: %v %v", pods, err)
	}
	// The fault is in place: connecting neither succeeds nor is refused.
	addr := net.JoinHostPort(pods[0].Status.PodIP, "8000")
	err = testCluster.WaitFor(ctx, 10*time.Second, "connecting to the black-holed pod to time out", func(context.Context) (bool, error) {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return false, nil
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return true, nil
		}
		return false, err
	})
	if err != nil {
		t.Fatal(err)
	}

	const connectTimeout = 500 * time.Millisecond
	r := startRouter(t, ctx, "router-chaos-hole", "--namespaces="+ns, spreadEvenly, "--connect-timeout="+connectTimeout.String(),
		"--ejection-base=30s", "--ejection-max=30s")
	r.waitReady(t, ctx, "hole", 3)

	const workers, requests = 2, 200
	results := boundedLoad(ctx, r, workers, requests, completion("hole"), nil)
	if len(results) != requests {
		t.Fatalf("%d of %d requests finished", len(results), requests)
	}
	var plain []result
	var slowest time.Duration
	slow := 0
	for _, res := range results {
		plain = append(plain, res.result)
		d := res.end.Sub(res.start)
		slowest = max(slowest, d)
		if d >= connectTimeout {
			slow++
		}
	}
	if f := failures(plain); len(f) > 0 {
		t.Errorf("%d of %d requests failed with one pod black-holed: %v", len(f), len(plain), f[:min(len(f), 5)])
	}
	if n := seen.count(hole); n != 0 {
		t.Errorf("the black-holed pod received %d requests", n)
	}
	ejections := r.metric(t, "capstan_router_ejections_total", map[string]string{"model": "hole"})
	retries := r.metric(t, "capstan_router_retries_total", map[string]string{"model": "hole", "reason": "connect"})
	if ejections != 1 || retries != 1 {
		t.Errorf("ejections %v, connect retries %v; want 1 of each (the pod ejected for 30s on its first connect timeout)", ejections, retries)
	}
	// The failed-over request waited for the connect timeout: the pod was
	// not refusing, it was silent.
	if slow == 0 {
		t.Errorf("no request took the connect timeout of %s (slowest %s): nothing waited for the black-holed pod", connectTimeout, slowest)
	}
	t.Logf("%d requests, all 200; %v ejection, %v connect retry; %d request(s) took at least the connect timeout, the slowest %s",
		len(results), ejections, retries, slow, slowest.Round(time.Millisecond))
}
