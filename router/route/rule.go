package route

import (
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"

	"k8s.io/apimachinery/pkg/types"
)

// Rule is one compiled HTTPRoute rule: what happens to a request that one of
// its matches selected.
type Rule struct {
	// Route and Index name the rule (Name is its optional name).
	Route types.NamespacedName
	Index int
	Name  string
	// RequestHeaders and ResponseHeaders modify the request sent to the
	// backend and the response sent to the client.
	RequestHeaders, ResponseHeaders *HeaderModifier
	// Rewrite changes the host or path sent to the backend.
	Rewrite *Rewrite
	// Redirect, when set, answers the request with a redirect instead of
	// forwarding it.
	Redirect *Redirect
	// Fail, when set, says why every request the rule matches gets a 500:
	// the rule asks for something the router cannot do (an unsupported
	// filter), which the Gateway API forbids skipping.
	Fail string
	// Backends share the rule's traffic by weight.
	Backends []RuleBackend

	// total is the sum of the weights. A cycle is total picks: left[i]
	// is how many of the current cycle's picks Backends[i] still has
	// coming, leftTotal their sum (see Pick).
	total     uint64
	mu        sync.Mutex
	left      []uint64
	leftTotal uint64
	routeName string
}

// RouteName is "<namespace>/<name>" of the rule's route.
func (r *Rule) RouteName() string { return r.routeName }

// RuleBackend is one weighted backendRef of a rule.
type RuleBackend struct {
	Weight int32
	// Backend is the Service port, or nil when the reference is invalid
	// (Invalid says why) and its share of requests gets a 500.
	Backend *Backend
	Invalid string
	// RequestHeaders and ResponseHeaders are the backendRef's own
	// modifiers, applied after the rule's.
	RequestHeaders, ResponseHeaders *HeaderModifier
}

// SetBackends sets the rule's backends and prepares the weighted pick.
func (r *Rule) SetBackends(backends []RuleBackend) {
	r.routeName = r.Route.String()
	r.Backends = backends
	r.total = 0
	for _, b := range backends {
		r.total += uint64(max(b.Weight, 0))
	}
	r.left, r.leftTotal = make([]uint64, len(backends)), 0
}

// Pick returns the backend for the next request, or nil when the rule has
// no backend with a positive weight. Over each cycle of total-weight picks
// each backend gets exactly its weight, in a random order: each pick draws
// at random from what the cycle has left. Exact shares keep a small split
// (99/1) honest over few requests; the random order lets a backend take
// several requests in a row, as a weighted random pick would (a client
// that retries until one backend answers gets there).
func (r *Rule) Pick() *RuleBackend {
	if r.total == 0 {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.leftTotal == 0 {
		for i, b := range r.Backends {
			r.left[i] = uint64(max(b.Weight, 0))
		}
		r.leftTotal = r.total
	}
	n := rand.Uint64N(r.leftTotal)
	for i, left := range r.left {
		if n < left {
			r.left[i]--
			r.leftTotal--
			return &r.Backends[i]
		}
		n -= left
	}
	return nil // unreachable: n < leftTotal, the sum of left
}

// HeaderModifier is a compiled RequestHeaderModifier or
// ResponseHeaderModifier filter. Names are in canonical form.
type HeaderModifier struct {
	Set, Add []Header
	Remove   []string
}

// Header is one header name and value.
type Header struct {
	Name, Value string
}

// NewHeaderModifier returns a modifier with canonical header names.
func NewHeaderModifier(set, add []Header, remove []string) *HeaderModifier {
	m := &HeaderModifier{}
	for _, h := range set {
		m.Set = append(m.Set, Header{http.CanonicalHeaderKey(h.Name), h.Value})
	}
	for _, h := range add {
		m.Add = append(m.Add, Header{http.CanonicalHeaderKey(h.Name), h.Value})
	}
	for _, name := range remove {
		m.Remove = append(m.Remove, http.CanonicalHeaderKey(name))
	}
	return m
}

// Apply modifies h: set headers replace any values, added ones are appended
// to existing values, removed ones go. Value slices of h may be shared with
// another header map (the client's request), so none is appended to in
// place.
func (m *HeaderModifier) Apply(h http.Header) {
	if m == nil {
		return
	}
	for _, s := range m.Set {
		h[s.Name] = []string{s.Value}
	}
	for _, a := range m.Add {
		h[a.Name] = append(slices.Clip(h[a.Name]), a.Value)
	}
	for _, name := range m.Remove {
		delete(h, name)
	}
}

// PathModifier replaces a request's path.
type PathModifier struct {
	// Full replaces the whole path; when empty, Prefix replaces the prefix
	// that the request's PathPrefix match matched.
	Full   string
	Prefix string
	// ReplaceFull says which of the two applies.
	ReplaceFull bool
}

// Apply returns the new path for path, which m matched.
func (p *PathModifier) Apply(path string, m *PathMatch) string {
	if p.ReplaceFull {
		return p.Full
	}
	rest := path
	switch m.Type {
	case PathPrefix:
		if m.Value != "/" {
			rest = path[len(m.Value):]
		}
	case PathExact:
		rest = ""
	}
	// rest is "" or starts with "/": the prefix matched whole segments.
	out := strings.TrimSuffix(p.Prefix, "/") + rest
	if out == "" {
		return "/"
	}
	if !strings.HasPrefix(out, "/") {
		out = "/" + out
	}
	return out
}

// Rewrite is a compiled URLRewrite filter.
type Rewrite struct {
	// Hostname replaces the Host header when set.
	Hostname string
	// Path replaces the path when set.
	Path *PathModifier
}

// Redirect is a compiled RequestRedirect filter.
type Redirect struct {
	// Scheme, Hostname and Port replace the request's when set.
	Scheme   string
	Hostname string
	Port     int32
	Path     *PathModifier
	// StatusCode is 301, 302, 303, 307 or 308.
	StatusCode int
}

// Location returns the redirect's target for a request that arrived with
// scheme on a listener with port listenerPort, for host (without port),
// path and raw query, matched by m. Without a port the redirect keeps the
// listener's port unless it changes the scheme, which implies the scheme's
// well-known port; a well-known port for the scheme is left out, as the
// Gateway API asks.
func (rd *Redirect) Location(scheme, host string, listenerPort int32, path, rawQuery string, m *PathMatch) string {
	port := listenerPort
	if rd.Scheme != "" {
		scheme = rd.Scheme
		port = wellKnownPort(scheme)
	}
	if rd.Port != 0 {
		port = rd.Port
	}
	if rd.Hostname != "" {
		host = rd.Hostname
	}
	if rd.Path != nil {
		path = rd.Path.Apply(path, m)
	}
	if port != 0 && port != wellKnownPort(scheme) {
		host = net.JoinHostPort(strings.Trim(host, "[]"), strconv.Itoa(int(port)))
	}
	var b strings.Builder
	b.WriteString(scheme)
	b.WriteString("://")
	b.WriteString(host)
	b.WriteString(path)
	if rawQuery != "" {
		b.WriteByte('?')
		b.WriteString(rawQuery)
	}
	return b.String()
}

func wellKnownPort(scheme string) int32 {
	switch scheme {
	case "http":
		return 80
	case "https":
		return 443
	}
	return 0
}
