package provider

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestMetricSelectorFilter(t *testing.T) {
	next := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusTeapot) })
	h := MetricSelectorFilter(next)
	const path = "/apis/custom.metrics.k8s.io/v1beta2/namespaces/ml/deployments.apps/llama/lora_adapter_waiting_pods"
	for _, tc := range []struct {
		target   string
		status   int
		contains string
	}{
		{path + "?metricLabelSelector=" + url.QueryEscape("adapter=support-bot-v3"), http.StatusTeapot, ""},
		{path, http.StatusTeapot, ""},
		// Parsed, and left to the provider to refuse.
		{path + "?metricLabelSelector=" + url.QueryEscape("adapter!=a"), http.StatusTeapot, ""},
		{path + "?metricLabelSelector=" + url.QueryEscape("adapter=("), http.StatusBadRequest, `invalid metric label selector "adapter=(": unable to parse requirement`},
		{path + "?metricLabelSelector=a&metricLabelSelector=" + url.QueryEscape("b in ("), http.StatusBadRequest, `invalid metric label selector "b in ("`},
		{path + "?metricLabelSelector=" + url.QueryEscape("adapter="+strings.Repeat("x", 64)), http.StatusBadRequest, "must be no more than 63 bytes"},
		// Not a custom metrics request.
		{"/healthz?metricLabelSelector=" + url.QueryEscape("adapter=("), http.StatusTeapot, ""},
	} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, tc.target, nil))
		if rec.Code != tc.status {
			t.Errorf("GET %s: %d, want %d", tc.target, rec.Code, tc.status)
			continue
		}
		if tc.status != http.StatusBadRequest {
			continue
		}
		var st metav1.Status
		if err := json.Unmarshal(rec.Body.Bytes(), &st); err != nil {
			t.Fatalf("GET %s: %v: %s", tc.target, err, rec.Body)
		}
		if st.Kind != "Status" || st.Reason != metav1.StatusReasonBadRequest || st.Code != http.StatusBadRequest || !strings.Contains(st.Message, tc.contains) {
			t.Errorf("GET %s: %+v, want a BadRequest Status saying %q", tc.target, st, tc.contains)
		}
	}
}
