package app

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// The admin address serves health, metrics and (only when asked) profiles,
// and nothing of the API.
func TestAdminMux(t *testing.T) {
	reg := prometheus.NewRegistry()
	notReady := errors.New("caches not synced")
	var readyErr error = notReady
	for _, profiling := range []bool{false, true} {
		mux := newAdminMux(reg, func() error { return readyErr }, profiling)
		get := func(path string) int {
			w := httptest.NewRecorder()
			mux.ServeHTTP(w, httptest.NewRequest(http.MethodGet, path, nil))
			return w.Code
		}
		readyErr = notReady
		if c := get("/readyz"); c != http.StatusServiceUnavailable {
			t.Errorf("/readyz while not ready: %d", c)
		}
		readyErr = nil
		for path, want := range map[string]int{"/readyz": 200, "/healthz": 200, "/livez": 200, "/metrics": 200, "/v1/models": 404} {
			if c := get(path); c != want {
				t.Errorf("profiling=%v: GET %s = %d, want %d", profiling, path, c, want)
			}
		}
		if c, want := get("/debug/pprof/"), map[bool]int{false: 404, true: 200}[profiling]; c != want {
			t.Errorf("profiling=%v: /debug/pprof/ = %d, want %d", profiling, c, want)
		}
	}
}

func TestAdminAddressMustDiffer(t *testing.T) {
	o := NewOptions()
	o.AdminBindAddress = o.BindAddress
	if err := o.Validate(); err == nil {
		t.Error("the admin address may be the API's")
	}
}
