package fleet

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2/ktesting"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
)

// An echo backend with H2C_PORT in its environment is the Inference
// Extension suite's appProtocol backend: HTTP/1.1 on HTTP_PORT, HTTP/2 with
// prior knowledge on H2C_PORT, where an HTTP/1.1 request gets echo-basic's
// 400.
func TestEchoBackendH2C(t *testing.T) {
	var ports [2]int
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ports[i] = l.Addr().(*net.TCPAddr).Port
		l.Close()
	}
	pod := testPod(modelserver.VLLM, nil)
	pod.Labels = nil
	pod.Status.PodIP = "127.0.0.1"
	pod.Spec.Containers = []corev1.Container{{Name: "echoserver", Image: "gcr.io/k8s-staging-gateway-api/echo-basic:v20251106",
		Env: []corev1.EnvVar{{Name: "HTTP_PORT", Value: strconv.Itoa(ports[0])}, {Name: "H2C_PORT", Value: strconv.Itoa(ports[1])}}}}
	logger, _ := ktesting.NewTestContext(t)
	s := newPodServer(pod, Options{}.withDefaults(), new(atomic.Int64), logger)
	s.update(pod)
	t.Cleanup(s.kill)
	if want := []int32{int32(min(ports[0], ports[1])), int32(max(ports[0], ports[1]))}; !slices.Equal(s.ports, want) {
		t.Fatalf("echo ports %v, want %v", s.ports, want)
	}
	httpURL, h2cURL := fmt.Sprintf("http://127.0.0.1:%d/p", ports[0]), fmt.Sprintf("http://127.0.0.1:%d/p", ports[1])
	h1 := &http.Client{Transport: &http.Transport{}}
	h2t := &http.Transport{Protocols: new(http.Protocols)}
	h2t.Protocols.SetUnencryptedHTTP2(true)
	h2 := &http.Client{Transport: h2t}
	t.Cleanup(h1.CloseIdleConnections)
	t.Cleanup(h2.CloseIdleConnections)
	waitDial(t, fmt.Sprintf("127.0.0.1:%d", ports[1]), "ok")

	for _, tc := range []struct {
		name   string
		client *http.Client
		url    string
		status int
		proto  string // the echoed protocol, "" for no echo
		body   string
		fails  bool
	}{
		{"HTTP/1.1 on HTTP_PORT", h1, httpURL, 200, "HTTP/1.1", "", false},
		{"h2c on H2C_PORT", h2, h2cURL, 200, "HTTP/2.0", "", false},
		{"HTTP/1.1 on H2C_PORT", h1, h2cURL, 400, "", "Expected h2c request", false},
		{"h2c on HTTP_PORT", h2, httpURL, 0, "", "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := tc.client.Get(tc.url)
			if tc.fails {
				if err == nil {
					resp.Body.Close()
					t.Fatalf("answered %d, want a failure", resp.StatusCode)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			data, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tc.status {
				t.Fatalf("%d %s, want %d", resp.StatusCode, data, tc.status)
			}
			if tc.body != "" && string(data) != tc.body {
				t.Errorf("body %q, want %q", data, tc.body)
			}
			if tc.proto != "" {
				var got echoed
				if err := json.Unmarshal(data, &got); err != nil || got.Proto != tc.proto || got.Pod != "llama-0" {
					t.Errorf("echo %s (%v), want proto %s from llama-0", data, err, tc.proto)
				}
			}
		})
	}
}
