package proxy

import (
	"encoding/json"
	"net/http"
	"strconv"
	"time"
)

// errorType is the OpenAI error "type" a client library maps to an
// exception class.
type errorType string

const (
	invalidRequest errorType = "invalid_request_error"
	rateLimit      errorType = "rate_limit_error"
	serverError    errorType = "server_error"
)

// Error codes the router answers with (the OpenAI "code" field). Each is
// documented with its status in docs/router.md.
const (
	codeInvalidJSON         = "invalid_json"
	codeMissingModel        = "missing_model"
	codeModelNotFound       = "model_not_found"
	codeNotFound            = "not_found"
	codeMethodNotAllowed    = "method_not_allowed"
	codeTooLarge            = "request_too_large"
	codeModelOverloaded     = "model_concurrency_limit"
	codeEndpointsFull       = "endpoint_concurrency_limit"
	codeUpstreamUnreached   = "upstream_unreachable"
	codeUpstreamReset       = "upstream_reset"
	codeUpstreamBadResponse = "upstream_bad_response"
	codeNoReadyEndpoints    = "no_ready_endpoints"
	codeHoldQueueFull       = "hold_queue_full"
	codeUpstreamTimeout     = "upstream_timeout"
	codeNotSynced           = "router_not_ready"
	codeRouterOverloaded    = "router_overloaded"
	codeBadPath             = "invalid_path"
	codeRouteNotFound       = "route_not_found"
	codeInvalidRule         = "invalid_route_rule"
	codeInvalidBackend      = "invalid_backend"
	// codeEndpointPickerFailed answers for an InferencePool whose endpoint
	// picker failed (failureMode FailClose).
	codeEndpointPickerFailed = "endpoint_picker_failed"
)

type errorBody struct {
	Error errorDetail `json:"error"`
}

type errorDetail struct {
	Message string    `json:"message"`
	Type    errorType `json:"type"`
	Param   *string   `json:"param"`
	Code    string    `json:"code"`
}

// writeError answers with an OpenAI-shaped error. retryAfter > 0 adds a
// Retry-After header, rounded up to whole seconds.
func writeError(w http.ResponseWriter, status int, typ errorType, code, msg string, retryAfter time.Duration) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	if retryAfter > 0 {
		h.Set("Retry-After", strconv.Itoa(int((retryAfter+time.Second-1)/time.Second)))
	}
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(errorBody{Error: errorDetail{Message: msg, Type: typ, Code: code}})
}
