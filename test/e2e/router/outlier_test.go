package router

import (
	"context"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/fleet"
)

// outlierErrors is --outlier-consecutive-errors in these tests (the
// default, given explicitly so that the bounds below read against it).
const outlierErrors = 5

// timedResult is one request of a bounded load.
type timedResult struct {
	result
	start, end time.Time
}

// boundedLoad sends up to n requests to r with `workers` concurrent clients
// and returns their results in the order they finished. It stops early when
// ctx ends or, if enough is not nil, once enough says so of the results so
// far.
func boundedLoad(ctx context.Context, r *router, workers, n int, body string, enough func([]timedResult) bool) []timedResult {
	var (
		mu   sync.Mutex
		out  []timedResult
		stop bool
		left atomic.Int64
		wg   sync.WaitGroup
	)
	left.Store(int64(n))
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil && left.Add(-1) >= 0 {
				start := time.Now()
				res := r.post(ctx, "/v1/completions", body)
				tr := timedResult{result: res, start: start, end: time.Now()}
				mu.Lock()
				out = append(out, tr)
				if enough != nil && !stop && enough(out) {
					stop = true
					left.Store(0)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return out
}

func (r timedResult) failed() bool { return r.err != nil || r.status != http.StatusOK }

// nthFailure is when the client received the n-th answer that bad says
// came from the faulty pod (in the order they finished), and whether there
// were n.
func nthFailure(results []timedResult, n int, bad func(timedResult) bool) (time.Time, bool) {
	for _, r := range results {
		if bad(r) {
			if n--; n == 0 {
				return r.end, true
			}
		}
	}
	return time.Time{}, false
}

// startedAfter returns the results of requests sent after t.
func startedAfter(results []timedResult, t time.Time) []timedResult {
	var out []timedResult
	for _, r := range results {
		if r.start.After(t) {
			out = append(out, r)
		}
	}
	return out
}

// cleanAfterFailures says a load has done its work once errs requests have
// failed at the faulty pod and clean requests were sent after the client saw
// the errs-th.
func cleanAfterFailures(errs, clean int, bad func(timedResult) bool) func([]timedResult) bool {
	return func(results []timedResult) bool {
		at, ok := nthFailure(results, errs, bad)
		return ok && len(startedAfter(results, at)) >= clean
	}
}

// checkEjectedOnAnswers checks a load against a model with one faulty pod
// that received hits requests; bad tells the failures it caused. The pod
// was ejected after outlierErrors bad answers (plus at most one request per
// other client already in flight to it); each of its requests was answered
// once with its failure (never retried: a client failure per request it
// received); no request failed otherwise; and every request sent after the
// client saw the outlierErrors-th failure succeeded.
func checkEjectedOnAnswers(t *testing.T, results []timedResult, hits, workers, clean int, bad func(timedResult) bool) (badAnswers int, after []timedResult) {
	t.Helper()
	var other []string
	for _, r := range results {
		switch {
		case bad(r):
			badAnswers++
		case r.failed():
			other = append(other, failures([]result{r.result})...)
		}
	}
	if len(other) > 0 {
		t.Errorf("%d requests failed other than with the faulty pod's failure: %v", len(other), other[:min(len(other), 5)])
	}
	if hits < outlierErrors || hits > outlierErrors+workers-1 {
		t.Errorf("the faulty pod got %d requests; want %d to %d (ejected after %d bad answers in a row)", hits, outlierErrors, outlierErrors+workers-1, outlierErrors)
	}
	if badAnswers != hits {
		t.Errorf("clients saw %d failures from the faulty pod for the %d requests it received: each must be answered once, never retried", badAnswers, hits)
	}
	ejectedAt, ok := nthFailure(results, outlierErrors, bad)
	if !ok {
		t.Fatalf("%d requests, %d failed at the faulty pod: it was never ejected", len(results), badAnswers)
	}
	after = startedAfter(results, ejectedAt)
	var failedAfter []string
	for _, r := range after {
		if r.failed() {
			failedAfter = append(failedAfter, failures([]result{r.result})...)
		}
	}
	if len(failedAfter) > 0 {
		t.Errorf("%d of the %d requests sent after the ejection failed: %v", len(failedAfter), len(after), failedAfter[:min(len(failedAfter), 5)])
	}
	if len(after) < clean {
		t.Errorf("only %d requests were sent after the ejection, want %d", len(after), clean)
	}
	return badAnswers, after
}

// errorCode is the OpenAI error code of a router answer, "" if none.
func errorCode(body string) string {
	var e apiError
	if json.Unmarshal([]byte(body), &e) != nil {
		return ""
	}
	return e.Error.Code
}

// faultyModel deploys one model as two Deployments pooled under one model
// name: `good` healthy replicas and one replica whose simulated engine has
// the fault annotations from its creation, so that the router meets the
// fault on its first request to it. It returns the faulty pod's name.
func faultyModel(t *testing.T, ctx context.Context, ns, model string, good int32, fault map[string]string) string {
	t.Helper()
	deploy(t, ctx, cluster.ModelServer{Namespace: ns, Name: model + "-good", Model: model, Replicas: good})
	bad := deploy(t, ctx, cluster.ModelServer{Namespace: ns, Name: model + "-faulty", Model: model, Replicas: 1, Annotations: fault})
	return bad[0].Name
}

// TestOutlierEjectsAPodAnswering500 checks outlier detection on answers: a
// pod that answers every request 500 gets outlier-consecutive-errors of them
// (plus what was already in flight to it), each answered to its client as
// it came (never retried elsewhere), and is then ejected for
// --ejection-base, during which the clients see no error at all. Without
// ejection on answers the pod would take a quarter of the requests and fail
// every one.
func TestOutlierEjectsAPodAnswering500(t *testing.T) {
	ctx := testContext(t, 2*time.Minute)
	ns := namespace(t, ctx, "outlier500")
	var seen arrivals
	simulate(t, ctx, ns, seen.add)
	faulty := faultyModel(t, ctx, ns, "o500", 3, map[string]string{fleet.FaultAnnotation: string(fleet.FaultHTTP500)})
	r := startRouter(t, ctx, "router-outlier-500", "--namespaces="+ns, spreadEvenly,
		"--outlier-consecutive-errors="+strconv.Itoa(outlierErrors), "--ejection-base=30s", "--ejection-max=30s")
	r.waitReady(t, ctx, "o500", 4)

	const workers, clean = 4, 150
	bad := func(r timedResult) bool {
		return r.err == nil && r.status == http.StatusInternalServerError && r.pod == ns+"/"+faulty
	}
	loadCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	start := time.Now()
	results := boundedLoad(loadCtx, r, workers, 1000, completion("o500"), cleanAfterFailures(outlierErrors, clean, bad))
	took := time.Since(start)
	hits := seen.count(faulty)
	fivexx, after := checkEjectedOnAnswers(t, results, hits, workers, clean, bad)
	if ej := r.metric(t, "capstan_router_ejections_total", map[string]string{"model": "o500"}); ej != 1 {
		t.Errorf("capstan_router_ejections_total = %v, want 1 (one ejection lasting 30s)", ej)
	}
	if got := r.metric(t, "capstan_router_requests_total", map[string]string{"model": "o500", "code": "500"}); int(got) != fivexx {
		t.Errorf("capstan_router_requests_total{code=500} = %v, want %d", got, fivexx)
	}
	if retries := r.metric(t, "capstan_router_retries_total", map[string]string{"model": "o500"}); retries != 0 {
		t.Errorf("%v retries: an answered request must never be sent again", retries)
	}
	t.Logf("%d requests in %s: the faulty pod got %d, clients saw %d 500s; %d requests were sent after the ejection",
		len(results), took.Round(time.Millisecond), hits, fivexx, len(after))
}

// TestOutlierEjectsAPodTimingOut checks outlier detection on first-byte
// timeouts: a pod that answers only after --first-byte-timeout gets each of
// its requests once (a request that reached a model server is answered 504,
// never retried: its arrivals equal the clients' 504s), is ejected after
// outlier-consecutive-errors timeouts, and the requests after that succeed.
func TestOutlierEjectsAPodTimingOut(t *testing.T) {
	ctx := testContext(t, 2*time.Minute)
	ns := namespace(t, ctx, "outlierslow")
	var seen arrivals
	simulate(t, ctx, ns, seen.add)
	// The healthy pods answer in tens of milliseconds; the timeout leaves
	// room for a machine busy with other work.
	const firstByteTimeout, faultDelay = time.Second, 5 * time.Second
	faulty := faultyModel(t, ctx, ns, "oslow", 3, map[string]string{
		fleet.FaultAnnotation: string(fleet.FaultSlow), fleet.FaultDelayAnnotation: faultDelay.String()})
	r := startRouter(t, ctx, "router-outlier-slow", "--namespaces="+ns, spreadEvenly, "--first-byte-timeout="+firstByteTimeout.String(),
		"--outlier-consecutive-errors="+strconv.Itoa(outlierErrors), "--ejection-base=30s", "--ejection-max=30s")
	r.waitReady(t, ctx, "oslow", 4)

	// Two clients: least-requests sends nothing to the slow pod while it
	// holds one of them, so it is picked at random only when both are
	// free, one request in four.
	const workers, clean = 2, 100
	bad := func(r timedResult) bool {
		return r.err == nil && r.status == http.StatusGatewayTimeout && errorCode(r.body) == "upstream_timeout" &&
			strings.Contains(r.body, "/"+faulty+" ")
	}
	loadCtx, cancel := context.WithTimeout(ctx, 40*time.Second)
	defer cancel()
	start := time.Now()
	results := boundedLoad(loadCtx, r, workers, 1000, completion("oslow"), cleanAfterFailures(outlierErrors, clean, bad))
	took := time.Since(start)
	hits := seen.count(faulty)
	for _, res := range results {
		// Answered at the router's timeout, not when the pod answered.
		if d := res.end.Sub(res.start); bad(res) && (d < firstByteTimeout || d >= faultDelay) {
			t.Errorf("a 504 after %s; want it at the first-byte timeout of %s", d, firstByteTimeout)
		}
	}
	timeouts, after := checkEjectedOnAnswers(t, results, hits, workers, clean, bad)
	if ej := r.metric(t, "capstan_router_ejections_total", map[string]string{"model": "oslow"}); ej != 1 {
		t.Errorf("capstan_router_ejections_total = %v, want 1", ej)
	}
	if retries := r.metric(t, "capstan_router_retries_total", map[string]string{"model": "oslow"}); retries != 0 {
		t.Errorf("%v retries: a request that timed out waiting for its answer must never be sent again", retries)
	}
	t.Logf("%d requests in %s: the slow pod got %d, clients saw %d 504s from it; %d requests were sent after the ejection",
		len(results), took.Round(time.Millisecond), hits, timeouts, len(after))
}
