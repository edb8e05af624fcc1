// Package picker is the client side of the Gateway API Inference
// Extension's endpoint-picker protocol (docs/proposals/004 of
// sigs.k8s.io/gateway-api-inference-extension v1.6.0): for each request to
// an InferencePool with an endpointPickerRef, the router opens an Envoy
// ext_proc v3 stream to the picker (EPP) Service, sends the request headers
// and body, and reads back the endpoints to use, in order, and the changes
// to make to the request; once a model server has answered, it reports on
// the same stream which endpoint served the request and takes the changes
// the picker makes to the response headers.
//
// The body is sent the way Envoy sends it in FULL_DUPLEX_STREAMED mode:
// right after the headers, without waiting for the headers' answer. The
// reference pickers (the EPP, lwepp) answer the headers only once the body
// has ended, so a client that waited, as BUFFERED mode does, would wait
// for ever. The response body is never sent: a stream must not wait on the
// picker.
//
// Pickers are reached without kube-proxy: the router dials the Ready
// endpoints of the picker Service from its own Service discovery, over one
// gRPC connection per Service that follows the Service's endpoints.
package picker

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	"k8s.io/apimachinery/pkg/types"

	"github.com/capstan-dev/capstan/router/discovery"
)

// Metadata namespaces and keys of the protocol.
const (
	// SubsetNamespace and SubsetKey carry, in the request's filter
	// metadata, the endpoints the picker must choose from.
	SubsetNamespace = "envoy.lb.subset_hint"
	SubsetKey       = "x-gateway-destination-endpoint-subset"
	// LBNamespace holds DestinationKey in the picker's dynamic metadata and
	// ServedKey in the response's filter metadata.
	LBNamespace = "envoy.lb"
	// DestinationKey is the header and metadata key of the picked
	// endpoints, "ip:port" joined by commas, in the order to try them.
	DestinationKey = "x-gateway-destination-endpoint"
	// ServedKey reports the endpoint that served the request.
	ServedKey = "x-gateway-destination-endpoint-served"
)

// bodyChunk is the most request body one ext_proc message carries, well
// under gRPC's default 4 MiB message limit of the picker's server.
const bodyChunk = 256 << 10

// maxConns bounds the picker Services the client keeps a connection to;
// the least recently used one is closed to make room.
const maxConns = 64

// Options configures a Client.
type Options struct {
	// Timeout bounds each wait on a picker: the whole pick (connecting,
	// sending the request, its answer) and the answer to the response
	// headers.
	Timeout time.Duration
	// Services returns the latest snapshot of a Service, nil when unknown.
	Services func(types.NamespacedName) *discovery.Service
	// MaxBodyBytes bounds a request body the picker replaces.
	MaxBodyBytes int64
	// TLS speaks TLS to pickers without verifying their certificate, as
	// Envoy-based gateways do: the reference pickers serve a self-signed
	// one by default. Without it, the connection is plaintext HTTP/2.
	TLS bool
}

// Kind is what went wrong with a picker.
type Kind string

// Failure kinds.
const (
	// Unreachable: the picker Service has no Ready endpoint, or none could
	// be connected to.
	Unreachable Kind = "unreachable"
	// Timeout: the picker did not answer within the timeout.
	Timeout Kind = "timeout"
	// Protocol: the picker answered with something the protocol does not
	// allow, or ended the stream with an error.
	Protocol Kind = "protocol"
	// NotReady: none of the endpoints the picker named is a Ready
	// endpoint of the pool (the caller decides that).
	NotReady Kind = "not_ready"
)

// Error is a failed exchange with a picker.
type Error struct {
	Kind Kind
	// Picker is the picker Service, "<namespace>/<name>:<port>".
	Picker string
	Err    error
}

func (e *Error) Error() string {
	return fmt.Sprintf("endpoint picker Service %s: %s: %v", e.Picker, e.Kind, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// Client asks endpoint pickers. It is safe for concurrent use.
type Client struct {
	opts  Options
	creds credentials.TransportCredentials

	mu    sync.Mutex
	conns map[string]*conn
}

// conn is the gRPC connection to one picker Service; its resolver is fed
// the Service's Ready endpoints.
type conn struct {
	cc       *grpc.ClientConn
	resolver *manual.Resolver
	// snapshot is the Service snapshot the resolver last got.
	snapshot *discovery.Service
	used     time.Time
}

// New returns a Client.
func New(opts Options) *Client {
	c := &Client{opts: opts, conns: map[string]*conn{}, creds: insecure.NewCredentials()}
	if opts.TLS {
		// #nosec G402 -- see Options.TLS.
		c.creds = credentials.NewTLS(&tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12})
	}
	return c
}

// Close closes every connection.
func (c *Client) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, cn := range c.conns {
		_ = cn.cc.Close()
		delete(c.conns, k)
	}
}

// parseRef splits "<namespace>/<name>:<port>".
func parseRef(ref string) (types.NamespacedName, int32, error) {
	nsName, port, ok := strings.Cut(ref, ":")
	ns, name, ok2 := strings.Cut(nsName, "/")
	n, err := strconv.ParseInt(port, 10, 32)
	if !ok || !ok2 || err != nil {
		return types.NamespacedName{}, 0, fmt.Errorf("the reference names no Service port")
	}
	return types.NamespacedName{Namespace: ns, Name: name}, int32(n), nil
}

// conn returns the connection to a picker Service, its resolver updated
// with the Service's current Ready endpoints.
func (c *Client) conn(ref string) (*grpc.ClientConn, error) {
	key, port, err := parseRef(ref)
	if err != nil {
		return nil, err
	}
	svc := c.opts.Services(key)
	if svc == nil {
		return nil, fmt.Errorf("no Service %s", key)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	cn := c.conns[ref]
	if cn != nil && cn.snapshot == svc {
		cn.used = time.Now()
		return cn.cc, nil
	}
	var addrs []resolver.Address
	if p := svc.ServicePort(port); p != nil {
		for _, e := range p.Endpoints {
			if e.Ready && !e.Terminating {
				addrs = append(addrs, resolver.Address{Addr: e.Address})
			}
		}
	}
	if len(addrs) == 0 {
		return nil, fmt.Errorf("no Ready endpoint of Service %s on port %d", key, port)
	}
	if cn == nil {
		if len(c.conns) >= maxConns {
			c.evict()
		}
		r := manual.NewBuilderWithScheme("capstan-picker")
		cc, err := grpc.NewClient(r.Scheme()+":///"+ref,
			grpc.WithResolvers(r),
			grpc.WithTransportCredentials(c.creds),
			grpc.WithDefaultServiceConfig(`{"loadBalancingConfig":[{"round_robin":{}}]}`),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(int(c.opts.MaxBodyBytes)+bodyChunk)))
		if err != nil {
			return nil, err
		}
		cn = &conn{cc: cc, resolver: r}
		c.conns[ref] = cn
	}
	cn.resolver.UpdateState(resolver.State{Addresses: addrs})
	cn.snapshot, cn.used = svc, time.Now()
	return cn.cc, nil
}

// evict closes the least recently used connection. c.mu is held.
func (c *Client) evict() {
	var oldest string
	for k, cn := range c.conns {
		if oldest == "" || cn.used.Before(c.conns[oldest].used) {
			oldest = k
		}
	}
	_ = c.conns[oldest].cc.Close()
	delete(c.conns, oldest)
}

// Request is what a picker is told about a request.
type Request struct {
	// Method, Path (the request target) and Authority are sent as the
	// :method, :path and :authority pseudo-headers.
	Method, Path, Authority string
	Header                  http.Header
	Body                    []byte
	// Subset, when not empty, are the endpoints the picker must choose
	// from (the subset hint).
	Subset []string
}

// Exchange is an open stream to a picker and what the picker answered to
// the request.
type Exchange struct {
	// Endpoints are the picked endpoints, "ip:port", in the order to try
	// them; empty with Immediate.
	Endpoints []string
	// Header changes the request's headers.
	Header HeaderMutation
	// Body, when BodySet, replaces the request body.
	Body    []byte
	BodySet bool
	// Immediate, when set, is the picker's answer to the client instead of
	// a model server's (a 429 or a 503 from a shedding picker).
	Immediate *Immediate

	picker  string
	timeout time.Duration
	stream  extprocv3.ExternalProcessor_ProcessClient
	cancel  context.CancelFunc
	// bodyMessages is how many messages carried the request body: how
	// many answers to it may still be on their way (see served).
	bodyMessages int
}

// Immediate is a response the picker sends the client itself.
type Immediate struct {
	Status int
	Header HeaderMutation
	Body   []byte
}

// Pick opens a stream to the picker ref ("<namespace>/<name>:<port>"), sends
// the request and returns the picker's answer. The Exchange must be closed.
// An error is an *Error.
func (c *Client) Pick(ctx context.Context, ref string, req *Request) (*Exchange, error) {
	cc, err := c.conn(ref)
	if err != nil {
		return nil, &Error{Kind: Unreachable, Picker: ref, Err: err}
	}
	ctx, cancel := context.WithCancel(ctx)
	x := &Exchange{picker: ref, timeout: c.opts.Timeout, cancel: cancel}
	stop := x.bound()
	err = x.pick(ctx, cc, req, c.opts.MaxBodyBytes)
	if stop() {
		err = fmt.Errorf("no answer within %s", c.opts.Timeout)
		x.Close()
		return nil, &Error{Kind: Timeout, Picker: ref, Err: err}
	}
	if err != nil {
		x.Close()
		var pe *Error
		if !errors.As(err, &pe) {
			pe = &Error{Kind: Protocol, Picker: ref, Err: err}
		}
		return nil, pe
	}
	return x, nil
}

// bound cancels the stream unless the returned stop is called within the
// timeout; stop reports whether the timeout had passed, in which case the
// stream is cancelled (or about to be) whatever the wait returned.
func (x *Exchange) bound() (stop func() bool) {
	t := time.AfterFunc(x.timeout, x.cancel)
	return func() bool { return !t.Stop() }
}

// Close ends the stream.
func (x *Exchange) Close() { x.cancel() }

func (x *Exchange) pick(ctx context.Context, cc *grpc.ClientConn, req *Request, maxBody int64) error {
	stream, err := extprocv3.NewExternalProcessorClient(cc).Process(ctx)
	if err != nil {
		return streamError(x.picker, err)
	}
	x.stream = stream
	if err := x.sendRequest(req); err != nil {
		return err
	}
	var (
		headersDone, bodyDone = false, len(req.Body) == 0
		fromHeader, fromMeta  string
		streamed              []byte
	)
	for !headersDone || !bodyDone {
		resp, err := stream.Recv()
		if err != nil {
			return streamError(x.picker, err)
		}
		if v := destination(resp); v != "" {
			fromMeta = v
		}
		switch r := resp.Response.(type) {
		case *extprocv3.ProcessingResponse_ImmediateResponse:
			return x.immediate(r.ImmediateResponse)
		case *extprocv3.ProcessingResponse_RequestHeaders:
			headersDone = true
			if m := r.RequestHeaders.GetResponse().GetHeaderMutation(); m != nil {
				x.Header.add(m)
			}
		case *extprocv3.ProcessingResponse_RequestBody:
			cr := r.RequestBody.GetResponse()
			if m := cr.GetHeaderMutation(); m != nil {
				x.Header.add(m)
			}
			switch m := cr.GetBodyMutation().GetMutation().(type) {
			case *extprocv3.BodyMutation_StreamedResponse:
				streamed = append(streamed, m.StreamedResponse.Body...)
				if int64(len(streamed)) > maxBody {
					return fmt.Errorf("the replaced request body is larger than %d bytes", maxBody)
				}
				bodyDone = m.StreamedResponse.EndOfStream
				x.Body, x.BodySet = streamed, true
			case *extprocv3.BodyMutation_Body:
				if int64(len(m.Body)) > maxBody {
					return fmt.Errorf("the replaced request body is larger than %d bytes", maxBody)
				}
				x.Body, x.BodySet, bodyDone = m.Body, true, true
			case *extprocv3.BodyMutation_ClearBody:
				x.Body, x.BodySet, bodyDone = nil, m.ClearBody, true
			default:
				// The body goes on unchanged.
				bodyDone = true
			}
		default:
			return fmt.Errorf("an answer of type %T to a request", r)
		}
	}
	for _, m := range x.Header.Set {
		if strings.EqualFold(m.GetHeader().GetKey(), DestinationKey) {
			fromHeader = headerValue(m.GetHeader())
		}
	}
	list := fromHeader
	if list == "" {
		list = fromMeta
	}
	for ep := range strings.SplitSeq(list, ",") {
		if ep = strings.TrimSpace(ep); ep != "" {
			x.Endpoints = append(x.Endpoints, ep)
		}
	}
	if len(x.Endpoints) == 0 {
		return fmt.Errorf("the answer names no endpoint (neither the %s header nor %s metadata)", DestinationKey, LBNamespace)
	}
	return nil
}

// sendRequest sends the request headers and, without waiting for their
// answer, the body in chunks.
func (x *Exchange) sendRequest(req *Request) error {
	h := headerMap(req.Header, ":method", req.Method, ":path", req.Path, ":authority", req.Authority, ":scheme", "http")
	msg := &extprocv3.ProcessingRequest{
		Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{Headers: h, EndOfStream: len(req.Body) == 0}},
		// Told on the first message, as Envoy does: the body streams
		// without waiting, the response body is not sent.
		ProtocolConfig: &extprocv3.ProtocolConfiguration{RequestBodyMode: filterv3.ProcessingMode_FULL_DUPLEX_STREAMED, ResponseBodyMode: filterv3.ProcessingMode_NONE},
	}
	if len(req.Subset) > 0 {
		list := make([]*structpb.Value, len(req.Subset))
		for i, ep := range req.Subset {
			list[i] = structpb.NewStringValue(ep)
		}
		msg.MetadataContext = metadata(SubsetNamespace, SubsetKey, structpb.NewListValue(&structpb.ListValue{Values: list}))
	}
	if err := x.stream.Send(msg); err != nil {
		return streamError(x.picker, err)
	}
	for body := req.Body; len(body) > 0; {
		n := min(len(body), bodyChunk)
		chunk := &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{
			RequestBody: &extprocv3.HttpBody{Body: body[:n], EndOfStream: n == len(body)}}}
		if err := x.stream.Send(chunk); err != nil {
			return streamError(x.picker, err)
		}
		x.bodyMessages++
		body = body[n:]
	}
	return nil
}

func (x *Exchange) immediate(r *extprocv3.ImmediateResponse) error {
	code := int(r.GetStatus().GetCode())
	if code < 200 || code > 599 {
		return fmt.Errorf("an immediate response with status %d", code)
	}
	x.Immediate = &Immediate{Status: code, Body: r.GetBody()}
	if m := r.GetHeaders(); m != nil {
		x.Immediate.Header.add(m)
	}
	return nil
}

// Served reports the endpoint that served the request and the response's
// status and headers, and returns the picker's changes to the response
// headers. The wait is bounded by the timeout; the response body is never
// sent.
func (x *Exchange) Served(endpoint string, code int, header http.Header) (HeaderMutation, error) {
	stop := x.bound()
	m, err := x.served(endpoint, code, header)
	if stop() {
		return HeaderMutation{}, &Error{Kind: Timeout, Picker: x.picker, Err: fmt.Errorf("no answer to the response headers within %s", x.timeout)}
	}
	if err != nil {
		var pe *Error
		if !errors.As(err, &pe) {
			pe = &Error{Kind: Protocol, Picker: x.picker, Err: err}
		}
		return HeaderMutation{}, pe
	}
	return m, nil
}

func (x *Exchange) served(endpoint string, code int, header http.Header) (HeaderMutation, error) {
	var m HeaderMutation
	msg := &extprocv3.ProcessingRequest{
		Request: &extprocv3.ProcessingRequest_ResponseHeaders{
			ResponseHeaders: &extprocv3.HttpHeaders{Headers: headerMap(header, ":status", strconv.Itoa(code))}},
		MetadataContext: metadata(LBNamespace, ServedKey, structpb.NewStringValue(endpoint)),
	}
	if err := x.stream.Send(msg); err != nil {
		return m, streamError(x.picker, err)
	}
	// A picker may answer every body message, as lwepp does, the last
	// answers coming after its pick (which ended pick's wait): they are
	// skipped, at most one per body message sent.
	var r *extprocv3.ProcessingResponse_ResponseHeaders
	for late := 0; r == nil; late++ {
		resp, err := x.stream.Recv()
		if err != nil {
			return m, streamError(x.picker, err)
		}
		switch a := resp.Response.(type) {
		case *extprocv3.ProcessingResponse_ResponseHeaders:
			r = a
		case *extprocv3.ProcessingResponse_RequestBody:
			if late >= x.bodyMessages {
				return m, fmt.Errorf("more answers to the request body than the %d messages that carried it", x.bodyMessages)
			}
		default:
			return m, fmt.Errorf("an answer of type %T to the response headers", resp.Response)
		}
	}
	if hm := r.ResponseHeaders.GetResponse().GetHeaderMutation(); hm != nil {
		m.add(hm)
	}
	return m, nil
}

// streamError classifies a gRPC error: Unavailable before an answer means
// no picker endpoint could be reached; anything else is the picker's.
func streamError(picker string, err error) error {
	kind := Protocol
	switch status.Code(err) {
	case codes.Unavailable:
		kind = Unreachable
	case codes.DeadlineExceeded:
		kind = Timeout
	}
	return &Error{Kind: kind, Picker: picker, Err: err}
}
