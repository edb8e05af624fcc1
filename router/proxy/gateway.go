package proxy

import (
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/capstan-dev/capstan/router/route"
)

// ModelHeader carries the "model" of a JSON request body on requests that
// arrive through Gateway listeners, set before routes are matched so that an
// HTTPRoute can select a model with an ordinary header match. A value the
// client sends is removed: the header says what the body says, or is
// absent.
const ModelHeader = "X-Capstan-Model"

// GatewayHandler returns the handler for a Gateway listen address: it
// serves what the current HTTP table routes to that address.
func (h *Handler) GatewayHandler(address string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { h.serveGateway(w, r, address) })
}

func (h *Handler) serveGateway(w http.ResponseWriter, r *http.Request, address string) {
	x := newExchange(w, r)
	x.viaGateway = true
	defer h.finish(r, &x)
	if err := normalizePath(r); err != nil {
		x.status = http.StatusBadRequest
		gatewayError(w, r, x.status, invalidRequest, codeBadPath, err.Error(), 0)
		return
	}

	host := route.RequestHost(r.Host)
	var l *route.Listener
	if p := h.opts.Gateways().Port(address); p != nil {
		l = p.Listener(host)
	}
	if l == nil {
		x.status = http.StatusNotFound
		gatewayError(w, r, x.status, invalidRequest, codeRouteNotFound, fmt.Sprintf("no Gateway listener on %s accepts host %q", address, host), 0)
		return
	}
	x.gateway = l.GatewayName()

	// The body is read once: for the model header, for prefix affinity,
	// and to be replayed if an attempt fails to connect.
	delete(r.Header, ModelHeader)
	var body []byte
	var prefix []byte
	if r.ContentLength != 0 && r.Body != http.NoBody {
		buf := h.readBody(w, r, &x)
		if buf == nil {
			return
		}
		defer h.putBody(buf)
		body = buf.Bytes()
		if isJSON(r.Header.Get("Content-Type")) {
			if req, err := Decode(body, h.maxPrefixBytes); err == nil {
				r.Header[ModelHeader] = []string{req.Model}
				x.asked, prefix = req.Model, req.Prefix
			}
		}
	}

	m := l.Route(r, host)
	if m == nil {
		x.status = http.StatusNotFound
		gatewayError(w, r, x.status, invalidRequest, codeRouteNotFound, fmt.Sprintf(
			"no HTTPRoute rule on listener %s of Gateway %s matches %s %s%s", l.Name, l.GatewayName(), r.Method, host, r.URL.Path), 0)
		return
	}
	rule := m.Rule
	x.route = rule.RouteName()
	switch {
	case rule.Redirect != nil:
		rd := rule.Redirect
		w.Header().Set("Location", rd.Location(l.Scheme, host, l.Port, r.URL.EscapedPath(), r.URL.RawQuery, &m.Path))
		x.status = rd.StatusCode
		w.WriteHeader(x.status)
		return
	case rule.Fail != "":
		x.status = http.StatusInternalServerError
		gatewayError(w, r, x.status, serverError, codeInvalidRule, fmt.Sprintf("rule %d of HTTPRoute %s: %s", rule.Index, x.route, rule.Fail), 0)
		return
	}
	rb := rule.Pick()
	switch {
	case rb == nil:
		x.status = http.StatusInternalServerError
		gatewayError(w, r, x.status, serverError, codeInvalidBackend, fmt.Sprintf("rule %d of HTTPRoute %s has no backend to send the request to", rule.Index, x.route), 0)
		return
	case rb.Backend == nil:
		x.status = http.StatusInternalServerError
		gatewayError(w, r, x.status, serverError, codeInvalidBackend, fmt.Sprintf("HTTPRoute %s: %s", x.route, rb.Invalid), 0)
		return
	}
	x.backend = rb.Backend.Name()
	st := rb.Backend.Load()
	x.model = st.Model
	pool := st.Pool
	if pool.Len() == 0 {
		x.status = http.StatusServiceUnavailable
		gatewayError(w, r, x.status, serverError, codeNoReadyEndpoints, st.Unavailable(rb.Backend.Key), h.opts.RetryAfter)
		return
	}
	pool.Admit() // backends have no in-flight limit of their own
	defer pool.Done()

	bal := h.balancing(st.Balancer)
	x.balancer = bal.Policy
	t := target{kind: "backend", name: x.backend, model: st.Model, pool: pool, balancing: bal,
		path: r.URL.Path, rawPath: r.URL.RawPath, host: r.Host, header: h.outboundHeader(r, x.idField),
		responseHeaders: [2]*route.HeaderModifier{rule.ResponseHeaders, rb.ResponseHeaders}}
	if rw := rule.Rewrite; rw != nil {
		if rw.Path != nil {
			t.path, t.rawPath = rw.Path.Apply(r.URL.Path, &m.Path), ""
		}
		if rw.Hostname != "" {
			t.host = rw.Hostname
		}
	}
	rule.RequestHeaders.Apply(t.header)
	rb.RequestHeaders.Apply(t.header)
	if st.EndpointPicker != "" {
		t.poolName = rb.Backend.Key.Pool.String()
		if !h.askPicker(w, r, &x, &t, st, &body) {
			return
		}
		if t.picker != nil {
			defer t.picker.Close()
		}
	}
	br := h.balanceRequest(r, prefix, bal)
	h.forward(w, r, &x, &t, body, &br)
}

// isJSON reports whether a Content-Type is JSON: application/json or a
// +json type, with any parameters.
func isJSON(contentType string) bool {
	mt, _, _ := strings.Cut(contentType, ";")
	mt = strings.TrimSpace(mt)
	return strings.EqualFold(mt, "application/json") ||
		(len(mt) > 5 && strings.EqualFold(mt[len(mt)-5:], "+json"))
}

// gatewayError answers a Gateway request with an error. A HEAD request gets
// the status alone: a JSON Content-Type with no body would only confuse
// clients that parse what a Content-Type promises.
func gatewayError(w http.ResponseWriter, r *http.Request, status int, typ errorType, code, msg string, retryAfter time.Duration) {
	if r.Method == http.MethodHead {
		if retryAfter > 0 {
			w.Header().Set("Retry-After", strconv.Itoa(int((retryAfter+time.Second-1)/time.Second)))
		}
		w.WriteHeader(status)
		return
	}
	writeError(w, status, typ, code, msg, retryAfter)
}
