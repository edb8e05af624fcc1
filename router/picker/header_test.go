package picker

import (
	"net/http"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

func TestHeaderMutationApply(t *testing.T) {
	set := func(k, v string, action corev3.HeaderValueOption_HeaderAppendAction, appendFlag *bool) *corev3.HeaderValueOption {
		o := &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: k, RawValue: []byte(v)}, AppendAction: action}
		if appendFlag != nil {
			//lint:ignore SA1019 the deprecated flag is what this case tests.
			o.Append = wrapperspb.Bool(*appendFlag)
		}
		return o
	}
	yes, no := true, false
	for name, tc := range map[string]struct {
		m    HeaderMutation
		want http.Header
	}{
		"append adds a new value": {m: HeaderMutation{Set: []*corev3.HeaderValueOption{set("x-a", "2", corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD, nil)}},
			want: http.Header{"Content-Length": {"5"}, "X-A": {"1", "2"}, "X-B": {"b"}}},
		"append does not repeat a value": {m: HeaderMutation{Set: []*corev3.HeaderValueOption{set("x-a", "1", corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD, nil)}},
			want: http.Header{"Content-Length": {"5"}, "X-A": {"1"}, "X-B": {"b"}}},
		"add if absent, present": {m: HeaderMutation{Set: []*corev3.HeaderValueOption{set("x-a", "2", corev3.HeaderValueOption_ADD_IF_ABSENT, nil)}},
			want: http.Header{"Content-Length": {"5"}, "X-A": {"1"}, "X-B": {"b"}}},
		"add if absent, absent": {m: HeaderMutation{Set: []*corev3.HeaderValueOption{set("x-c", "3", corev3.HeaderValueOption_ADD_IF_ABSENT, nil)}},
			want: http.Header{"Content-Length": {"5"}, "X-A": {"1"}, "X-B": {"b"}, "X-C": {"3"}}},
		"overwrite or add": {m: HeaderMutation{Set: []*corev3.HeaderValueOption{set("x-a", "2", corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD, nil)}},
			want: http.Header{"Content-Length": {"5"}, "X-A": {"2"}, "X-B": {"b"}}},
		"overwrite if exists, absent": {m: HeaderMutation{Set: []*corev3.HeaderValueOption{set("x-c", "3", corev3.HeaderValueOption_OVERWRITE_IF_EXISTS, nil)}},
			want: http.Header{"Content-Length": {"5"}, "X-A": {"1"}, "X-B": {"b"}}},
		"the append flag wins, false": {m: HeaderMutation{Set: []*corev3.HeaderValueOption{set("x-a", "2", corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD, &no)}},
			want: http.Header{"Content-Length": {"5"}, "X-A": {"2"}, "X-B": {"b"}}},
		"the append flag wins, true": {m: HeaderMutation{Set: []*corev3.HeaderValueOption{set("x-a", "2", corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD, &yes)}},
			want: http.Header{"Content-Length": {"5"}, "X-A": {"1", "2"}, "X-B": {"b"}}},
		"remove": {m: HeaderMutation{Remove: []string{"x-b"}}, want: http.Header{"Content-Length": {"5"}, "X-A": {"1"}}},
		"pseudo and framing headers left alone": {m: HeaderMutation{Remove: []string{"content-length"}, Set: []*corev3.HeaderValueOption{
			set(":path", "/x", corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD, nil), set("host", "evil", corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD, nil),
			set("transfer-encoding", "chunked", corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD, nil)}},
			want: http.Header{"Content-Length": {"5"}, "X-A": {"1"}, "X-B": {"b"}}},
	} {
		t.Run(name, func(t *testing.T) {
			h := http.Header{"X-A": {"1"}, "X-B": {"b"}, "Content-Length": {"5"}}
			tc.m.Apply(h)
			if diff := cmp.Diff(tc.want, h); diff != "" {
				t.Errorf("headers (-want +got):\n%s", diff)
			}
		})
	}
}
