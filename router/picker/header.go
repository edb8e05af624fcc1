package picker

import (
	"net/http"
	"slices"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/protobuf/types/known/structpb"
)

// HeaderMutation is a picker's change to a request's or a response's
// headers.
type HeaderMutation struct {
	Set    []*corev3.HeaderValueOption
	Remove []string
}

func (m *HeaderMutation) add(hm *extprocv3.HeaderMutation) {
	m.Set = append(m.Set, hm.GetSetHeaders()...)
	m.Remove = append(m.Remove, hm.GetRemoveHeaders()...)
}

// Apply makes the changes to h: removals, then each set header by its
// append_action (or the deprecated append flag, when the picker sets it).
// Pseudo-headers and framing headers are left alone: the router frames
// what it sends, and the request target comes from the route.
// APPEND_IF_EXISTS_OR_ADD, the protobuf default and what the reference
// pickers leave it at, does not repeat a value the header already has, so
// that a picker that echoes every response header back does not double
// them.
func (m *HeaderMutation) Apply(h http.Header) {
	for _, k := range m.Remove {
		if mutable(k) {
			delete(h, http.CanonicalHeaderKey(k))
		}
	}
	for _, o := range m.Set {
		k := o.GetHeader().GetKey()
		if !mutable(k) {
			continue
		}
		k, v := http.CanonicalHeaderKey(k), headerValue(o.GetHeader())
		action := o.GetAppendAction()
		//lint:ignore SA1019 Envoy still honours the deprecated append flag over append_action, and a picker may set it.
		if a := o.GetAppend(); a != nil {
			action = corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD
			if a.GetValue() {
				action = corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD
			}
		}
		_, exists := h[k]
		switch action {
		case corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD:
			if !slices.Contains(h[k], v) {
				h[k] = append(h[k], v)
			}
		case corev3.HeaderValueOption_ADD_IF_ABSENT:
			if !exists {
				h[k] = []string{v}
			}
		case corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD:
			h[k] = []string{v}
		case corev3.HeaderValueOption_OVERWRITE_IF_EXISTS:
			if exists {
				h[k] = []string{v}
			}
		}
	}
}

// mutable reports whether a picker may change a header.
func mutable(k string) bool {
	if strings.HasPrefix(k, ":") {
		return false
	}
	switch http.CanonicalHeaderKey(k) {
	case "Content-Length", "Transfer-Encoding", "Connection", "Host", "Keep-Alive", "Te", "Trailer", "Upgrade":
		return false
	}
	return true
}

func headerValue(h *corev3.HeaderValue) string {
	if len(h.GetRawValue()) > 0 {
		return string(h.GetRawValue())
	}
	return h.GetValue()
}

// headerMap is h in Envoy's form, lower-case keys, one entry per value,
// after the given pseudo-headers (name, value pairs).
func headerMap(h http.Header, pseudo ...string) *corev3.HeaderMap {
	m := &corev3.HeaderMap{Headers: make([]*corev3.HeaderValue, 0, len(h)+len(pseudo)/2)}
	for i := 0; i+1 < len(pseudo); i += 2 {
		m.Headers = append(m.Headers, &corev3.HeaderValue{Key: pseudo[i], RawValue: []byte(pseudo[i+1])})
	}
	for k, vv := range h {
		lk := strings.ToLower(k)
		for _, v := range vv {
			m.Headers = append(m.Headers, &corev3.HeaderValue{Key: lk, RawValue: []byte(v)})
		}
	}
	return m
}

// metadata is filter metadata with one value under namespace/key.
func metadata(namespace, key string, v *structpb.Value) *corev3.Metadata {
	return &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{namespace: {Fields: map[string]*structpb.Value{key: v}}}}
}

// destination is the picked endpoints in a response's dynamic metadata, or
// "".
func destination(resp *extprocv3.ProcessingResponse) string {
	return resp.GetDynamicMetadata().GetFields()[LBNamespace].GetStructValue().GetFields()[DestinationKey].GetStringValue()
}
