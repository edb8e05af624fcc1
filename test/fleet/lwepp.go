package fleet

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spf13/pflag"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"
	lwepp "sigs.k8s.io/gateway-api-inference-extension/pkg/lwepp/server"
)

// LWEPP lets the fleet play the pods of the Gateway API Inference
// Extension's lightweight endpoint picker (image
// registry.k8s.io/gateway-api-inference-extension/lwepp, as its conformance
// suite deploys): for each such pod it runs lwepp itself, built from the
// module go.mod pins, with the pod's arguments.
//
// lwepp listens on every interface (":port"), so two pods' pickers in one
// network namespace would clash on their ports (9002, 9003, 9090). Each
// process therefore gets ports of its own on loopback instead (its port
// flags are given again after the pod's: the last one wins), and the fleet
// forwards the pod's IP and ports to them, byte for byte: TLS, HTTP/2 and
// gRPC pass through untouched.
//
// The pods' readiness probe asks lwepp's gRPC health service for
// "inference-extension", which lwepp reports SERVING once it has synced its
// pool. The fleet plays that probe: it withholds the pod's readiness from
// kwok (which would mark it Ready at once) with the unready annotation from
// the moment it sees the pod, and opens the forwarders and lifts the
// annotation once lwepp reports SERVING; if lwepp exits, the pod loses
// readiness until lwepp, restarted, serves again.
type LWEPP struct {
	// Binary is the path of lwepp (cmd/lwepp of
	// sigs.k8s.io/gateway-api-inference-extension).
	Binary string
	// Kubeconfig returns the kubeconfig a pod's lwepp reaches the API server
	// with, in place of the in-cluster config of a real pod: one of the
	// pod's ServiceAccount gives it exactly the permissions a real one has.
	Kubeconfig func(ctx context.Context, pod *corev1.Pod) (string, error)
	// LogDir is where each lwepp's output goes, as
	// lwepp-<namespace>-<pod>.log.
	LogDir string
}

// lweppImage identifies the lwepp container of a pod.
const lweppImage = "gateway-api-inference-extension/lwepp"

// lweppContainer returns the pod's lwepp container, or nil.
func lweppContainer(pod *corev1.Pod) *corev1.Container {
	for i, c := range pod.Spec.Containers {
		if strings.Contains(c.Image, lweppImage) {
			return &pod.Spec.Containers[i]
		}
	}
	return nil
}

// lweppPorts reads the ports lwepp serves with these arguments, with
// lwepp's own flag definitions and defaults: ext_proc gRPC, gRPC health,
// metrics.
func lweppPorts(args []string) ([3]int, error) {
	fs := pflag.NewFlagSet("lwepp", pflag.ContinueOnError)
	// lwepp's main also takes zap's and controller-runtime's flags.
	fs.ParseErrorsAllowlist.UnknownFlags = true
	fs.SetOutput(io.Discard)
	opts := lwepp.NewOptions()
	opts.AddFlags(fs)
	if err := fs.Parse(args); err != nil {
		return [3]int{}, fmt.Errorf("lwepp arguments %q: %w", args, err)
	}
	return [3]int{opts.GRPCPort, opts.GRPCHealthPort, opts.MetricsPort}, nil
}

// unreadyAnnotation "true" withholds a pod's readiness from kwok, or takes
// it away (see test/cluster/stages.yaml).
const unreadyAnnotation = "sim.capstan.dev/unready"

// lweppHealthService is the gRPC health service lwepp reports SERVING once
// it has synced its pool, and the pods' readiness probe checks.
const lweppHealthService = "inference-extension"

// lweppPod is one pod's lwepp process and the forwarders from the pod's IP.
type lweppPod struct {
	ip     string
	logger klog.Logger
	cancel context.CancelFunc
	done   chan struct{}
	// serving is set while lwepp serves on the pod's ports.
	serving atomic.Bool
}

// startLWEPP runs lwepp for a pod until stop is called, restarting it when
// it exits. ready is called with true whenever lwepp starts serving on the
// pod's ports, with false whenever it stops before stop is called.
func startLWEPP(pod *corev1.Pod, cfg *LWEPP, logger klog.Logger, ready func(bool)) *lweppPod {
	ctx, cancel := context.WithCancel(context.Background())
	p := &lweppPod{
		ip:     pod.Status.PodIP,
		logger: klog.LoggerWithValues(logger, "pod", klog.KObj(pod), "ip", pod.Status.PodIP),
		cancel: cancel,
		done:   make(chan struct{}),
	}
	go func() {
		defer close(p.done)
		for {
			err := p.run(ctx, pod, cfg, ready)
			if ctx.Err() != nil {
				return
			}
			// As the kubelet restarts a container that exits (here
			// without its back-off); a port another process took
			// between loopbackPorts and lwepp's bind is one cause.
			p.logger.Error(err, "lwepp stopped; restarting it", "after", lweppRestartDelay)
			if p.serving.Swap(false) {
				ready(false)
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(lweppRestartDelay):
			}
		}
	}()
	return p
}

// stop ends the process (SIGTERM, as the kubelet does, then SIGKILL after
// a grace period) and closes the pod's ports and connections.
func (p *lweppPod) stop() {
	p.cancel()
	<-p.done
}

// lweppRestartDelay is how long an exited lwepp stays down.
const lweppRestartDelay = time.Second

// lweppGrace bounds lwepp's graceful stop: its gRPC servers wait for open
// streams.
const lweppGrace = 5 * time.Second

func (p *lweppPod) run(ctx context.Context, pod *corev1.Pod, cfg *LWEPP, ready func(bool)) error {
	c := lweppContainer(pod)
	podPorts, err := lweppPorts(c.Args)
	if err != nil {
		return err
	}
	local, err := loopbackPorts(len(podPorts))
	if err != nil {
		return err
	}
	kubeconfig, err := cfg.Kubeconfig(ctx, pod)
	if err != nil {
		return fmt.Errorf("a kubeconfig for lwepp: %w", err)
	}
	args := append(append([]string{}, c.Args...),
		"--grpc-port="+strconv.Itoa(local[0]), "--grpc-health-port="+strconv.Itoa(local[1]),
		"--metrics-port="+strconv.Itoa(local[2]), "--kubeconfig="+kubeconfig)
	logPath := filepath.Join(cfg.LogDir, fmt.Sprintf("lwepp-%s-%s.log", pod.Namespace, pod.Name))
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logFile.Close()
	cmd := exec.Command(cfg.Binary, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Killed with the fleet even if the fleet dies without stopping it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting lwepp: %w", err)
	}
	var waitErr error
	exited := make(chan struct{})
	go func() { waitErr = cmd.Wait(); close(exited) }()
	defer func() {
		select {
		case <-exited:
			return
		default:
		}
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(lweppGrace):
			_ = cmd.Process.Kill()
			<-exited
		}
	}()
	p.logger.V(2).Info("Started lwepp", "args", args, "log", logPath)

	if err := waitServing(ctx, local[1], exited); err != nil {
		if errors.Is(err, errExited) {
			err = fmt.Errorf("%w: %v", err, waitErr)
		}
		return fmt.Errorf("lwepp (log %s): %w", logPath, err)
	}
	var fwds []*forwarder
	defer func() {
		for _, f := range fwds {
			f.close()
		}
	}()
	for i, port := range podPorts {
		f, err := forward(net.JoinHostPort(p.ip, strconv.Itoa(port)), net.JoinHostPort("127.0.0.1", strconv.Itoa(local[i])), p.logger)
		if err != nil {
			return err
		}
		fwds = append(fwds, f)
	}
	p.logger.V(2).Info("lwepp is serving", "ports", podPorts)
	p.serving.Store(true)
	ready(true)
	select {
	case <-ctx.Done():
		return nil
	case <-exited:
		return fmt.Errorf("lwepp exited (log %s): %v", logPath, waitErr)
	}
}

// loopbackPorts finds n distinct free ports on loopback.
func loopbackPorts(n int) ([]int, error) {
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// errExited is waitServing's error when lwepp exits before serving.
var errExited = errors.New("lwepp exited before serving")

// waitServing polls lwepp's gRPC health service until it reports its pool
// synced, the process exits, or ctx ends.
func waitServing(ctx context.Context, healthPort int, exited <-chan struct{}) error {
	conn, err := grpc.NewClient(net.JoinHostPort("127.0.0.1", strconv.Itoa(healthPort)),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	health := healthpb.NewHealthClient(conn)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		check, cancel := context.WithTimeout(ctx, time.Second)
		resp, err := health.Check(check, &healthpb.HealthCheckRequest{Service: lweppHealthService})
		cancel()
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-exited:
			return errExited
		case <-tick.C:
		}
	}
}

// forwarder copies the connections it accepts on one address to another,
// both ways.
type forwarder struct {
	l      net.Listener
	to     string
	logger klog.Logger

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

func forward(from, to string, logger klog.Logger) (*forwarder, error) {
	l, err := net.Listen("tcp", from)
	if err != nil {
		return nil, err
	}
	f := &forwarder{l: l, to: to, logger: logger, conns: map[net.Conn]struct{}{}}
	f.wg.Go(f.serve)
	return f, nil
}

func (f *forwarder) serve() {
	for {
		in, err := f.l.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				f.logger.Error(err, "Accepting", "address", f.l.Addr())
			}
			return
		}
		f.wg.Go(func() { f.pipe(in) })
	}
}

// pipe connects one accepted connection to the target until either side
// closes it or the forwarder is closed.
func (f *forwarder) pipe(in net.Conn) {
	out, err := net.DialTimeout("tcp", f.to, 5*time.Second)
	if err != nil {
		in.Close()
		return
	}
	if !f.track(in, out) {
		in.Close()
		out.Close()
		return
	}
	defer f.untrack(in, out)
	done := make(chan struct{}, 2)
	copyAndClose := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		done <- struct{}{}
	}
	go copyAndClose(out, in)
	go copyAndClose(in, out)
	// When one direction ends the connection is done: closing both ends
	// the other copy too.
	<-done
	in.Close()
	out.Close()
	<-done
}

func (f *forwarder) track(conns ...net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return false
	}
	for _, c := range conns {
		f.conns[c] = struct{}{}
	}
	return true
}

func (f *forwarder) untrack(conns ...net.Conn) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range conns {
		delete(f.conns, c)
	}
}

// close stops accepting, cuts every connection, and waits for the copies
// to end.
func (f *forwarder) close() {
	f.l.Close()
	f.mu.Lock()
	f.closed = true
	for c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}
