package router

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/capstan-dev/capstan/test/cluster"
)

// benchEnv turns on TestSideBySide (hack/bench-router.sh sets it).
const benchEnv = "CAPSTAN_BENCH_ROUTER"

// TestSideBySide is the benchmark of make bench-router: the same simulated
// backends (small fixed response, no simulated latency, keep-alive) are
// loaded with wrk directly, through nginx, through HAProxy and through
// capstan-router, one after another in one run; then direct and router are
// loaded at half the router's maximum rate with an open-loop generator to
// measure the latency the router adds. It writes a Markdown report to
// $CAPSTAN_BENCH_OUT.
func TestSideBySide(t *testing.T) {
	if os.Getenv(benchEnv) == "" {
		t.Skipf("set %s=1 to run the side-by-side benchmark (make bench-router)", benchEnv)
	}
	for _, tool := range []string{"wrk", "nginx", "haproxy"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is not installed (hack/bench-router.sh installs it): %v", tool, err)
		}
	}
	duration := envDuration(t, "CAPSTAN_BENCH_DURATION", 10*time.Second)
	connections := envInt(t, "CAPSTAN_BENCH_CONNECTIONS", 64)
	const backends = 4
	ctx := testContext(t, 30*time.Minute)
	ns := namespace(t, ctx, "bench")
	simulate(t, ctx, ns, nil)
	pods := deploy(t, ctx, cluster.ModelServer{Namespace: ns, Name: "bench", Model: "bench", Replicas: backends,
		Annotations: map[string]string{
			"sim.capstan.dev/ttft": "0s", "sim.capstan.dev/tpot": "0s", "sim.capstan.dev/output-tokens": "4",
			// No engine queueing: the backends are as fast as the simulator.
			"sim.capstan.dev/max-running": "100000",
		}})
	var upstreams []string
	for _, p := range pods {
		upstreams = append(upstreams, p.Status.PodIP+":8000")
	}
	dir := t.TempDir()
	body := `{"model":"bench","prompt":"hello world","max_tokens":4}`
	luaPath := filepath.Join(dir, "post.lua")
	lua := fmt.Sprintf("wrk.method = \"POST\"\nwrk.body = %q\nwrk.headers[\"Content-Type\"] = \"application/json\"\n", body)
	if err := os.WriteFile(luaPath, []byte(lua), 0o644); err != nil {
		t.Fatal(err)
	}

	nginxURL := startNginx(t, dir, upstreams)
	haproxyURL := startHAProxy(t, dir, upstreams)
	if v := os.Getenv("CAPSTAN_BENCH_ROUTER_GOMAXPROCS"); v != "" {
		t.Setenv("GOMAXPROCS", v) // inherited by the router process only
	}
	// least-requests, as nginx's least_conn and HAProxy's leastconn: the
	// comparison is of the proxies, not of their balancing.
	r := startRouter(t, ctx, "router-bench", "--namespaces="+ns, "--balancer=least-requests", "--access-log=false", "--v=0", "--profiling")
	r.waitReady(t, ctx, "bench", backends)

	// comm is the process name whose CPU time is the proxy's cost.
	targets := []struct{ name, url, comm string }{
		{"direct (one backend)", "http://" + upstreams[0], ""},
		{"nginx", nginxURL, "nginx"},
		{"haproxy", haproxyURL, "haproxy"},
		{"capstan-router", r.url, "capstan-router"},
	}
	results := map[string]wrkResult{}
	for _, tg := range targets {
		// Every target must answer the request correctly before it is timed.
		resp, err := http.Post(tg.url+"/v1/completions", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatalf("%s: %v", tg.name, err)
		}
		data, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(data), "text_completion") {
			t.Fatalf("%s answered %d %s", tg.name, resp.StatusCode, data)
		}
		runWrk(t, tg.url, luaPath, connections, 2*time.Second) // warm-up
		var profile chan []byte
		if out := os.Getenv("CAPSTAN_BENCH_PROFILE"); out != "" && tg.comm == "capstan-router" {
			profile = make(chan []byte, 1)
			go func() {
				profile <- fetch(t, fmt.Sprintf("%s/debug/pprof/profile?seconds=%d", r.url, int(duration.Seconds())-1))
			}()
		}
		cpuBefore := processCPU(t, tg.comm)
		res := runWrk(t, tg.url, luaPath, connections, duration)
		if tg.comm != "" && res.requests > 0 {
			res.cpuPerRequest = (processCPU(t, tg.comm) - cpuBefore) / time.Duration(res.requests)
		}
		if profile != nil {
			if err := os.WriteFile(os.Getenv("CAPSTAN_BENCH_PROFILE"), <-profile, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		results[tg.name] = res
		t.Logf("%-22s %9.0f req/s  p50 %8s  p99 %8s  proxy CPU/request %8s  errors %d", tg.name, res.rps, res.p50, res.p99, res.cpuPerRequest, res.errors)
	}
	direct, nginx, router := results["direct (one backend)"], results["nginx"], results["capstan-router"]

	// Added latency at half of the router's maximum rate, for every target
	// at the same rate.
	rate := router.rps / 2
	open := map[string]openResult{}
	for _, tg := range targets {
		var trace chan []byte
		if out := os.Getenv("CAPSTAN_BENCH_TRACE"); out != "" && tg.comm == "capstan-router" {
			// An execution trace of the router under the open loop, to
			// see where its tail latency comes from (go tool trace).
			trace = make(chan []byte, 1)
			go func() {
				trace <- fetch(t, fmt.Sprintf("%s/debug/pprof/trace?seconds=%d", r.url, int(duration.Seconds())-1))
			}()
		}
		open[tg.name] = openLoop(t, tg.url, body, rate, duration, connections)
		if trace != nil {
			if err := os.WriteFile(os.Getenv("CAPSTAN_BENCH_TRACE"), <-trace, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		t.Logf("open loop %-22s at %.0f/s: p50 %s p99 %s errors %d", tg.name, rate, open[tg.name].p50, open[tg.name].p99, open[tg.name].errors)
	}
	added := open["capstan-router"].p99 - open["direct (one backend)"].p99

	var b strings.Builder
	host, _ := os.Hostname()
	fmt.Fprintf(&b, "Run %s on %s (%d CPUs, shared), %d backends (fleet simulator, 4 output tokens, no simulated latency), wrk -t2 -c%d -d%s, keep-alive everywhere, access logs off.\n\n",
		time.Now().UTC().Format("2006-01-02 15:04 MST"), host, numCPU(), backends, connections, duration)
	fmt.Fprintf(&b, "| target | requests/s | p50 | p99 | proxy CPU per request | errors |\n|---|---:|---:|---:|---:|---:|\n")
	for _, tg := range targets {
		res := results[tg.name]
		cpu := "–"
		if res.cpuPerRequest > 0 {
			cpu = res.cpuPerRequest.Round(100 * time.Nanosecond).String()
		}
		fmt.Fprintf(&b, "| %s | %.0f | %s | %s | %s | %d |\n", tg.name, res.rps, res.p50, res.p99, cpu, res.errors)
	}
	fmt.Fprintf(&b, "\nrouter/nginx throughput: **%.2f** (target ≥ 0.80); router/haproxy: %.2f; router/direct: %.2f\n\n",
		router.rps/nginx.rps, router.rps/results["haproxy"].rps, router.rps/direct.rps)
	fmt.Fprintf(&b, "Open loop at %.0f requests/s (half the router's maximum) for %s over %d keep-alive connections, latency from each request's scheduled start:\n\n", rate, duration, connections)
	fmt.Fprintf(&b, "| target | sent | p50 | p99 | errors |\n|---|---:|---:|---:|---:|\n")
	for _, tg := range targets {
		o := open[tg.name]
		fmt.Fprintf(&b, "| %s | %d | %s | %s | %d |\n", tg.name, o.sent, o.p50, o.p99, o.errors)
	}
	fmt.Fprintf(&b, "\np99 added by the router: **%s** (target ≤ 1ms)\n", added.Round(10*time.Microsecond))
	routerBin, err := cluster.Binary("capstan-router")
	if err != nil {
		t.Fatal(err)
	}
	routerPid, err := cluster.PidOf(routerBin)
	if err != nil {
		t.Fatal(err)
	}
	routerRSS, err := cluster.MemoryMiB(routerPid, "VmHWM")
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(&b, "\ncapstan-router peak RSS over the run: %.0f MiB (environment from the manifests: %s)\n",
		routerRSS, strings.Join(installed.Env, " "))
	t.Log("\n" + b.String())
	if out := os.Getenv("CAPSTAN_BENCH_OUT"); out != "" {
		if err := os.WriteFile(out, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for name, res := range results {
		if res.errors > 0 {
			t.Errorf("%s: %d errors", name, res.errors)
		}
	}
}

func numCPU() int {
	data, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	return strings.Count(string(data), "processor\t:")
}

func envDuration(t *testing.T, name string, def time.Duration) time.Duration {
	if v := os.Getenv(name); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		return d
	}
	return def
}

func envInt(t *testing.T, name string, def int) int {
	if v := os.Getenv(name); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		return n
	}
	return def
}

// startNginx runs nginx as a keep-alive reverse proxy in front of upstreams.
func startNginx(t *testing.T, dir string, upstreams []string) string {
	t.Helper()
	addr := cluster.FreeAddr(t)
	var servers strings.Builder
	for _, u := range upstreams {
		fmt.Fprintf(&servers, "    server %s;\n", u)
	}
	conf := fmt.Sprintf(`worker_processes 2;
user root;
pid %[1]s/nginx.pid;
error_log stderr warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %[1]s/body;
  proxy_temp_path %[1]s/proxy;
  upstream models {
    least_conn;
%[2]s    keepalive 256;
  }
  server {
    listen %[3]s;
    location / {
      proxy_pass http://models;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
`, dir, servers.String(), addr)
	path := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	nginx, _ := exec.LookPath("nginx")
	p, err := testCluster.Run("nginx", nginx, "-e", "stderr", "-c", path, "-g", "daemon off;")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Stop(5 * time.Second) })
	waitUp(t, p, "http://"+addr)
	return "http://" + addr
}

// startHAProxy runs HAProxy as a keep-alive reverse proxy in front of
// upstreams.
func startHAProxy(t *testing.T, dir string, upstreams []string) string {
	t.Helper()
	addr := cluster.FreeAddr(t)
	var servers strings.Builder
	for i, u := range upstreams {
		fmt.Fprintf(&servers, "  server s%d %s\n", i, u)
	}
	conf := fmt.Sprintf(`global
  maxconn 8192
  nbthread 2
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
  http-reuse always
frontend api
  bind %s
  default_backend models
backend models
  balance leastconn
%s`, addr, servers.String())
	path := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	haproxy, _ := exec.LookPath("haproxy")
	p, err := testCluster.Run("haproxy", haproxy, "-f", path, "-db")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Stop(5 * time.Second) })
	waitUp(t, p, "http://"+addr)
	return "http://" + addr
}

// waitUp waits until a proxy accepts HTTP (any status).
func waitUp(t *testing.T, p *cluster.Process, url string) {
	t.Helper()
	err := cluster.WaitFor(context.Background(), 10*time.Second, url+" to accept requests", func(ctx context.Context) (bool, error) {
		if exited, err := p.Exited(); exited {
			return false, p.Failure("exited: " + err.Error())
		}
		resp, err := http.Get(url + "/v1/models")
		if err != nil {
			return false, err
		}
		resp.Body.Close()
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

type wrkResult struct {
	rps           float64
	requests      int
	p50, p99      time.Duration
	errors        int
	cpuPerRequest time.Duration
}

var (
	wrkRPS      = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	wrkRequests = regexp.MustCompile(`(\d+) requests in`)
	wrkLatency  = regexp.MustCompile(`(?m)^\s+(50|99)(?:\.000)?%\s+([0-9.]+)(us|ms|s)\s*$`)
	wrkErrors   = regexp.MustCompile(`Non-2xx or 3xx responses: (\d+)|Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)`)
)

func runWrk(t *testing.T, url, script string, connections int, d time.Duration) wrkResult {
	t.Helper()
	out, err := exec.Command("wrk", "-t2", "-c"+strconv.Itoa(connections), "-d"+d.String(), "--latency", "-s", script, url+"/v1/completions").CombinedOutput()
	if err != nil {
		t.Fatalf("wrk: %v\n%s", err, out)
	}
	var res wrkResult
	m := wrkRPS.FindSubmatch(out)
	if m == nil {
		t.Fatalf("no Requests/sec in wrk's output:\n%s", out)
	}
	res.rps, _ = strconv.ParseFloat(string(m[1]), 64)
	if m := wrkRequests.FindSubmatch(out); m != nil {
		res.requests, _ = strconv.Atoi(string(m[1]))
	}
	for _, m := range wrkLatency.FindAllSubmatch(out, -1) {
		v, _ := strconv.ParseFloat(string(m[2]), 64)
		unit := map[string]time.Duration{"us": time.Microsecond, "ms": time.Millisecond, "s": time.Second}[string(m[3])]
		d := time.Duration(v * float64(unit))
		if string(m[1]) == "50" {
			res.p50 = d
		} else {
			res.p99 = d
		}
	}
	for _, m := range wrkErrors.FindAllSubmatch(out, -1) {
		for _, g := range m[1:] {
			n, _ := strconv.Atoi(string(g))
			res.errors += n
		}
	}
	return res
}

type openResult struct {
	sent, errors int
	p50, p99     time.Duration
}

// openLoop sends requests at a fixed rate for d over a fixed set of
// keep-alive connections, the way wrk2 does (it is not packaged in Debian):
// request k is due at start + k/rate; each connection takes the next due
// request, waits for its time, sends it and reads the response, and the
// latency is measured from the due time. A stall therefore counts against
// every request it delays, including those that wait for a free connection
// (no coordinated omission, unlike a closed loop such as wrk's). Requests
// are written from a prepared buffer and responses read with
// http.ReadResponse: the generator shares the machine with what it
// measures, so it must cost little per request.
func openLoop(t *testing.T, url, body string, rate float64, d time.Duration, connections int) openResult {
	t.Helper()
	host := strings.TrimPrefix(url, "http://")
	request := []byte(fmt.Sprintf("POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
		host, len(body), body))
	interval := time.Duration(float64(time.Second) / rate)
	n := int(d / interval)
	latencies := make([]time.Duration, n)
	failed := make([]bool, n)
	var next atomic.Int64
	start := time.Now().Add(10 * time.Millisecond) // every connection is ready for the first
	var wg sync.WaitGroup
	for range connections {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var conn net.Conn
			var br *bufio.Reader
			defer func() {
				if conn != nil {
					conn.Close()
				}
			}()
			for {
				k := int(next.Add(1) - 1)
				if k >= n {
					return
				}
				at := start.Add(time.Duration(k) * interval)
				time.Sleep(time.Until(at))
				err := func() error {
					if conn == nil {
						c, err := net.DialTimeout("tcp", host, 10*time.Second)
						if err != nil {
							return err
						}
						conn, br = c, bufio.NewReader(c)
					}
					conn.SetDeadline(time.Now().Add(10 * time.Second))
					if _, err := conn.Write(request); err != nil {
						return err
					}
					resp, err := http.ReadResponse(br, nil)
					if err != nil {
						return err
					}
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if err == nil && resp.StatusCode != http.StatusOK {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
					if resp.Close {
						conn.Close()
						conn = nil
					}
					return err
				}()
				latencies[k] = time.Since(at)
				if err != nil {
					failed[k] = true
					if conn != nil {
						conn.Close()
						conn = nil
					}
				}
			}
		}()
	}
	wg.Wait()
	res := openResult{sent: n}
	for _, f := range failed {
		if f {
			res.errors++
		}
	}
	slices.Sort(latencies)
	res.p50 = latencies[n/2].Round(time.Microsecond)
	res.p99 = latencies[n*99/100].Round(time.Microsecond)
	return res
}

// processCPU sums the user and system CPU time of every process named comm
// (nginx's and HAProxy's workers included). netns.sh gives the benchmark a
// PID namespace but not a /proc of its own, so a process of the same name
// elsewhere on the machine would count too; the benchmark machine runs none.
func processCPU(t *testing.T, comm string) time.Duration {
	t.Helper()
	if comm == "" {
		return 0
	}
	stats, err := filepath.Glob("/proc/[0-9]*/stat")
	if err != nil {
		t.Fatal(err)
	}
	var ticks int64
	for _, path := range stats {
		data, err := os.ReadFile(path)
		if err != nil {
			continue // exited meanwhile
		}
		open, close := strings.IndexByte(string(data), '('), strings.LastIndexByte(string(data), ')')
		if open < 0 || close < open || string(data[open+1:close]) != comm {
			continue
		}
		// After "(comm) ", utime and stime are the 12th and 13th fields.
		f := strings.Fields(string(data[close+2:]))
		if len(f) < 13 {
			continue
		}
		u, _ := strconv.ParseInt(f[11], 10, 64)
		s, _ := strconv.ParseInt(f[12], 10, 64)
		ticks += u + s
	}
	const clockTicks = 100 // USER_HZ on Linux
	return time.Duration(ticks) * time.Second / clockTicks
}

func fetch(t *testing.T, url string) []byte {
	resp, err := http.Get(url)
	if err != nil {
		t.Error(err)
		return nil
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return data
}
