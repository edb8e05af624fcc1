package provider

import (
	"fmt"
	"net/http"
	"strings"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apiserver/pkg/endpoints/handlers/responsewriters"
)

// MetricSelectorFilter answers 400 Bad Request, with the parse error, to a
// custom metrics request whose metricLabelSelector does not parse.
// custom-metrics-apiserver parses it before any provider sees it and answers
// a parse error 500, which says the server failed, not the request. It goes
// inside the server's authentication and authorization filters.
func MetricSelectorFilter(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/apis/custom.metrics.k8s.io/") {
			for _, sel := range r.URL.Query()["metricLabelSelector"] {
				if _, err := labels.Parse(sel); err != nil {
					st := apierrors.NewBadRequest(fmt.Sprintf("invalid metric label selector %q: %v", sel, err)).Status()
					st.Kind, st.APIVersion = "Status", "v1"
					responsewriters.WriteRawJSON(http.StatusBadRequest, st, w)
					return
				}
			}
		}
		next.ServeHTTP(w, r)
	})
}
