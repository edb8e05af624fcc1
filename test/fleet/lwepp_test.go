package fleet

import (
	"bufio"
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2/ktesting"
)

// The ports are read with lwepp's own flags and defaults, whatever other
// flags (zap's, controller-runtime's) the pod passes.
func TestLWEPPPorts(t *testing.T) {
	for name, tc := range map[string]struct {
		args []string
		want [3]int
	}{
		"defaults": {nil, [3]int{9002, 9003, 9090}},
		"the conformance suite's": {
			[]string{"--pool-name", "primary-inference-pool", "--pool-namespace", "inference-conformance-app-backend",
				"--zap-encoder", "json", "--grpc-port", "9002", "--grpc-health-port", "9003"},
			[3]int{9002, 9003, 9090},
		},
		"all set, the last one wins": {
			[]string{"--grpc-port=1", "--zap-log-level=debug", "--grpc-health-port=2", "--metrics-port=3", "--grpc-port=4"},
			[3]int{4, 2, 3},
		},
	} {
		t.Run(name, func(t *testing.T) {
			got, err := lweppPorts(tc.args)
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Errorf("ports %v, want %v", got, tc.want)
			}
		})
	}
	if _, err := lweppPorts([]string{"--grpc-port=x"}); err == nil {
		t.Error("a port that is not a number was accepted")
	}
}

func TestLWEPPContainer(t *testing.T) {
	pod := &corev1.Pod{Spec: corev1.PodSpec{Containers: []corev1.Container{
		{Name: "sidecar", Image: "registry.k8s.io/pause:3.10"},
		{Name: "epp", Image: "registry.k8s.io/gateway-api-inference-extension/lwepp:v1.6.0", Args: []string{"--pool-name=p"}},
	}}}
	c := lweppContainer(pod)
	if c == nil || c.Name != "epp" {
		t.Fatalf("lwepp container %v, want epp", c)
	}
	pod.Spec.Containers = pod.Spec.Containers[:1]
	if c := lweppContainer(pod); c != nil {
		t.Errorf("a pod without lwepp has lwepp container %s", c.Name)
	}
}

// A forwarder copies bytes both ways, and closing it cuts the connections
// it carries and refuses new ones.
func TestForwarder(t *testing.T) {
	logger, _ := ktesting.NewTestContext(t)
	backend, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer backend.Close()
	// The backend answers each line with it in upper case.
	go func() {
		for {
			c, err := backend.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					if _, err := io.WriteString(c, strings.ToUpper(line)); err != nil {
						return
					}
				}
			}()
		}
	}()

	f, err := forward("127.0.0.1:0", backend.Addr().String(), logger)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			f.close()
		}
	}()
	c, err := net.Dial("tcp", f.l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	for _, line := range []string{"hello\n", "again\n"} {
		if _, err := io.WriteString(c, line); err != nil {
			t.Fatal(err)
		}
		got, err := r.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(strings.ToUpper(line), got); diff != "" {
			t.Errorf("answer (-want +got):\n%s", diff)
		}
	}

	f.close()
	closed = true
	if err := c.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := r.ReadByte(); err != io.EOF {
		t.Errorf("reading after the forwarder closed: %v, want EOF", err)
	}
	if c, err := net.Dial("tcp", f.l.Addr().String()); err == nil {
		c.Close()
		t.Error("the closed forwarder accepted a connection")
	}
}

// An lwepp that exits is restarted, the pod is never reported serving, and
// stop ends the restarts.
func TestLWEPPRestartsAnExitedProcess(t *testing.T) {
	logger, _ := ktesting.NewTestContext(t)
	dir := t.TempDir()
	runs := filepath.Join(dir, "runs")
	bin := filepath.Join(dir, "lwepp")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\necho \"$@\" >> "+runs+"\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "epp"},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "epp",
			Image: "registry.k8s.io/gateway-api-inference-extension/lwepp:v1.6.0", Args: []string{"--pool-name=p"}}}},
		Status: corev1.PodStatus{PodIP: "127.0.0.1"},
	}
	cfg := &LWEPP{Binary: bin, LogDir: dir, Kubeconfig: func(context.Context, *corev1.Pod) (string, error) { return "kc", nil }}
	var served atomic.Bool
	p := startLWEPP(pod, cfg, logger, func(serving bool) { served.Store(served.Load() || serving) })
	deadline := time.Now().Add(10 * time.Second)
	for {
		data, _ := os.ReadFile(runs)
		if lines := strings.Split(strings.TrimSpace(string(data)), "\n"); len(lines) >= 2 {
			if !strings.HasPrefix(lines[0], "--pool-name=p --grpc-port=") || !strings.HasSuffix(lines[0], " --kubeconfig=kc") {
				t.Errorf("lwepp ran with %q, want the pod's arguments, then its own ports and the kubeconfig", lines[0])
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("lwepp ran %d times in 10s, want it restarted", len(strings.Fields(string(data))))
		}
		time.Sleep(50 * time.Millisecond)
	}
	stopped := make(chan struct{})
	go func() { p.stop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("stop did not return")
	}
	if served.Load() {
		t.Error("an lwepp that never served was reported serving")
	}
}
