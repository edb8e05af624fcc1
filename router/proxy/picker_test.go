package proxy

import (
	"encoding/json"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/structpb"
	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/router/discovery"
	"github.com/capstan-dev/capstan/router/inferencepool"
	"github.com/capstan-dev/capstan/router/picker"
	"github.com/capstan-dev/capstan/router/route"
)

// testPicker is an endpoint picker on loopback that behaves like the
// extension's lwepp: it reads the request headers and the body to its end,
// then answers with answer's messages; on the response headers it records
// the served endpoint and sets x-conformance-test-served-endpoint to it.
type testPicker struct {
	extprocv3.UnimplementedExternalProcessorServer
	// answer returns the answer to a request's headers and body; nil
	// means never answer (a stalled picker).
	answer func(body []byte) []*extprocv3.ProcessingResponse

	mu     sync.Mutex
	subset []any
	body   string
	served string
}

func (p *testPicker) Process(srv extprocv3.ExternalProcessor_ProcessServer) error {
	var body []byte
	for {
		req, err := srv.Recv()
		if err != nil {
			return nil
		}
		end := false
		switch r := req.Request.(type) {
		case *extprocv3.ProcessingRequest_RequestHeaders:
			p.mu.Lock()
			p.subset = req.GetMetadataContext().GetFilterMetadata()[picker.SubsetNamespace].AsMap()[picker.SubsetKey].([]any)
			p.mu.Unlock()
			end = r.RequestHeaders.EndOfStream
		case *extprocv3.ProcessingRequest_RequestBody:
			body = append(body, r.RequestBody.Body...)
			end = r.RequestBody.EndOfStream
		case *extprocv3.ProcessingRequest_ResponseHeaders:
			served := req.GetMetadataContext().GetFilterMetadata()[picker.LBNamespace].AsMap()[picker.ServedKey].(string)
			p.mu.Lock()
			p.served = served
			p.mu.Unlock()
			if err := srv.Send(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{
				ResponseHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{HeaderMutation: setHeaders("x-conformance-test-served-endpoint", served)}}}}); err != nil {
				return err
			}
		}
		if !end {
			continue
		}
		p.mu.Lock()
		p.body = string(body)
		p.mu.Unlock()
		if p.answer == nil {
			<-srv.Context().Done()
			return nil
		}
		for _, resp := range p.answer(body) {
			if err := srv.Send(resp); err != nil {
				return err
			}
		}
	}
}

// seen returns what the picker was told of the last request.
func (p *testPicker) seen() (subset []any, body, served string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.subset, p.body, p.served
}

func setHeaders(kv ...string) *extprocv3.HeaderMutation {
	m := &extprocv3.HeaderMutation{}
	for i := 0; i+1 < len(kv); i += 2 {
		m.SetHeaders = append(m.SetHeaders, &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: kv[i], RawValue: []byte(kv[i+1])}})
	}
	return m
}

// picks answers as lwepp does: the endpoints in the header and in the
// envoy.lb metadata, an extra header, then the body's answer (which may
// replace the body).
func picks(list string, body *extprocv3.BodyMutation) func([]byte) []*extprocv3.ProcessingResponse {
	return func(b []byte) []*extprocv3.ProcessingResponse {
		out := []*extprocv3.ProcessingResponse{{
			Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{
				HeaderMutation: setHeaders(picker.DestinationKey, list, "x-echo-set-header", "x-picked:"+list)}}},
			DynamicMetadata: &structpb.Struct{Fields: map[string]*structpb.Value{picker.LBNamespace: structpb.NewStructValue(&structpb.Struct{
				Fields: map[string]*structpb.Value{picker.DestinationKey: structpb.NewStringValue(list)}})}},
		}}
		if len(b) > 0 {
			out = append(out, &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{
				RequestBody: &extprocv3.BodyResponse{Response: &extprocv3.CommonResponse{BodyMutation: body}}}})
		}
		return out
	}
}

// metadataOnly answers with the endpoints in the envoy.lb metadata alone.
func metadataOnly(list string) func([]byte) []*extprocv3.ProcessingResponse {
	return func([]byte) []*extprocv3.ProcessingResponse {
		return []*extprocv3.ProcessingResponse{
			{Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{}},
				DynamicMetadata: &structpb.Struct{Fields: map[string]*structpb.Value{picker.LBNamespace: structpb.NewStructValue(&structpb.Struct{
					Fields: map[string]*structpb.Value{picker.DestinationKey: structpb.NewStringValue(list)}})}}},
			{Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{}}},
		}
	}
}

// sheds answers every request with an immediate response.
func sheds(code typev3.StatusCode, body string) func([]byte) []*extprocv3.ProcessingResponse {
	return func([]byte) []*extprocv3.ProcessingResponse {
		return []*extprocv3.ProcessingResponse{{Response: &extprocv3.ProcessingResponse_ImmediateResponse{ImmediateResponse: &extprocv3.ImmediateResponse{
			Status: &typev3.HttpStatus{Code: code}, Headers: setHeaders("content-type", "text/plain", "x-shed", "yes"), Body: []byte(body)}}}}
	}
}

// servePicker serves p on loopback and returns its address.
func servePicker(t *testing.T, p *testPicker) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	extprocv3.RegisterExternalProcessorServer(s, p)
	go s.Serve(l)
	t.Cleanup(s.Stop)
	return l.Addr().String()
}

// pickerFixture serves one InferencePool, ns/pool, on the path /pool, whose
// endpoint picker is Service ns/epp port 9002 with the given endpoint.
type pickerFixture struct {
	*gatewayFixture
}

func newPickerFixture(t *testing.T, failOpen bool, eppAddr string, eps []backend) *pickerFixture {
	t.Helper()
	f := &pickerFixture{}
	f.gatewayFixture = newGatewayFixture(t, nil, func(map[string]*route.Backend) map[string][]*route.Match { return nil }, func(o *Options) {
		o.Picker = picker.New(picker.Options{Timeout: 300 * time.Millisecond, MaxBodyBytes: 1 << 10,
			Services: func(k types.NamespacedName) *discovery.Service { return f.builder.Service(k) }})
		t.Cleanup(o.Picker.Close)
	})
	epp := types.NamespacedName{Namespace: "ns", Name: "epp"}
	f.builder.ServiceChanged(epp, &discovery.Service{Key: epp, Ports: []discovery.Port{{Name: "grpc", Number: 9002,
		Endpoints: []discovery.Endpoint{{Address: eppAddr, Ready: true}}}}})
	pool := &inferencepool.Pool{Key: types.NamespacedName{Namespace: "ns", Name: "pool"}, EndpointPicker: "ns/epp:9002", FailOpen: failOpen}
	for _, b := range eps {
		pool.Endpoints = append(pool.Endpoints, discovery.Endpoint{Address: b.addr, Pod: types.NamespacedName{Namespace: "ns", Name: b.pod}, Ready: b.ready})
	}
	f.builder.PoolChanged(pool.Key, pool)
	key := route.BackendKey{Pool: pool.Key}
	backend := f.builder.SyncBackends([]route.BackendKey{key})[key]
	l := &route.Listener{Gateway: types.NamespacedName{Namespace: "ns", Name: "gw"}, Name: "http", Port: 80, Scheme: "http"}
	l.AddHost("", []*route.Match{match(newRule(0, route.RuleBackend{Weight: 1, Backend: backend}), mustMatch(route.NewPathMatch(route.PathPrefix, "/")))})
	f.table = route.NewHTTPTable([]*route.Port{route.NewPort(gatewayAddr, false, []*route.Listener{l})})
	return f
}

// resetting is a model server stand-in that reads the request and closes
// the connection without answering: the request reached it.
func resetting(t *testing.T, pod string) backend {
	return startBackend(t, pod, func(w http.ResponseWriter, r *http.Request) {
		io.ReadAll(r.Body)
		panic(http.ErrAbortHandler)
	})
}

// The picker's endpoints are tried in its order, only Ready ones, and the
// next one only when the last reached no model server; what the picker
// changes in the request reaches the model server, and the served endpoint
// is reported back, its answer reaching the client.
func TestEndpointPickerPicks(t *testing.T) {
	a, b := echoUpstream(t, "a"), echoUpstream(t, "b")
	dead := backend{addr: deadAddr(t), pod: "dead", ready: true}
	reset := resetting(t, "reset")
	notReady := echoUpstream(t, "not-ready")
	notReady.ready = false
	pool := []backend{a, b, dead, reset, notReady}
	ready := []any{}
	for _, e := range pool {
		if e.ready {
			ready = append(ready, e.addr)
		}
	}
	slices.SortFunc(ready, func(x, y any) int { return strings.Compare(x.(string), y.(string)) })
	replace := &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: []byte(`{"model":"rewritten"}`)}}
	for name, tc := range map[string]struct {
		answer func([]byte) []*extprocv3.ProcessingResponse
		// want is the pod that answers, "" for an error status.
		want, wantBody string
		status         int
		// served is the endpoint reported to the picker.
		served string
		// untouched are backends that must get no request.
		untouched []backend
	}{
		"the picked endpoint":            {answer: picks(b.addr, nil), want: "b", status: 200, served: b.addr, wantBody: `{"model":"m"}`, untouched: []backend{a}},
		"the endpoints in metadata only": {answer: metadataOnly(b.addr), want: "b", status: 200, served: b.addr, wantBody: `{"model":"m"}`, untouched: []backend{a}},
		"a replaced body":                {answer: picks(a.addr, replace), want: "a", status: 200, served: a.addr, wantBody: `{"model":"rewritten"}`},
		"the next after one that refuses": {answer: picks(dead.addr+","+b.addr+","+a.addr, nil), want: "b", status: 200, served: b.addr,
			wantBody: `{"model":"m"}`, untouched: []backend{a}},
		"not the next after one the request reached": {answer: picks(reset.addr+","+b.addr, nil), status: http.StatusBadGateway, untouched: []backend{b}},
		"a not-Ready endpoint skipped":               {answer: picks(notReady.addr+","+a.addr, nil), want: "a", status: 200, served: a.addr, wantBody: `{"model":"m"}`, untouched: []backend{notReady}},
		"only not-Ready endpoints":                   {answer: picks(notReady.addr+",198.18.0.1:8000", nil), status: http.StatusServiceUnavailable, untouched: []backend{notReady, a, b}},
	} {
		t.Run(name, func(t *testing.T) {
			p := &testPicker{answer: tc.answer}
			f := newPickerFixture(t, false, servePicker(t, p), pool)
			hits := map[string]int64{}
			for _, e := range tc.untouched {
				hits[e.pod] = e.hits.Load()
			}
			resp, data := f.do("POST", "h", "/v1/completions", "application/json", `{"model":"m"}`, "X-Client", "c")
			if resp.StatusCode != tc.status || resp.Header.Get("X-Upstream") != tc.want {
				t.Fatalf("%d from %q, want %d from %q: %s", resp.StatusCode, resp.Header.Get("X-Upstream"), tc.status, tc.want, data)
			}
			for _, e := range tc.untouched {
				if n := e.hits.Load() - hits[e.pod]; n != 0 {
					t.Errorf("%s got %d requests, want none", e.pod, n)
				}
			}
			subset, body, served := p.seen()
			if diff := cmp.Diff(ready, subset); diff != "" {
				t.Errorf("the subset hint (-want +got):\n%s", diff)
			}
			if body != `{"model":"m"}` {
				t.Errorf("the picker got the body %q", body)
			}
			if served != tc.served {
				t.Errorf("served endpoint reported %q, want %q", served, tc.served)
			}
			if tc.status != 200 {
				var e errorBody
				if err := json.Unmarshal([]byte(data), &e); err != nil || (tc.status == 503 && (e.Error.Code != codeEndpointPickerFailed || !strings.Contains(e.Error.Message, "none of them a Ready endpoint"))) {
					t.Errorf("not the error expected: %s", data)
				}
				return
			}
			if got := resp.Header.Get("X-Conformance-Test-Served-Endpoint"); got != tc.served {
				t.Errorf("the picker's response header: %q, want %q", got, tc.served)
			}
			var s seen
			if err := json.Unmarshal([]byte(data), &s); err != nil {
				t.Fatal(err)
			}
			if s.Body != tc.wantBody || s.Header.Get("X-Client") != "c" || s.Header.Get("X-Gateway-Destination-Endpoint") == "" && name != "the endpoints in metadata only" {
				t.Errorf("the model server got body %q, headers %v", s.Body, s.Header)
			}
		})
	}
}

// An immediate response from the picker (a shedding picker's 429 or 503)
// goes to the client as it is, and to no model server.
func TestEndpointPickerImmediateResponse(t *testing.T) {
	a := echoUpstream(t, "a")
	for _, code := range []typev3.StatusCode{typev3.StatusCode_TooManyRequests, typev3.StatusCode_ServiceUnavailable} {
		p := &testPicker{answer: sheds(code, "shed")}
		f := newPickerFixture(t, true, servePicker(t, p), []backend{a})
		resp, data := f.do("POST", "h", "/v1/completions", "application/json", `{"model":"m"}`)
		if resp.StatusCode != int(code) || data != "shed" || resp.Header.Get("X-Shed") != "yes" || resp.Header.Get("Content-Type") != "text/plain" ||
			resp.Header.Get("X-Request-Id") == "" || a.hits.Load() != 0 {
			t.Errorf("%d %q %v, %d model server hits; want %d shed", resp.StatusCode, data, resp.Header, a.hits.Load(), code)
		}
	}
}

// A picker that cannot be reached or does not answer in time fails the
// request of a FailClose pool with a 503 naming it, and leaves a FailOpen
// pool's to the router's balancer; both are counted.
func TestEndpointPickerFailures(t *testing.T) {
	a := echoUpstream(t, "a")
	stalled := servePicker(t, &testPicker{})
	for name, tc := range map[string]struct {
		epp      string
		failOpen bool
		kind     string
		status   int
	}{
		"unreachable, fail open":  {epp: deadAddr(t), failOpen: true, kind: "unreachable", status: 200},
		"unreachable, fail close": {epp: deadAddr(t), kind: "unreachable", status: 503},
		"timeout, fail open":      {epp: stalled, failOpen: true, kind: "timeout", status: 200},
		"timeout, fail close":     {epp: stalled, kind: "timeout", status: 503},
	} {
		t.Run(name, func(t *testing.T) {
			f := newPickerFixture(t, tc.failOpen, tc.epp, []backend{a})
			start := time.Now()
			resp, data := f.do("POST", "h", "/v1/completions", "application/json", `{"model":"m"}`)
			if took := time.Since(start); took > 5*time.Second {
				t.Errorf("took %s: the picker's wait is not bounded", took)
			}
			if resp.StatusCode != tc.status {
				t.Fatalf("%d: %s", resp.StatusCode, data)
			}
			if tc.status == 503 {
				var e errorBody
				if err := json.Unmarshal([]byte(data), &e); err != nil || e.Error.Code != codeEndpointPickerFailed ||
					!strings.Contains(e.Error.Message, "endpoint picker Service ns/epp:9002: "+tc.kind) || !strings.Contains(e.Error.Message, "FailClose") {
					t.Errorf("not an error naming the picker and what went wrong: %s", data)
				}
			} else if resp.Header.Get("X-Upstream") != "a" {
				t.Errorf("fail open: answered by %q", resp.Header.Get("X-Upstream"))
			}
			pool := map[string]string{"pool": "ns/pool"}
			if v := f.metric("capstan_router_endpoint_picker_failures_total", map[string]string{"pool": "ns/pool", "kind": tc.kind}); v != 1 {
				t.Errorf("failures{kind=%s} = %v, want 1", tc.kind, v)
			}
			want := 0.0
			if tc.failOpen {
				want = 1
			}
			if v := f.metric("capstan_router_endpoint_picker_fail_open_total", pool); v != want {
				t.Errorf("fail_open_total = %v, want %v", v, want)
			}
		})
	}
}

// The connection to a picker follows its Service's Ready endpoints: a picker
// that was unreachable is asked once its Service has a live endpoint.
func TestEndpointPickerFollowsItsService(t *testing.T) {
	a := echoUpstream(t, "a")
	f := newPickerFixture(t, false, deadAddr(t), []backend{a})
	if resp, data := f.do("POST", "h", "/v1/completions", "application/json", `{"model":"m"}`); resp.StatusCode != 503 {
		t.Fatalf("with a dead picker: %d %s", resp.StatusCode, data)
	}
	epp := types.NamespacedName{Namespace: "ns", Name: "epp"}
	live := servePicker(t, &testPicker{answer: picks(a.addr, nil)})
	f.builder.ServiceChanged(epp, &discovery.Service{Key: epp, Ports: []discovery.Port{{Name: "grpc", Number: 9002,
		Endpoints: []discovery.Endpoint{{Address: deadAddr(t), Ready: false}, {Address: live, Ready: true}}}}})
	if resp, data := f.do("POST", "h", "/v1/completions", "application/json", `{"model":"m"}`); resp.StatusCode != 200 || resp.Header.Get("X-Upstream") != "a" {
		t.Errorf("with a live picker: %d from %q: %s", resp.StatusCode, resp.Header.Get("X-Upstream"), data)
	}
}
