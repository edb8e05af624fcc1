// Package proxy is the router's HTTP data plane: it reads an OpenAI-style
// request once, finds the model's pool in the routing table, lets a
// balance.Selector pick an endpoint, and forwards the request, retrying on
// another endpoint only when the request provably reached no model server
// (see retryable): a generation is never run twice.
//
// The forwarding loop is written here rather than with
// net/http/httputil.ReverseProxy. ReverseProxy makes one RoundTrip per
// ServeHTTP, so retrying on a different endpoint would have to hide inside a
// RoundTripper that learns the endpoint through the request context, and
// ReverseProxy would still answer exhausted retries with its own bare 502.
// Owning the loop keeps the rule "retry only what reached no server" in one
// visible place, lets every error be OpenAI-shaped with the
// right status, names the endpoint that served the response, and avoids
// ReverseProxy's per-attempt request cloning. The connection pooling,
// keep-alive and HTTP/1.1 exchanges are router/upstream's.
package proxy

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/capstan-dev/capstan/router/balance"
	"github.com/capstan-dev/capstan/router/hold"
	"github.com/capstan-dev/capstan/router/metrics"
	"github.com/capstan-dev/capstan/router/picker"
	"github.com/capstan-dev/capstan/router/route"
	"github.com/capstan-dev/capstan/router/upstream"
)

// Routes gives the current routing table.
type Routes interface {
	Table() *route.Table
}

// Options configures a Handler. Durations must be positive.
type Options struct {
	// Balancing is how requests are balanced, unless an InferencePool
	// chooses one of Balancers (its capstan.dev/balancer annotation).
	Balancing Balancing
	Balancers map[balance.Policy]*Balancing
	// MaxBodyBytes bounds a request body; larger ones get 413.
	MaxBodyBytes int64
	// MaxInFlightBodyBytes bounds the request body bytes held at once;
	// a body that would exceed it gets 429. 0 means no bound.
	MaxInFlightBodyBytes int64
	// TrustedHops is how many proxies in front of the router append to
	// X-Forwarded-For truthfully; entries left of theirs are dropped.
	TrustedHops int
	// MaxAttempts bounds the endpoints one request tries (1 to
	// balance.MaxAttempts).
	MaxAttempts int
	// TryDuration bounds the time from the request's arrival within which
	// a failed attempt may be followed by another.
	TryDuration time.Duration
	// RetryInterval is the pause before another attempt, jittered by half
	// either way.
	RetryInterval time.Duration
	// OutlierErrors is how many exchanges in a row that reached an endpoint
	// and failed (an answer with one of OutlierStatuses, a first-byte
	// timeout, a reset) eject it; 0 disables ejection on answers.
	OutlierErrors int
	// OutlierStatuses are the answers that count as failed.
	OutlierStatuses []int
	// MaxEjectionPercent bounds the share of a pool's endpoints ejected at
	// once (at least one may always be).
	MaxEjectionPercent int
	// ConnectTimeout bounds establishing a connection to an endpoint.
	ConnectTimeout time.Duration
	// FirstByteTimeout bounds the wait for the response headers after the
	// request was sent. For a non-streamed completion that is the whole
	// generation, so it is generous.
	FirstByteTimeout time.Duration
	// IdleStreamTimeout bounds the gap between two reads of a response body
	// (two chunks of a stream).
	IdleStreamTimeout time.Duration
	// RetryAfter is the Retry-After of a 503 (no ready endpoint) or 429.
	RetryAfter time.Duration
	// Holds, when set, hold the requests of a model with no Ready endpoint
	// for up to HoldTimeout instead of answering 503 at once, unless
	// Replicas says the model is off. The Builder must kick them when it
	// publishes a model.
	Holds       *hold.Queues
	HoldTimeout time.Duration
	// Replicas, when set, says what a model's pods in some namespaces are
	// doing, for the answers of a model with no Ready endpoint, and whether
	// the model is off: it has no replica and none is coming.
	Replicas func(model string, namespaces []string) (what string, off bool)
	// MaxIdleConnsPerEndpoint is how many idle keep-alive connections are
	// kept to each endpoint.
	MaxIdleConnsPerEndpoint int
	// AccessLog logs every request.
	AccessLog bool
	// Synced reports whether discovery has synced. Until it has, the API
	// answers 503: a router that does not know the models yet must not
	// call them unknown. Nil means always synced.
	Synced func() bool
	// Gateways gives the Gateway API routing table that GatewayHandler
	// serves. Nil when the router does not serve Gateways.
	Gateways func() *route.HTTPTable
	// Picker asks the endpoint pickers of InferencePools; required with
	// Gateways.
	Picker *picker.Client
}

// Handler serves the OpenAI API by forwarding to model servers.
type Handler struct {
	// maxPrefixBytes is the most of a prompt any of the policies hashes:
	// what a Gateway request's body is decoded for before its route, and
	// so its policy, is known.
	maxPrefixBytes int
	routes         Routes
	opts           Options
	upstreams      *upstream.Pool
	metrics        *metrics.Metrics
	logger         klog.Logger

	// badStatus[code] is true for the OutlierStatuses.
	badStatus [600]bool
	budget    bodyBudget

	bodies sync.Pool // *bytes.Buffer for request bodies
	copies sync.Pool // *[]byte for copying responses
}

var _ http.Handler = (*Handler)(nil)

// maxPooledBody is the largest request buffer kept for reuse; a rare huge
// request should not pin its buffer for ever.
const maxPooledBody = 1 << 20

// Balancing is a balancing policy as the proxy applies it: the Selector
// that picks endpoints, and what of a request the Selector needs.
type Balancing struct {
	// Policy names it in metrics.
	Policy   balance.Policy
	Selector balance.Selector
	// PrefixBytes is how much of the prompt the policy hashes; 0 when it
	// does not. PromptBlocks hashes it in blocks, for the cache-aware
	// policy, instead of as one prefix.
	PrefixBytes  int
	PromptBlocks bool
	// SessionHeader carries the session id for session affinity; "" when
	// the policy does not use it.
	SessionHeader string
}

// balancing returns how a backend whose pool chose policy ("" for none) is
// balanced.
func (h *Handler) balancing(policy balance.Policy) *Balancing {
	if b := h.opts.Balancers[policy]; b != nil {
		return b
	}
	return &h.opts.Balancing
}

// New returns a Handler that routes with routes and records into m.
func New(routes Routes, m *metrics.Metrics, logger klog.Logger, opts Options) *Handler {
	h := &Handler{
		routes:  routes,
		opts:    opts,
		metrics: m,
		logger:  logger,
		upstreams: upstream.New(upstream.Options{
			ConnectTimeout: opts.ConnectTimeout,
			MaxIdlePerAddr: opts.MaxIdleConnsPerEndpoint,
		}),
		budget: bodyBudget{max: opts.MaxInFlightBodyBytes},
	}
	h.maxPrefixBytes = opts.Balancing.PrefixBytes
	for _, b := range opts.Balancers {
		h.maxPrefixBytes = max(h.maxPrefixBytes, b.PrefixBytes)
	}
	for _, code := range opts.OutlierStatuses {
		if code >= 0 && code < len(h.badStatus) {
			h.badStatus[code] = true
		}
	}
	h.bodies.New = func() any { return new(bytes.Buffer) }
	h.copies.New = func() any { b := make([]byte, 32<<10); return &b }
	return h
}

// Run closes upstream connections that have been idle too long, until ctx
// ends; then it closes every idle one.
func (h *Handler) Run(ctx context.Context) { h.upstreams.Run(ctx) }

// CloseIdleConnections closes idle upstream connections (at shutdown).
func (h *Handler) CloseIdleConnections() { h.upstreams.CloseIdle(0) }

// ForgetEndpoint closes the upstream connections to an address that left
// every pool, those in use when their exchanges end.
func (h *Handler) ForgetEndpoint(address string) { h.upstreams.Forget(address) }

// exchange is what the access log and metrics record about one request.
type exchange struct {
	start time.Time
	// tryFrom is when attempts began: the arrival, or the release of a
	// held request.
	tryFrom time.Time
	id      string
	// idField is the X-Request-Id field's value, shared by the request
	// sent upstream and the response (neither modifies it).
	idField  []string
	model    string         // a known model, or "" (bounded metric labels)
	balancer balance.Policy // the policy that balanced it, when not the default
	asked    string         // what the client asked for, for the log
	status   int
	pod      string
	endpoint string
	attempts int
	written  int64
	err      error
	// viaGateway marks a request that came through a Gateway listener;
	// gateway, route and backend name what served it.
	viaGateway              bool
	gateway, route, backend string
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	x := newExchange(w, r)
	defer h.finish(r, &x)

	if err := normalizePath(r); err != nil {
		x.status = http.StatusBadRequest
		writeError(w, x.status, invalidRequest, codeBadPath, err.Error(), 0)
		return
	}
	path := r.URL.Path
	switch {
	case h.opts.Synced != nil && !h.opts.Synced():
		x.status = http.StatusServiceUnavailable
		writeError(w, x.status, serverError, codeNotSynced,
			"the router is starting: it has not yet read the Services and EndpointSlices that define models", h.opts.RetryAfter)
	case path == "/v1/models" || strings.HasPrefix(path, "/v1/models/"):
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			h.methodNotAllowed(w, &x, "GET")
			return
		}
		h.serveModels(w, r, &x)
	case strings.HasPrefix(path, "/v1/"):
		if r.Method != http.MethodPost {
			h.methodNotAllowed(w, &x, "POST")
			return
		}
		h.proxy(w, r, &x)
	default:
		x.status = http.StatusNotFound
		writeError(w, x.status, invalidRequest, codeNotFound,
			fmt.Sprintf("no route for %s %s: the router serves the OpenAI API under /v1/", r.Method, echoed(path)), 0)
	}
}

func (h *Handler) methodNotAllowed(w http.ResponseWriter, x *exchange, allow string) {
	x.status = http.StatusMethodNotAllowed
	w.Header().Set("Allow", allow)
	writeError(w, x.status, invalidRequest, codeMethodNotAllowed, "method not allowed: use "+allow, 0)
}

// newExchange starts the record of a request: its id, the client's when it
// is acceptable, is set on the response at once.
func newExchange(w http.ResponseWriter, r *http.Request) exchange {
	now := time.Now()
	x := exchange{start: now, tryFrom: now, id: requestID(r)}
	x.idField = []string{x.id}
	w.Header()["X-Request-Id"] = x.idField
	return x
}

// finish records the request in metrics and the access log.
func (h *Handler) finish(r *http.Request, x *exchange) {
	d := time.Since(x.start)
	h.metrics.Request(x.model, x.status, string(cmp.Or(x.balancer, h.opts.Balancing.Policy)), d.Seconds())
	if x.viaGateway {
		h.metrics.GatewayRequest(x.gateway, x.route, x.status)
	}
	if !h.opts.AccessLog {
		return
	}
	kv := []any{"requestID", x.id, "method", r.Method, "path", echoed(r.URL.Path), "model", echoed(x.asked),
		"pod", x.pod, "endpoint", x.endpoint, "status", x.status, "duration", d, "attempts", x.attempts, "bytes", x.written}
	if x.viaGateway {
		kv = append(kv, "host", echoed(r.Host), "gateway", x.gateway, "route", x.route, "backend", x.backend)
	}
	if x.err != nil {
		kv = append(kv, "err", x.err.Error())
	}
	h.logger.Info("Request", kv...)
}

// statusClientClosed is logged (never sent) when the client went away
// before the response started, as nginx does.
const statusClientClosed = 499

// heldBody is a request body read into a pooled buffer, with the share of
// the body budget it holds.
type heldBody struct {
	buf   *bytes.Buffer
	taken int64
}

func (b *heldBody) Bytes() []byte { return b.buf.Bytes() }

// readBody reads a request's body once, up to the limit, into a pooled
// buffer that the caller gives back with putBody. The body budget is taken
// before a byte is read: the body's length when it is known (and the buffer
// is sized to it at once), else step by step as it arrives. When it cannot
// read the body, it has answered (413, 429) or recorded that the client went
// away, and returns nil.
func (h *Handler) readBody(w http.ResponseWriter, r *http.Request, x *exchange) *heldBody {
	if r.ContentLength > h.opts.MaxBodyBytes {
		h.tooLarge(w, x)
		return nil
	}
	b := &heldBody{buf: h.bodies.Get().(*bytes.Buffer)}
	var src io.Reader = http.MaxBytesReader(w, r.Body, h.opts.MaxBodyBytes)
	var budgeted *budgetedReader
	if r.ContentLength >= 0 {
		if !h.budget.take(r.ContentLength) {
			h.bodies.Put(b.buf)
			h.overloaded(w, r, x)
			return nil
		}
		b.taken = r.ContentLength
		// ReadFrom wants MinRead bytes free before each read, the last
		// one that sees EOF included.
		b.buf.Grow(int(r.ContentLength) + bytes.MinRead)
	} else {
		budgeted = &budgetedReader{r: src, budget: &h.budget}
		src = budgeted
	}
	_, err := b.buf.ReadFrom(src)
	if budgeted != nil {
		b.taken = budgeted.taken
	}
	if err != nil {
		h.putBody(b)
		var tooBig *http.MaxBytesError
		switch {
		case errors.As(err, &tooBig):
			h.tooLarge(w, x)
		case errors.Is(err, errBodyBudget):
			h.overloaded(w, r, x)
		default:
			x.status, x.err = statusClientClosed, fmt.Errorf("reading the request body: %w", err)
		}
		return nil
	}
	return b
}

func (h *Handler) putBody(b *heldBody) {
	h.budget.give(b.taken)
	if b.buf.Cap() <= maxPooledBody {
		b.buf.Reset()
		h.bodies.Put(b.buf)
	}
}

func (h *Handler) proxy(w http.ResponseWriter, r *http.Request, x *exchange) {
	buf := h.readBody(w, r, x)
	if buf == nil {
		return
	}
	defer h.putBody(buf)
	body := buf.Bytes()
	req, err := Decode(body, h.opts.Balancing.PrefixBytes)
	x.asked = req.Model
	if err != nil {
		x.status = http.StatusBadRequest
		code := codeInvalidJSON
		if errors.Is(err, errMissingModel) {
			code = codeMissingModel
		}
		writeError(w, x.status, invalidRequest, code, err.Error(), 0)
		return
	}
	m := h.routes.Table().Lookup(req.Model)
	if m == nil {
		x.status = http.StatusNotFound
		writeError(w, x.status, invalidRequest, codeModelNotFound, fmt.Sprintf(
			"model %q is not served here: no Service labelled capstan.dev/model=%s in the namespaces the router watches", echoed(req.Model), echoed(req.Model)), 0)
		return
	}
	// An adapter counts as its base model: in metrics (its name comes from
	// the pods, so it would grow their label sets without bound), and in
	// the model's in-flight count, which its requests free for the model's
	// held ones.
	x.model = cmp.Or(m.Base, m.Name)
	bal := &h.opts.Balancing
	br := h.balanceRequest(r, req.Prefix, bal)
	if m.Base != "" {
		br.Adapter = m.Name // for LoRA affinity
	}
	t := target{kind: "model", name: m.Name, model: x.model, pool: m.Pool, balancing: bal,
		path: r.URL.Path, rawPath: r.URL.RawPath, header: h.outboundHeader(r, x.idField)}
	// A model without a Ready endpoint holds the request, unless it is off,
	// and so does one with earlier requests still held, which go first;
	// the same for an adapter its model declares, which is loaded on no
	// Ready endpoint while it is being loaded. Other adapters are never
	// held: they are known only while endpoints report them.
	var why string
	off := false
	if m.Pool.Len() == 0 {
		why, off = h.unavailable(m)
	}
	if hs := h.opts.Holds; hs != nil && !off && (m.Base == "" || m.Declared) && (m.Pool.Len() == 0 || hs.Holding() && hs.Len(m.Name) > 0) {
		if !h.hold(w, r, x, &t, &br) {
			return
		}
	} else {
		if m.Pool.Len() == 0 {
			x.status = http.StatusServiceUnavailable
			writeError(w, x.status, serverError, codeNoReadyEndpoints, why, h.opts.RetryAfter)
			return
		}
		if !m.Pool.Admit() {
			h.modelOverloaded(w, x, m)
			return
		}
	}
	defer h.done(&t)
	h.forward(w, r, x, &t, body, &br)
}

func (h *Handler) modelOverloaded(w http.ResponseWriter, x *exchange, m *route.Model) {
	x.status = http.StatusTooManyRequests
	writeError(w, x.status, rateLimit, codeModelOverloaded,
		fmt.Sprintf("model %s already has the maximum of %d requests in flight through this router", m.Name, m.Pool.MaxInFlight()), h.opts.RetryAfter)
}

// done ends a request admitted to t's pool and lets the next held request
// of the model, and of the adapter it was for, try.
func (h *Handler) done(t *target) {
	t.pool.Done()
	if h.opts.Holds != nil && t.model != "" {
		h.opts.Holds.Kick(t.model)
		if t.name != t.model {
			h.opts.Holds.Kick(t.name)
		}
	}
}

// hold waits, behind the earlier held requests of the model (or adapter,
// t.name), until it has an endpoint with room, and admits the request to
// its pool with that endpoint taken as t.first. Otherwise it answers the
// client (queue full, hold timeout, a client gone) and returns false.
func (h *Handler) hold(w http.ResponseWriter, r *http.Request, x *exchange, t *target, br *balance.Request) bool {
	ctx, cancel := context.WithTimeout(r.Context(), h.opts.HoldTimeout)
	defer cancel()
	start := time.Now()
	var last *route.Model
	err := h.opts.Holds.Wait(ctx, t.name, func() bool {
		m := h.routes.Table().Lookup(t.name)
		last = m
		if m == nil || m.Pool.Len() == 0 || !m.Pool.Admit() {
			return false
		}
		e := t.balancing.Selector.Select(m.Pool, br)
		if e == nil || !m.Pool.Acquire(e) {
			m.Pool.Done()
			return false
		}
		t.pool, t.first = m.Pool, e
		return true
	})
	now := time.Now()
	waited := now.Sub(start)
	// A request that went on at once was not held.
	held := err != nil || waited >= time.Millisecond
	if held {
		h.metrics.Held(t.model, waited.Seconds(), holdOutcome(err))
	}
	switch {
	case err == nil:
		// Attempts are bounded from the release, not the arrival.
		x.tryFrom = now
		if held {
			w.Header().Set("X-Capstan-Held", waited.Round(time.Millisecond).String())
		}
		return true
	case errors.Is(err, hold.ErrFull):
		x.status = http.StatusTooManyRequests
		writeError(w, x.status, rateLimit, codeHoldQueueFull, fmt.Sprintf(
			"model %s has no ready endpoint and already %d requests waiting for one in this router", t.name, h.opts.Holds.Len(t.name)), h.opts.RetryAfter)
	case r.Context().Err() != nil:
		x.status, x.err = statusClientClosed, context.Cause(r.Context())
	default:
		x.status = http.StatusServiceUnavailable
		var why string
		switch {
		case last == nil:
			why = fmt.Sprintf("model %s is no longer served", t.name)
		case last.Pool.Len() > 0:
			why = fmt.Sprintf("model %s: all %d ready endpoints stayed busy", t.name, last.Pool.Len())
		default:
			why, _ = h.unavailable(last)
		}
		writeError(w, x.status, serverError, codeNoReadyEndpoints, fmt.Sprintf("held %s for a ready endpoint: %s",
			waited.Round(time.Second), why), h.opts.RetryAfter)
	}
	return false
}

// unavailable says why m has no ready endpoint: its endpoints and, when the
// router watches them, its pods; off as Options.Replicas says.
func (h *Handler) unavailable(m *route.Model) (why string, off bool) {
	if m.Declared {
		// A declared adapter waits for its model's pods: what they are
		// doing, and whether the model is off, is the model's.
		if base := h.routes.Table().Lookup(m.Base); base != nil && base.Base == "" && base.Pool.Len() == 0 {
			why, off = h.unavailable(base)
			return m.Unavailable() + "; " + why, off
		}
	}
	if r, off := h.replicas(m); r != "" {
		return m.Unavailable() + "; " + r, off
	}
	return m.Unavailable(), false
}

// replicas says what the pods of m are doing, "" when the router does not
// watch them.
func (h *Handler) replicas(m *route.Model) (what string, off bool) {
	if h.opts.Replicas == nil || m.Owner == "" || m.Base != "" {
		return "", false
	}
	return h.opts.Replicas(m.Name, append([]string{m.Owner}, m.SharedWith...))
}

func holdOutcome(err error) string {
	switch {
	case err == nil:
		return metrics.HoldReleased
	case errors.Is(err, hold.ErrFull):
		return metrics.HoldFull
	case errors.Is(err, context.DeadlineExceeded):
		return metrics.HoldTimeout
	default:
		return metrics.HoldCancelled
	}
}

// balanceRequest is what b knows about a request: its prompt prefix (up to
// b.PrefixBytes of it) and session id, when b uses them.
func (h *Handler) balanceRequest(r *http.Request, prefix []byte, b *Balancing) balance.Request {
	var br balance.Request
	prefix = prefix[:min(len(prefix), b.PrefixBytes)]
	switch {
	case len(prefix) > 0 && b.PromptBlocks:
		br.Blocks = balance.PromptBlocks(nil, prefix)
	case len(prefix) > 0:
		br.PrefixHash, br.HasPrefix = balance.HashKey(prefix), true
	}
	if b.SessionHeader != "" {
		if s := r.Header.Get(b.SessionHeader); s != "" {
			br.SessionHash, br.HasSession = balance.HashKeyString(s), true
		}
	}
	return br
}

// target is where forward sends a request, and how the request and the
// response change on the way.
type target struct {
	// kind and name say what the pool is, in error messages ("model
	// llama-3-8b", "backend ns/svc:8080"); model labels metrics, "" for
	// none.
	kind, name, model string
	pool              *balance.Pool
	// balancing picks the pool's endpoints.
	balancing *Balancing
	// first, when set, is an endpoint of pool already acquired for the
	// first attempt (by hold).
	first *balance.Endpoint
	// path and rawPath are the request's URL path as sent upstream.
	path, rawPath string
	// host is the Host header sent upstream; "" means the endpoint's
	// address.
	host string
	// header is the request header sent upstream, shared by all attempts.
	header http.Header
	// responseHeaders modify the response headers sent to the client.
	responseHeaders [2]*route.HeaderModifier
	// picker, for an InferencePool whose endpoint picker answered, is the
	// stream to it, and picked the Ready endpoints it chose that remain to
	// be tried, in order, instead of the Selector's; poolName names the
	// pool in metrics.
	picker   *picker.Exchange
	picked   []*balance.Endpoint
	poolName string
}

func (h *Handler) tooLarge(w http.ResponseWriter, x *exchange) {
	x.status = http.StatusRequestEntityTooLarge
	writeError(w, x.status, invalidRequest, codeTooLarge,
		fmt.Sprintf("the request body is larger than the router's limit of %d bytes", h.opts.MaxBodyBytes), 0)
}

// failure is why an attempt failed before any response byte.
type failure int

const (
	failConnect     failure = iota // reached no server: refused, unreachable, connect timeout, a connection gone before the first byte
	failTimeout                    // sent, no response headers in time
	failTransport                  // sent, then the connection was reset or closed before the response
	failBadResponse                // sent, and the answer was one the pool refuses (see upstream.ResponseError)
)

func (f failure) reason() string {
	switch f {
	case failConnect:
		return metrics.ReasonConnect
	case failTimeout:
		return metrics.ReasonTimeout
	}
	return metrics.ReasonTransport
}

func classify(err error) failure {
	if upstream.Unsent(err) {
		return failConnect
	}
	var bad *upstream.ResponseError
	if errors.As(err, &bad) {
		return failBadResponse
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return failTimeout
	}
	return failTransport
}

// retryable is the one place that decides whether a failed attempt is
// followed by another, on another endpoint: only when the request provably
// reached no server (upstream.Unsent: the dial failed, or the connection
// failed before the kernel took a byte of the request), while attempts
// remain and the request is younger than the try duration. A request that
// may have reached a model server is answered, never sent again: a
// generation is expensive, and a prompt that crashes pods would take one
// down per attempt.
func (h *Handler) retryable(err error, x *exchange) bool {
	return upstream.Unsent(err) && x.attempts < h.opts.MaxAttempts && time.Since(x.tryFrom) < h.opts.TryDuration
}

// pause waits the jittered retry interval, or until ctx ends.
func (h *Handler) pause(ctx context.Context) {
	d := h.opts.RetryInterval
	if d <= 0 {
		return
	}
	t := time.NewTimer(d/2 + rand.N(d))
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// forward sends the request to endpoints of the target until one answers or
// retryable says no. It never retries after writing to the client.
func (h *Handler) forward(w http.ResponseWriter, r *http.Request, x *exchange, t *target, body []byte, br *balance.Request) {
	pool := t.pool
	ctx := r.Context()

	var (
		lastErr  error
		lastFail failure
	)
	req := upstream.Request{Method: r.Method, Target: requestURI(r, t), Header: t.header, Body: body}
	// Picks that lose an endpoint's last slot to a concurrent request pick
	// again; the guard bounds those, attempts bound the round trips.
	for guard := 0; x.attempts < h.opts.MaxAttempts && guard < h.opts.MaxAttempts+16; guard++ {
		e := t.first
		t.first = nil
		if e == nil {
			if t.picker != nil {
				// The picker's endpoints, in its order, under the same
				// retry rule.
				if len(t.picked) == 0 {
					break
				}
				e, t.picked = t.picked[0], t.picked[1:]
			} else if e = t.balancing.Selector.Select(pool, br); e == nil {
				if why := pool.Why(br); why.Ejected > 0 && !br.IgnoreEjection {
					// Every remaining endpoint is ejected: trust the
					// EndpointSlice over our suspicion rather than fail
					// (Envoy's panic threshold).
					br.IgnoreEjection = true
					continue
				}
				break
			}
			if !pool.Acquire(e) {
				continue
			}
		}
		if x.attempts > 0 {
			// Another endpoint takes over from an attempt that reached
			// no server.
			h.metrics.Retry(t.model, lastFail.reason())
		}
		x.attempts++
		x.pod, x.endpoint = e.Pod, e.Address
		req.Host, req.Protocol = t.host, e.Protocol
		if req.Host == "" {
			req.Host = e.Address
		}
		up, err := h.upstreams.RoundTrip(ctx, &req, e.Address, h.opts.FirstByteTimeout)
		if err != nil {
			pool.Release(e)
			if ctx.Err() != nil {
				x.status, x.err = statusClientClosed, context.Cause(ctx)
				return
			}
			lastErr, lastFail = err, classify(err)
			br.Tried(e)
			h.failed(t, x, e, lastFail, err)
			if !h.retryable(err, x) {
				break
			}
			h.pause(ctx)
			continue
		}
		if t.model != "" {
			h.metrics.FirstByte(t.model, time.Since(x.start).Seconds())
		}
		// Deferred: respond aborts a broken response by panicking.
		defer pool.Release(e)
		complete := false
		defer func() { h.upstreams.Release(up, complete) }()
		h.answered(t, x, e, up.StatusCode)
		complete = h.respond(w, x, t, e, up)
		return
	}

	switch {
	case lastErr == nil:
		// Nothing was tried: every endpoint is at its in-flight limit.
		x.status = http.StatusTooManyRequests
		writeError(w, x.status, rateLimit, codeEndpointsFull, fmt.Sprintf(
			"all %d ready endpoints of %s %s are at the limit of %d requests in flight", pool.Len(), t.kind, t.name, pool.MaxPerEndpoint()), h.opts.RetryAfter)
	case lastFail == failTimeout:
		x.status, x.err = http.StatusGatewayTimeout, lastErr
		writeError(w, x.status, serverError, codeUpstreamTimeout, fmt.Sprintf(
			"%s %s: the request was sent to %s but no response headers came within %s; it is not retried, since the model server may be running it",
			t.kind, t.name, x.pod, h.opts.FirstByteTimeout), 0)
	case lastFail == failBadResponse:
		x.status, x.err = http.StatusBadGateway, lastErr
		writeError(w, x.status, serverError, codeUpstreamBadResponse, fmt.Sprintf(
			"%s %s: %s answered with a response the router refuses (%v); it is not retried, since the model server may have run it",
			t.kind, t.name, x.pod, lastErr), 0)
	case lastFail == failTransport:
		x.status, x.err = http.StatusBadGateway, lastErr
		writeError(w, x.status, serverError, codeUpstreamReset, fmt.Sprintf(
			"%s %s: the connection to %s failed after the request was sent (%v); it is not retried, since the model server may have started it",
			t.kind, t.name, x.pod, lastErr), 0)
	default:
		x.status, x.err = http.StatusBadGateway, lastErr
		writeError(w, x.status, serverError, codeUpstreamUnreached, fmt.Sprintf(
			"%s %s: %d attempt(s) reached no model server, last: %v", t.kind, t.name, x.attempts, lastErr), 0)
	}
}

// respond copies the model server's response to the client and reports
// whether it read the response to its end. From here on the request is never
// retried: a failure mid-body aborts the client's connection so that it sees
// an incomplete response, not a short one.
func (h *Handler) respond(w http.ResponseWriter, x *exchange, t *target, e *balance.Endpoint, up *upstream.Response) (complete bool) {
	resp := up.Response
	dst := w.Header()
	copyHeader(dst, resp.Header)
	for _, m := range t.responseHeaders {
		m.Apply(dst)
	}
	if t.picker != nil {
		h.served(x, t, e, resp.StatusCode, dst)
	}
	if e.Pod != "" {
		dst["X-Capstan-Pod"] = []string{e.Pod}
	}
	dst["X-Capstan-Endpoint"] = []string{e.Address}
	dst["X-Request-Id"] = x.idField
	x.status = resp.StatusCode
	w.WriteHeader(resp.StatusCode)

	// Stream (flush every chunk) for Server-Sent Events and bodies of unknown
	// length; a body of known length is written as it comes and flushed
	// when the handler returns.
	var rc *http.ResponseController
	if resp.ContentLength < 0 || strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		rc = http.NewResponseController(w)
		if err := rc.Flush(); err != nil {
			x.err = err
			return false
		}
	}
	bp := h.copies.Get().(*[]byte)
	defer h.copies.Put(bp)
	buf := *bp
	// Each read may wait at most the idle timeout: a deadline on the
	// connection, not a timer, moved forward only now and then (see
	// upstream's arm), so a fast stream does not pay for it on every chunk.
	idle := h.opts.IdleStreamTimeout
	for {
		if err := up.Extend(idle); err != nil {
			x.err = err
			return false
		}
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			wn, werr := w.Write(buf[:n])
			x.written += int64(wn)
			if werr == nil && rc != nil {
				werr = rc.Flush()
			}
			if werr != nil {
				// The client went away; the upstream connection is closed.
				x.err = fmt.Errorf("writing to the client: %w", werr)
				return false
			}
		}
		if rerr == io.EOF {
			return true
		}
		if rerr != nil {
			var ne net.Error
			if errors.As(rerr, &ne) && ne.Timeout() {
				rerr = fmt.Errorf("no data from the model server for %s: %w", h.opts.IdleStreamTimeout, rerr)
			}
			x.err = fmt.Errorf("reading the response after %d bytes: %w", x.written, rerr)
			h.logger.Info("Aborting a response the model server did not finish", "requestID", x.id, "pod", e.Pod, "endpoint", e.Address, "err", rerr)
			// Bytes reached the client, so no retry: abort the connection.
			up.Abort()
			panic(http.ErrAbortHandler)
		}
	}
}

// requestURI is the request target sent upstream: the client's own when the
// path is not rewritten, as nginx forwards it.
func requestURI(in *http.Request, t *target) string {
	if t.path == in.URL.Path && t.rawPath == in.URL.RawPath && strings.HasPrefix(in.RequestURI, "/") {
		return in.RequestURI
	}
	u := url.URL{Path: t.path, RawPath: t.rawPath, RawQuery: in.URL.RawQuery}
	return u.RequestURI()
}

// outboundHeader copies the client's headers minus hop-by-hop ones, and adds
// the request id and the client's address (see forwardedFor).
func (h *Handler) outboundHeader(in *http.Request, id []string) http.Header {
	out := make(http.Header, len(in.Header)+2)
	copyHeader(out, in.Header)
	// The body has been read: nothing to continue.
	delete(out, "Expect")
	out["X-Request-Id"] = id
	delete(out, "X-Forwarded-For")
	if xff, ok := forwardedFor(in, h.opts.TrustedHops); ok {
		out["X-Forwarded-For"] = []string{xff}
	}
	return out
}

// copyHeader copies src into dst without hop-by-hop headers (RFC 9110
// section 7.6.1), including those src's Connection header names. Value
// slices are shared, not copied.
func copyHeader(dst, src http.Header) {
	for k, vv := range src {
		if !hopByHop(k) {
			dst[k] = vv
		}
	}
	for _, v := range src["Connection"] {
		// strings.Cut rather than SplitSeq: no allocation for the
		// "keep-alive" almost every response carries.
		for v != "" {
			var f string
			f, v, _ = strings.Cut(v, ",")
			if f = strings.TrimSpace(f); f != "" {
				delete(dst, http.CanonicalHeaderKey(f))
			}
		}
	}
}

func hopByHop(k string) bool {
	switch k {
	case "Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization",
		"Te", "Trailer", "Transfer-Encoding", "Upgrade":
		return true
	}
	return false
}

// newRequestID returns 128 random bits as 32 lower-case hex digits, with
// one allocation: the string.
func newRequestID() string {
	const digits = "0123456789abcdef"
	var b [32]byte
	for i, u := range [2]uint64{rand.Uint64(), rand.Uint64()} {
		for j := 16*i + 15; j >= 16*i; j-- {
			b[j] = digits[u&0xf]
			u >>= 4
		}
	}
	return string(b[:])
}
