package fleet

import (
	"maps"
	"net"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
)

// EchoAnnotation "true" makes a pod an echo backend instead of a model
// server. Pods running the Gateway API conformance suite's echo-basic image
// are echo backends without it.
const EchoAnnotation = "sim.capstan.dev/echo"

// echoPorts maps where an echo backend listens to whether echo-basic
// serves h2c there: each of its containers' HTTP_PORT (HTTP/1.1) and
// H2C_PORT (default 3000 and 3001; the Inference Extension's suite runs
// three in one pod, on 3000/3001, 3002/3003 and 3004/3005).
func echoPorts(pod *corev1.Pod) map[int32]bool {
	ports := map[int32]bool{}
	for _, c := range pod.Spec.Containers {
		for name, def := range map[string]int32{"HTTP_PORT": 3000, "H2C_PORT": 3001} {
			port := def
			for _, e := range c.Env {
				if n, err := strconv.ParseInt(e.Value, 10, 32); e.Name == name && err == nil {
					port = int32(n)
				}
			}
			ports[port] = name == "H2C_PORT"
		}
	}
	return ports
}

// echoServing is how an echo backend serves: its ports, handler, and the
// server's protocols. As echo-basic, each port of echoPorts speaks
// HTTP/1.1 or h2c (HTTP/2 with prior knowledge), where an HTTP/1.1 request
// that does not ask to upgrade gets echo-basic's 400 "Expected h2c
// request". One server serves every port, so it also speaks HTTP/2 on the
// HTTP/1.1 ports; there a stream is reset, where echo-basic's HTTP/1.1
// server would answer the preface in HTTP/1.1: either way the request
// fails.
func (s *podServer) echoServing(pod *corev1.Pod) ([]int32, http.Handler, *http.Protocols) {
	ports := echoPorts(pod)
	echo := s.echoHandler()
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		port, _ := strconv.ParseInt(localPort(r), 10, 32)
		switch h2c := ports[int32(port)]; {
		case h2c && r.ProtoMajor != 2 && r.Header.Get("Upgrade") != "h2c":
			w.WriteHeader(http.StatusBadRequest)
			_, _ = w.Write([]byte("Expected h2c request"))
		case !h2c && r.ProtoMajor == 2:
			panic(http.ErrAbortHandler)
		default:
			echo.ServeHTTP(w, r)
		}
	})
	protocols := new(http.Protocols)
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	return slices.Sorted(maps.Keys(ports)), handler, protocols
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
		for _, kv := range r.Header.Values("X-Echo-Set-Header") {
			for _, pair := range strings.Split(kv, ",") {
				name, value, _ := strings.Cut(strings.TrimSpace(pair), ":")
				w.Header().Add(name, strings.TrimSpace(value))
			}
		}
		w.Header().Set("X-Content-Type-Options", "nosniff")
		writeJSON(w, http.StatusOK, echoed{
			Path: r.RequestURI, Host: r.Host, Method: r.Method, Proto: r.Proto, Headers: r.Header,
			HTTPPort: localPort(r), Namespace: s.key.Namespace, Pod: s.key.Name,
		})
	})
	// echo-basic collapses doubled slashes before routing.
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.URL.Path = strings.ReplaceAll(r.URL.Path, "//", "/")
		mux.ServeHTTP(w, r)
	})
}

// localPort is the port a request arrived on.
func localPort(r *http.Request) string {
	addr, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
	if !ok {
		return ""
	}
	_, port, _ := net.SplitHostPort(addr.String())
	return port
}
