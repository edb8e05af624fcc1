package route

import (
	"cmp"
	"crypto/tls"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/types"
)

// HTTPTable is an immutable snapshot of the Gateway API routes: for every
// address the router listens on for Gateways, the listeners bound there and,
// for each, the rules that serve a request. Lookups take no lock and do not
// allocate; the gateway controller publishes a new table on every change of
// Gateways, routes, grants or certificates (never for endpoint changes,
// which swap a Backend's pool instead).
type HTTPTable struct {
	ports  map[string]*Port
	sorted []*Port
}

// NewHTTPTable returns a table of ports, keyed by address.
func NewHTTPTable(ports []*Port) *HTTPTable {
	t := &HTTPTable{ports: make(map[string]*Port, len(ports)), sorted: slices.Clone(ports)}
	for _, p := range ports {
		t.ports[p.Address] = p
	}
	slices.SortFunc(t.sorted, func(a, b *Port) int { return cmp.Compare(a.Address, b.Address) })
	return t
}

// Port returns what is served on a listen address, or nil.
func (t *HTTPTable) Port(address string) *Port {
	if t == nil {
		return nil
	}
	return t.ports[address]
}

// Ports returns every port, sorted by address.
func (t *HTTPTable) Ports() []*Port {
	if t == nil {
		return nil
	}
	return t.sorted
}

// Port is one address the router listens on (ip:port, or :port when
// Gateways share the router's address) and the Gateway listeners bound to
// it. All listeners on a port speak the same protocol.
type Port struct {
	Address string
	// TLS is set for HTTPS listeners: the port terminates TLS with the
	// listeners' certificates, chosen by SNI.
	TLS       bool
	listeners hostIndex[*Listener]
	all       []*Listener
}

// NewPort returns a port serving listeners, whose hostnames must differ.
func NewPort(address string, tls bool, listeners []*Listener) *Port {
	p := &Port{Address: address, TLS: tls, all: listeners}
	for _, l := range listeners {
		l.gatewayName = l.Gateway.String()
		p.listeners.add(l.Hostname, l)
	}
	return p
}

// Listeners returns the port's listeners.
func (p *Port) Listeners() []*Listener { return p.all }

// Listener returns the listener whose hostname most specifically covers a
// request's host (as RequestHost returns it), or nil.
func (p *Port) Listener(host string) *Listener {
	l, _ := p.listeners.lookup(host)
	return l
}

// Certificate returns the certificate for a TLS handshake: that of the
// listener the server name selects, or for a client that sends none (or
// one no listener covers), of the port's first listener with a
// certificate, so the handshake completes and the request gets a 404
// rather than a TLS alert.
func (p *Port) Certificate(hello *tls.ClientHelloInfo) *tls.Certificate {
	if l := p.Listener(RequestHost(hello.ServerName)); l != nil && len(l.Certificates) > 0 {
		return pickCertificate(l.Certificates, hello)
	}
	for _, l := range p.all {
		if len(l.Certificates) > 0 {
			return pickCertificate(l.Certificates, hello)
		}
	}
	return nil
}

func pickCertificate(certs []tls.Certificate, hello *tls.ClientHelloInfo) *tls.Certificate {
	for i := range certs {
		if hello.SupportsCertificate(&certs[i]) == nil {
			return &certs[i]
		}
	}
	return &certs[0]
}

// Listener is one Gateway listener and the routes attached to it, by host.
type Listener struct {
	Gateway types.NamespacedName
	Name    string
	// Hostname is the listener's hostname, "" for any.
	Hostname string
	// Port is the listener's port number, which a redirect without a
	// scheme or port keeps.
	Port int32
	// Scheme is "http" or "https".
	Scheme string
	// Certificates serve an HTTPS listener.
	Certificates []tls.Certificate
	hosts        hostIndex[*VirtualHost]
	gatewayName  string
}

// GatewayName is "<namespace>/<name>" of the listener's Gateway.
func (l *Listener) GatewayName() string { return l.gatewayName }

// AddHost attaches the matches that serve one effective hostname ("" for
// any) on the listener, and sorts them by precedence. A listener is
// finished once it is in a published table and must not change then.
func (l *Listener) AddHost(hostname string, matches []*Match) {
	v := &VirtualHost{Hostname: hostname, Matches: slices.Clone(matches)}
	slices.SortStableFunc(v.Matches, compareMatches)
	v.indexRuns()
	l.hosts.add(hostname, v)
}

// Route returns the match that serves a request, given its host as
// RequestHost returns it: among the routes of the most specific hostname
// covering the host, the first match in precedence order that the request
// satisfies; nil when there is none (a 404). Hostnames do not fall back:
// a request for a host that a more specific route hostname covers is
// served by those routes or not at all.
func (l *Listener) Route(r *http.Request, host string) *Match {
	v, ok := l.hosts.lookup(host)
	if !ok {
		return nil
	}
	ms := v.Matches
	for i := 0; i < len(ms); i++ {
		if v.runOf != nil && v.runOf[i] >= 0 {
			run := &v.runs[v.runOf[i]]
			if j, ok := run.lookup(r.Header); ok && ms[j].matches(r) {
				return ms[j]
			}
			i = run.end - 1
			continue
		}
		if ms[i].matches(r) {
			return ms[i]
		}
	}
	return nil
}

// VirtualHost is the matches on one effective hostname of a listener.
type VirtualHost struct {
	Hostname string
	Matches  []*Match
	// runs index stretches of Matches that differ only in the value of one
	// exact header match (a rule per model, selected by x-capstan-model):
	// one map lookup replaces a scan of the stretch. runOf[i] is the run
	// that starts at Matches[i], or -1; nil when there are no runs.
	runs  []headerRun
	runOf []int32
}

// headerRun is a stretch Matches[start:end] of equally specific matches
// with the same path and method, no query match, and one exact match on the
// same header each. Only the first of them with the request's header value
// can be the one that matches, so it is found by value.
type headerRun struct {
	start, end int
	header     string
	first      map[string]int
}

// minRun is the shortest stretch worth a map: below it a scan is as fast.
const minRun = 8

func (r *headerRun) lookup(h http.Header) (int, bool) {
	vv, ok := h[r.header]
	if !ok {
		return 0, false
	}
	v := vv[0]
	if len(vv) > 1 {
		v = strings.Join(vv, ",")
	}
	i, ok := r.first[v]
	return i, ok
}

// indexRuns finds the header runs of the sorted matches.
func (v *VirtualHost) indexRuns() {
	runnable := func(m *Match) bool { return len(m.Headers) == 1 && m.Headers[0].re == nil && len(m.Query) == 0 }
	same := func(a, b *Match) bool {
		return a.Path.Type == b.Path.Type && a.Path.Value == b.Path.Value && a.Method == b.Method && a.Headers[0].Name == b.Headers[0].Name
	}
	ms := v.Matches
	for i := 0; i < len(ms); {
		j := i + 1
		if runnable(ms[i]) {
			for j < len(ms) && runnable(ms[j]) && same(ms[i], ms[j]) {
				j++
			}
		}
		if j-i >= minRun {
			if v.runOf == nil {
				v.runOf = make([]int32, len(ms))
				for k := range v.runOf {
					v.runOf[k] = -1
				}
			}
			run := headerRun{start: i, end: j, header: ms[i].Headers[0].Name, first: make(map[string]int, j-i)}
			for k := i; k < j; k++ {
				if _, dup := run.first[ms[k].Headers[0].Value]; !dup {
					run.first[ms[k].Headers[0].Value] = k
				}
			}
			v.runOf[i] = int32(len(v.runs))
			v.runs = append(v.runs, run)
		}
		i = j
	}
}

// PathMatchType is how a Match compares paths.
type PathMatchType string

const (
	PathExact  PathMatchType = "Exact"
	PathPrefix PathMatchType = "PathPrefix"
	PathRegex  PathMatchType = "RegularExpression"
)

// PathMatch is a compiled path match.
type PathMatch struct {
	Type PathMatchType
	// Value is the path, for a prefix without a trailing slash ("/" stays
	// "/"), or the regular expression.
	Value string
	re    *regexp.Regexp
}

// NewPathMatch compiles a path match. A regular expression must match the
// whole path (RE2 syntax).
func NewPathMatch(typ PathMatchType, value string) (PathMatch, error) {
	m := PathMatch{Type: typ, Value: value}
	switch typ {
	case PathPrefix:
		if len(value) > 1 {
			m.Value = strings.TrimRight(value, "/")
			if m.Value == "" {
				m.Value = "/"
			}
		}
	case PathRegex:
		re, err := compileFull(value)
		if err != nil {
			return m, err
		}
		m.re = re
	}
	return m, nil
}

// compileFull compiles a regular expression that must match a whole value.
func compileFull(expr string) (*regexp.Regexp, error) {
	return regexp.Compile(`^(?:` + expr + `)$`)
}

func (m *PathMatch) matches(path string) bool {
	switch m.Type {
	case PathExact:
		return path == m.Value
	case PathPrefix:
		if m.Value == "/" {
			return true
		}
		// Element-wise: /foo matches /foo and /foo/bar, not /foobar.
		return strings.HasPrefix(path, m.Value) && (len(path) == len(m.Value) || path[len(m.Value)] == '/')
	case PathRegex:
		return m.re.MatchString(path)
	}
	return false
}

// HeaderMatch is a compiled header match.
type HeaderMatch struct {
	// Name is in canonical form.
	Name  string
	Value string
	re    *regexp.Regexp
}

// NewHeaderMatch compiles a header match; regex marks value as a regular
// expression that must match the whole value.
func NewHeaderMatch(name, value string, regex bool) (HeaderMatch, error) {
	m := HeaderMatch{Name: http.CanonicalHeaderKey(name), Value: value}
	if regex {
		re, err := compileFull(value)
		if err != nil {
			return m, err
		}
		m.re = re
	}
	return m, nil
}

func (m *HeaderMatch) matches(h http.Header) bool {
	vv, ok := h[m.Name]
	if !ok {
		return false
	}
	v := vv[0]
	if len(vv) > 1 {
		// A repeated header counts as its values joined, as RFC 9110
		// section 5.3 allows a proxy to combine them.
		v = strings.Join(vv, ",")
	}
	if m.re != nil {
		return m.re.MatchString(v)
	}
	return v == m.Value
}

// QueryMatch is a compiled query parameter match.
type QueryMatch struct {
	Name  string
	Value string
	re    *regexp.Regexp
}

// NewQueryMatch compiles a query parameter match; regex marks value as a
// regular expression that must match the whole value.
func NewQueryMatch(name, value string, regex bool) (QueryMatch, error) {
	m := QueryMatch{Name: name, Value: value}
	if regex {
		re, err := compileFull(value)
		if err != nil {
			return m, err
		}
		m.re = re
	}
	return m, nil
}

func (m *QueryMatch) matches(rawQuery string) bool {
	v, ok := queryValue(rawQuery, m.Name)
	if !ok {
		return false
	}
	if m.re != nil {
		return m.re.MatchString(v)
	}
	return v == m.Value
}

// queryValue returns the first value of a query parameter. It scans the raw
// query instead of parsing it into a map, and allocates only for a name or
// value that is percent-encoded.
func queryValue(rawQuery, name string) (string, bool) {
	for rawQuery != "" {
		var pair string
		pair, rawQuery, _ = strings.Cut(rawQuery, "&")
		if pair == "" {
			continue // as url.ParseQuery: "a=1&&b" has no empty name
		}
		k, v, _ := strings.Cut(pair, "=")
		if strings.ContainsAny(k, "%+") {
			var err error
			if k, err = url.QueryUnescape(k); err != nil {
				continue
			}
		}
		if k != name {
			continue
		}
		if strings.ContainsAny(v, "%+") {
			u, err := url.QueryUnescape(v)
			if err != nil {
				return "", false
			}
			v = u
		}
		return v, true
	}
	return "", false
}

// Match is one compiled HTTPRouteMatch of a rule. All of its conditions
// must hold.
type Match struct {
	Path    PathMatch
	Method  string
	Headers []HeaderMatch
	Query   []QueryMatch
	Rule    *Rule
	// Order breaks ties between matches of equal specificity.
	Order Order
}

// Order is where a match stands among equally specific matches on a host:
// the oldest route first, then by namespace/name, then rule and match
// index, as the Gateway API specifies.
type Order struct {
	Created time.Time
	Route   types.NamespacedName
	Rule    int
	Match   int
}

func (m *Match) matches(r *http.Request) bool {
	if !m.Path.matches(r.URL.Path) {
		return false
	}
	if m.Method != "" && r.Method != m.Method {
		return false
	}
	for i := range m.Headers {
		if !m.Headers[i].matches(r.Header) {
			return false
		}
	}
	for i := range m.Query {
		if !m.Query[i].matches(r.URL.RawQuery) {
			return false
		}
	}
	return true
}

// pathRank orders path match types: an exact path first, then regular
// expressions (whose place the Gateway API leaves to implementations), then
// prefixes.
func pathRank(t PathMatchType) int {
	switch t {
	case PathExact:
		return 0
	case PathRegex:
		return 1
	}
	return 2
}

// compareMatches orders matches by Gateway API precedence: exact path, then
// the longest path (prefix), then a method match, then more header matches,
// then more query matches; ties go to the oldest route, then by
// namespace/name, then rule and match order.
func compareMatches(a, b *Match) int {
	if c := cmp.Compare(pathRank(a.Path.Type), pathRank(b.Path.Type)); c != 0 {
		return c
	}
	if c := cmp.Compare(len(b.Path.Value), len(a.Path.Value)); c != 0 {
		return c
	}
	if c := cmp.Compare(boolRank(a.Method != ""), boolRank(b.Method != "")); c != 0 {
		return c
	}
	if c := cmp.Compare(len(b.Headers), len(a.Headers)); c != 0 {
		return c
	}
	if c := cmp.Compare(len(b.Query), len(a.Query)); c != 0 {
		return c
	}
	if c := a.Order.Created.Compare(b.Order.Created); c != 0 {
		return c
	}
	if c := cmp.Compare(a.Order.Route.String(), b.Order.Route.String()); c != 0 {
		return c
	}
	if c := cmp.Compare(a.Order.Rule, b.Order.Rule); c != 0 {
		return c
	}
	return cmp.Compare(a.Order.Match, b.Order.Match)
}

func boolRank(set bool) int {
	if set {
		return 0
	}
	return 1
}
