package proxy

import (
	"cmp"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"

	"github.com/capstan-dev/capstan/router/route"
)

// modelObject is an entry of GET /v1/models: OpenAI's model object plus
// Capstan's view of the model's endpoints.
type modelObject struct {
	ID        string         `json:"id"`
	Object    string         `json:"object"`
	Created   int64          `json:"created"`
	OwnedBy   string         `json:"owned_by"`
	Endpoints endpointCounts `json:"endpoints"`
	Services  []string       `json:"services"`
	// Owner is the namespace the model name belongs to; SharedWith the
	// namespaces it pools with; Refused the Services of other namespaces
	// that claim the name and get no traffic.
	Owner      string         `json:"owner"`
	SharedWith []string       `json:"shared_with,omitempty"`
	Refused    []refusedClaim `json:"refused,omitempty"`
	// Held counts the requests this router holds for the model; Replicas
	// says, while it has no ready endpoint, what its pods are doing.
	Held     int    `json:"held,omitempty"`
	Replicas string `json:"replicas,omitempty"`
	// Parent is a LoRA adapter's base model, as vLLM names it; LoadedOn
	// the pods whose engines report the adapter loaded; Problems why it
	// is not served.
	Parent   string   `json:"parent,omitempty"`
	LoadedOn []string `json:"loaded_on,omitempty"`
	Problems []string `json:"problems,omitempty"`
}

type refusedClaim struct {
	Service string `json:"service"`
	Reason  string `json:"reason"`
}

type endpointCounts struct {
	Ready       int `json:"ready"`
	NotReady    int `json:"not_ready"`
	Terminating int `json:"terminating"`
	Total       int `json:"total"`
}

func (h *Handler) toObject(m *route.Model) modelObject {
	o := modelObject{ID: m.Name, Object: "model", OwnedBy: "capstan", Owner: m.Owner, SharedWith: m.SharedWith,
		Endpoints: endpointCounts{Ready: m.Ready, NotReady: m.NotReady, Terminating: m.Terminating, Total: m.Total}}
	for _, s := range m.Services {
		o.Services = append(o.Services, s.String())
	}
	for _, c := range m.Refused {
		o.Refused = append(o.Refused, refusedClaim{Service: c.Service.String(), Reason: c.Reason(m.Name)})
	}
	if h.opts.Holds != nil {
		o.Held = h.opts.Holds.Len(m.Name)
	}
	if m.Ready == 0 {
		o.Replicas, _ = h.replicas(m)
	}
	if m.Base != "" {
		o.Parent, o.Problems = m.Base, m.Problems
		for _, e := range m.Pool.Endpoints() {
			o.LoadedOn = append(o.LoadedOn, cmp.Or(e.Pod, e.Address))
		}
	}
	return o
}

// serveModels answers GET /v1/models (every model) and GET /v1/models/{id}.
func (h *Handler) serveModels(w http.ResponseWriter, r *http.Request, x *exchange) {
	table := h.routes.Table()
	var v any
	if id, ok := strings.CutPrefix(r.URL.Path, "/v1/models/"); ok {
		x.asked = id
		m := table.Lookup(id)
		if m == nil {
			x.status = http.StatusNotFound
			writeError(w, x.status, invalidRequest, codeModelNotFound, fmt.Sprintf("model %q is not served here", id), 0)
			return
		}
		x.model = m.Name
		v = h.toObject(m)
	} else {
		list := struct {
			Object string        `json:"object"`
			Data   []modelObject `json:"data"`
		}{Object: "list", Data: []modelObject{}}
		for _, m := range table.Models() {
			list.Data = append(list.Data, h.toObject(m))
		}
		for _, m := range table.Adapters() {
			list.Data = append(list.Data, h.toObject(m))
		}
		v = list
	}
	x.status = http.StatusOK
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(x.status)
	if r.Method != http.MethodHead {
		_ = json.NewEncoder(w).Encode(v)
	}
}
