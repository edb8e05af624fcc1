package proxy

import (
	"time"

	"github.com/capstan-dev/capstan/router/balance"
)

// Outlier detection, as Envoy's: an endpoint is ejected with the health
// package's growing backoff after an attempt that reached no server (it
// refused or was unreachable), or after Options.OutlierErrors exchanges in a
// row that reached it and failed (an answer with one of the
// OutlierStatuses, a first-byte timeout, a reset). No more than
// MaxEjectionPercent of a pool's endpoints are ejected at once, and a pool
// whose every endpoint is ejected is used whole (forward's panic mode).

// failed records an attempt that got no response.
func (h *Handler) failed(t *target, x *exchange, e *balance.Endpoint, f failure, err error) {
	if f == failConnect {
		h.eject(t, x, e, "no connection", err)
		return
	}
	h.badAnswer(t, x, e, err)
}

// answered records the status of a response.
func (h *Handler) answered(t *target, x *exchange, e *balance.Endpoint, status int) {
	if status < 0 || status >= len(h.badStatus) || !h.badStatus[status] {
		e.Host.Succeed()
		return
	}
	h.badAnswer(t, x, e, nil)
}

func (h *Handler) badAnswer(t *target, x *exchange, e *balance.Endpoint, err error) {
	if h.opts.OutlierErrors <= 0 {
		return
	}
	if n := e.Host.BadAnswer(); n >= h.opts.OutlierErrors {
		e.Host.ForgetBadAnswers()
		h.eject(t, x, e, "consecutive errors", err)
	}
}

// eject ejects e unless that would take the pool past the ejected share.
func (h *Handler) eject(t *target, x *exchange, e *balance.Endpoint, why string, err error) {
	if !mayEject(t.pool, e, h.opts.MaxEjectionPercent) {
		h.logger.V(2).Info("Not ejecting an endpoint: the pool's ejected share is at its limit", "requestID", x.id, t.kind, t.name,
			"pod", e.Pod, "endpoint", e.Address, "why", why, "maxEjectionPercent", h.opts.MaxEjectionPercent)
		return
	}
	if d := e.Host.Fail(); d > 0 {
		h.metrics.Ejection(t.model)
		h.logger.V(2).Info("Ejected endpoint", "requestID", x.id, t.kind, t.name,
			"pod", e.Pod, "endpoint", e.Address, "why", why, "for", d.Round(time.Millisecond), "err", err)
	}
}

// mayEject reports whether the pool may have e ejected: e already is, or
// fewer than percent of the pool's endpoints (at least one) are.
func mayEject(pool *balance.Pool, e *balance.Endpoint, percent int) bool {
	if e.Host.Ejected() {
		return true
	}
	eps := pool.Endpoints()
	ejected := 0
	for i := range eps {
		if eps[i].Host.Ejected() {
			ejected++
		}
	}
	return ejected < max(1, len(eps)*percent/100)
}
