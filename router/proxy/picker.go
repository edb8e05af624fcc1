package proxy

import (
	"cmp"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"time"

	"github.com/capstan-dev/capstan/router/balance"
	"github.com/capstan-dev/capstan/router/picker"
	"github.com/capstan-dev/capstan/router/route"
)

// askPicker asks the endpoint picker of an InferencePool backend which of
// the pool's endpoints the request goes to, and applies its changes to the
// request. It reports false when it has answered the client: the picker's
// immediate response, or the picker failed and the pool fails closed. When
// the picker fails and the pool fails open, the request goes on with
// t.picked unset, to the router's balancer.
func (h *Handler) askPicker(w http.ResponseWriter, r *http.Request, x *exchange, t *target, st *route.BackendState, body *[]byte) bool {
	eps := t.pool.Endpoints()
	req := &picker.Request{Method: r.Method, Path: r.RequestURI, Authority: r.Host, Header: t.header, Body: *body,
		Subset: make([]string, len(eps))}
	for i := range eps {
		req.Subset[i] = eps[i].Address
	}
	start := time.Now()
	ex, err := h.opts.Picker.Pick(r.Context(), st.EndpointPicker, req)
	h.metrics.EndpointPicker(t.poolName, time.Since(start).Seconds())
	if err == nil && ex.Immediate == nil {
		if t.picked = readyPicks(t.pool, ex.Endpoints); len(t.picked) == 0 {
			ex.Close()
			err = &picker.Error{Kind: picker.NotReady, Picker: st.EndpointPicker, Err: fmt.Errorf(
				"it picked %v, none of them a Ready endpoint of the pool, and the router sends only to Ready endpoints", ex.Endpoints)}
		}
	}
	if err != nil {
		if r.Context().Err() != nil {
			x.status, x.err = statusClientClosed, err
			return false
		}
		var pe *picker.Error
		kind := picker.Protocol
		if errors.As(err, &pe) {
			kind = pe.Kind
		}
		h.metrics.EndpointPickerFailure(t.poolName, string(kind))
		if st.FailOpen {
			h.metrics.FailOpen(t.poolName)
			h.logger.V(2).Info("Endpoint picker failed; balancing the request (failureMode FailOpen)", "requestID", x.id, t.kind, t.name, "err", err)
			return true
		}
		x.status, x.err = http.StatusServiceUnavailable, err
		gatewayError(w, r, x.status, serverError, codeEndpointPickerFailed, fmt.Sprintf(
			"%s %s (failureMode FailClose): %v", t.kind, t.name, err), h.opts.RetryAfter)
		return false
	}
	if im := ex.Immediate; im != nil {
		ex.Close()
		dst := w.Header()
		im.Header.Apply(dst)
		dst["X-Request-Id"] = x.idField
		x.status = im.Status
		w.WriteHeader(im.Status)
		n, _ := w.Write(im.Body)
		x.written += int64(n)
		return false
	}
	t.picker = ex
	ex.Header.Apply(t.header)
	if ex.BodySet {
		*body = ex.Body
	}
	return true
}

// readyPicks returns the picked endpoints that are Ready endpoints of the
// pool, in the picker's order, each once. The others are skipped: the
// picker may know a pod the router has already seen go unready.
func readyPicks(pool *balance.Pool, picks []string) []*balance.Endpoint {
	eps := pool.Endpoints()
	var ready []*balance.Endpoint
	for _, a := range picks {
		i, ok := slices.BinarySearchFunc(eps, a, func(e balance.Endpoint, a string) int { return cmp.Compare(e.Address, a) })
		if ok && !slices.Contains(ready, &eps[i]) {
			ready = append(ready, &eps[i])
		}
	}
	return ready
}

// served reports the endpoint that served the request to the picker and
// applies the picker's changes to the response headers. A failure here
// fails nothing: the model server has answered, and its answer goes to the
// client unchanged.
func (h *Handler) served(x *exchange, t *target, e *balance.Endpoint, status int, header http.Header) {
	m, err := t.picker.Served(e.Address, status, header)
	if err != nil {
		var pe *picker.Error
		if errors.As(err, &pe) {
			h.metrics.EndpointPickerFailure(t.poolName, string(pe.Kind))
		}
		h.logger.V(2).Info("Endpoint picker failed on the response headers; passing them on unchanged", "requestID", x.id, t.kind, t.name, "err", err)
		return
	}
	m.Apply(header)
}
