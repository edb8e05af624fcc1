package picker

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/structpb"
	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/router/discovery"
)

// perMessagePicker answers as lwepp (the extension's pkg/lwepp, v1.6.0)
// does: one empty answer to every request body message, its pick (the
// endpoint in the header and in the envoy.lb metadata) just before the
// answer to the last one, and the served endpoint, as a header, in its
// answer to the response headers. extra more answers to the body follow
// the last one (a picker that does not keep count).
type perMessagePicker struct {
	extprocv3.UnimplementedExternalProcessorServer
	pick  string
	extra int
}

func (p *perMessagePicker) Process(srv extprocv3.ExternalProcessor_ProcessServer) error {
	bodyAnswer := &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{}}}
	for {
		req, err := srv.Recv()
		if err != nil {
			return nil
		}
		var out []*extprocv3.ProcessingResponse
		switch r := req.Request.(type) {
		case *extprocv3.ProcessingRequest_RequestBody:
			if r.RequestBody.EndOfStream {
				out = append(out, &extprocv3.ProcessingResponse{
					Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{}},
					DynamicMetadata: &structpb.Struct{Fields: map[string]*structpb.Value{LBNamespace: structpb.NewStructValue(&structpb.Struct{
						Fields: map[string]*structpb.Value{DestinationKey: structpb.NewStringValue(p.pick)}})}},
				})
				for range p.extra {
					out = append(out, bodyAnswer)
				}
			}
			out = append(out, bodyAnswer)
		case *extprocv3.ProcessingRequest_ResponseHeaders:
			served := req.GetMetadataContext().GetFilterMetadata()[LBNamespace].GetFields()[ServedKey].GetStringValue()
			out = append(out, &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{ResponseHeaders: &extprocv3.HeadersResponse{
				Response: &extprocv3.CommonResponse{HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{
					{Header: &corev3.HeaderValue{Key: "x-served", RawValue: []byte(served)}}}}}}}})
		}
		for _, resp := range out {
			if err := srv.Send(resp); err != nil {
				return err
			}
		}
	}
}

// serve serves a picker on loopback as Service ns/epp port 9002 until the
// test ends and returns a client of it (plaintext HTTP/2).
func serve(t testing.TB, p extprocv3.ExternalProcessorServer) *Client {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	extprocv3.RegisterExternalProcessorServer(s, p)
	go func() { _ = s.Serve(l) }()
	t.Cleanup(s.Stop)
	key := types.NamespacedName{Namespace: "ns", Name: "epp"}
	svc := &discovery.Service{Key: key, Ports: []discovery.Port{{Name: "grpc", Number: 9002,
		Endpoints: []discovery.Endpoint{{Address: l.Addr().String(), Ready: true}}}}}
	c := New(Options{Timeout: 5 * time.Second, MaxBodyBytes: 1 << 20, Services: func(types.NamespacedName) *discovery.Service { return svc }})
	t.Cleanup(c.Close)
	return c
}

// A picker that answers each body message is understood whatever the
// body's size: its pick is used, and the served endpoint is reported and
// the picker's answer to it applied, the late answers to the body skipped.
// More answers to the body than messages sent are a protocol failure.
func TestAnswersToEveryBodyMessage(t *testing.T) {
	for name, tc := range map[string]struct {
		body    int
		extra   int
		wantErr string
	}{
		"one message":                     {body: 1 << 10},
		"three messages":                  {body: 2*bodyChunk + 1},
		"more answers than body messages": {body: 2*bodyChunk + 1, extra: 3, wantErr: "protocol: more answers to the request body than the 3 messages"},
	} {
		t.Run(name, func(t *testing.T) {
			c := serve(t, &perMessagePicker{pick: "198.18.0.2:8000", extra: tc.extra})
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			x, err := c.Pick(ctx, "ns/epp:9002", &Request{Method: "POST", Path: "/v1/completions", Authority: "a", Body: []byte(strings.Repeat("a", tc.body))})
			if err != nil {
				t.Fatal(err)
			}
			defer x.Close()
			if len(x.Endpoints) != 1 || x.Endpoints[0] != "198.18.0.2:8000" {
				t.Fatalf("picked %v", x.Endpoints)
			}
			m, err := x.Served("198.18.0.2:8000", 200, nil)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Served: %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(m.Set) != 1 || m.Set[0].GetHeader().GetKey() != "x-served" || string(m.Set[0].GetHeader().GetRawValue()) != "198.18.0.2:8000" {
				t.Errorf("the answer to the response headers: %v", m.Set)
			}
		})
	}
}

// BenchmarkPick is one request's exchange with a picker on loopback, as
// lwepp answers it: the pick (headers and body sent, the answer read) and
// the served report with its answer. The picker's own work, in the same
// process, is included.
func BenchmarkPick(b *testing.B) {
	for _, size := range []int{1 << 10, 220 << 10} {
		b.Run(fmt.Sprintf("body=%dKiB", size>>10), func(b *testing.B) {
			c := serve(b, &perMessagePicker{pick: "198.18.0.2:8000"})
			req := &Request{Method: "POST", Path: "/v1/completions", Authority: "a", Body: []byte(strings.Repeat("a", size)),
				Header: http.Header{"Content-Type": {"application/json"}, "X-Request-Id": {"0123456789abcdef"}}, Subset: []string{"198.18.0.1:8000", "198.18.0.2:8000"}}
			b.SetBytes(int64(size))
			b.ReportAllocs()
			for b.Loop() {
				x, err := c.Pick(context.Background(), "ns/epp:9002", req)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := x.Served("198.18.0.2:8000", 200, http.Header{"Content-Type": {"text/event-stream"}}); err != nil {
					b.Fatal(err)
				}
				x.Close()
			}
		})
	}
}
