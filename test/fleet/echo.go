package fleet

import (
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
)

// EchoAnnotation "true" makes a pod an echo backend instead of a model
// server. Pods running the Gateway API conformance suite's echo-basic image
// are echo backends without it.
const EchoAnnotation = "sim.capstan.dev/echo"

// Echo backends listen where echo-basic does: HTTP on 3000 and 3001.
var echoPorts = []int32{3000, 3001}

// echoServing is how an echo backend serves: its ports, handler, and the
// server's protocols (nil: HTTP/1.1). A pod whose container sets H2C_PORT
// is the Inference Extension conformance suite's appProtocol backend, and
// is served as echo-basic serves its two ports: HTTP/1.1 on HTTP_PORT
// (default 3000), and on H2C_PORT HTTP/2 with prior knowledge, where an
// HTTP/1.1 request that does not ask to upgrade gets echo-basic's 400
// "Expected h2c request". One server serves both ports, so it also speaks
// HTTP/2 on HTTP_PORT; there a stream is reset, where echo-basic's HTTP/1.1
// server would answer the preface in HTTP/1.1: either way the request fails.
func (s *podServer) echoServing(pod *corev1.Pod) ([]int32, http.Handler, *http.Protocols) {
	httpPort, h2cPort := echoEnvPort(pod, "HTTP_PORT", 3000), echoEnvPort(pod, "H2C_PORT", 0)
	if h2cPort == 0 {
		return echoPorts, s.echoHandler(), nil
	}
	h2c := strconv.Itoa(int(h2cPort))
	echo := s.echoHandler()
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var port string
		if addr, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
			_, port, _ = net.SplitHostPort(addr.String())
		}
		switch {
		case port == h2c && r.ProtoMajor != 2 && r.Header.Get("Upgrade") != "h2c":
			w.WriteHeader(http.StatusBadRequest)
			_, _ = w.Write([]byte("Expected h2c request"))
		case port != h2c && r.ProtoMajor == 2:
			panic(http.ErrAbortHandler)
		default:
			echo.ServeHTTP(w, r)
		}
	})
	protocols := new(http.Protocols)
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	return []int32{httpPort, h2cPort}, handler, protocols
}

// echoEnvPort is the port a container of the pod sets in the environment
// variable name, or def.
func echoEnvPort(pod *corev1.Pod, name string, def int32) int32 {
	for _, c := range pod.Spec.Containers {
		for _, e := range c.Env {
			if e.Name != name {
				continue
			}
			if n, err := strconv.ParseUint(e.Value, 10, 16); err == nil && n > 0 {
				return int32(n)
			}
		}
	}
	return def
}

// isEcho reports whether the pod should be served as an echo backend.
func isEcho(pod *corev1.Pod) bool {
	if pod.Annotations[EchoAnnotation] == "true" {
		return true
	}
	for _, c := range pod.Spec.Containers {
		if strings.Contains(c.Image, "gateway-api/echo-basic") {
			return true
		}
	}
	return false
}

// echoed is what an echo backend answers: the request as it arrived and who
// answered it, in the shape the Gateway API conformance suite reads.
type echoed struct {
	Path      string              `json:"path"`
	Host      string              `json:"host"`
	Method    string              `json:"method"`
	Proto     string              `json:"proto"`
	Headers   map[string][]string `json:"headers"`
	HTTPPort  string              `json:"httpPort"`
	Namespace string              `json:"namespace"`
	Ingress   string              `json:"ingress"`
	Service   string              `json:"service"`
	Pod       string              `json:"pod"`
}

var statusPath = regexp.MustCompile(`^/status/(\d\d\d)$`)

// echoHandler serves the behaviour of the conformance suite's echo-basic
// backend: /health, /status/<code>, and an echo of every other request,
// honouring the ?delay= parameter and X-Echo-Set-Header.
func (s *podServer) echoHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/health", func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write([]byte("OK"))
	})
	mux.HandleFunc("/status/", func(w http.ResponseWriter, r *http.Request) {
		code := http.StatusBadRequest
		if m := statusPath.FindStringSubmatch(r.RequestURI); m != nil {
			code, _ = strconv.Atoi(m[1])
		}
		w.WriteHeader(code)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if d := r.FormValue("delay"); d != "" {
			delay, err := time.ParseDuration(d)
			if err != nil {
				writeJSON(w, http.StatusInternalServerError, map[string]string{"message": err.Error()})
				return
			}
			if !sleep(r.Context(), delay) {
				return
			}
		}
		var port string
		if addr, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
			_, port, _ = net.SplitHostPort(addr.String())
		}
		for _, kv := range r.Header.Values("X-Echo-Set-Header") {
			for _, pair := range strings.Split(kv, ",") {
				name, value, _ := strings.Cut(strings.TrimSpace(pair), ":")
				w.Header().Add(name, strings.TrimSpace(value))
			}
		}
		w.Header().Set("X-Content-Type-Options", "nosniff")
		writeJSON(w, http.StatusOK, echoed{
			Path: r.RequestURI, Host: r.Host, Method: r.Method, Proto: r.Proto, Headers: r.Header,
			HTTPPort: port, Namespace: s.key.Namespace, Pod: s.key.Name,
		})
	})
	// echo-basic collapses doubled slashes before routing.
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.URL.Path = strings.ReplaceAll(r.URL.Path, "//", "/")
		mux.ServeHTTP(w, r)
	})
}
