package route

import (
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"k8s.io/apimachinery/pkg/types"
)

func TestHostnameMatches(t *testing.T) {
	for _, tc := range []struct {
		pattern, host string
		want          bool
	}{
		{"", "anything.example.com", true},
		{"example.com", "example.com", true},
		{"example.com", "www.example.com", false},
		{"*.example.com", "www.example.com", true},
		{"*.example.com", "a.b.example.com", true},
		{"*.example.com", "example.com", false},
		{"*.example.com", "wwwexample.com", false},
		{"*.example.com", "*.example.com", true},
		{"*.example.com", "*.foo.example.com", true},
		{"*.foo.example.com", "*.example.com", false},
		{"www.example.com", "*.example.com", false},
	} {
		if got := HostnameMatches(tc.pattern, tc.host); got != tc.want {
			t.Errorf("HostnameMatches(%q, %q) = %v, want %v", tc.pattern, tc.host, got, tc.want)
		}
	}
}

func TestIntersectHostnames(t *testing.T) {
	for name, tc := range map[string]struct {
		listener string
		route    []string
		want     []string
		ok       bool
	}{
		"neither has hostnames":             {"", nil, []string{""}, true},
		"only the listener":                 {"very.specific.com", nil, []string{"very.specific.com"}, true},
		"only the route":                    {"", []string{"a.com", "*.b.com"}, []string{"a.com", "*.b.com"}, true},
		"specific route, specific listener": {"very.specific.com", []string{"non.matching.com", "*.nonmatchingwildcard.io", "very.specific.com"}, []string{"very.specific.com"}, true},
		"specific routes under a wildcard listener": {"*.wildcard.io", []string{"non.matching.com", "wildcard.io", "foo.wildcard.io", "foo.bar.wildcard.io"},
			[]string{"foo.wildcard.io", "foo.bar.wildcard.io"}, true},
		"wildcard route narrows to the listener": {"very.specific.com", []string{"non.matching.com", "*.specific.com"}, []string{"very.specific.com"}, true},
		"equal wildcards":                        {"*.anotherwildcard.io", []string{"*.anotherwildcard.io"}, []string{"*.anotherwildcard.io"}, true},
		"narrower wildcard route":                {"*.example.com", []string{"*.foo.example.com"}, []string{"*.foo.example.com"}, true},
		"no intersection":                        {"foo.example.com", []string{"not-accepted.test.com"}, nil, false},
		"duplicates collapse":                    {"a.example.com", []string{"*.example.com", "a.example.com"}, []string{"a.example.com"}, true},
	} {
		t.Run(name, func(t *testing.T) {
			got, ok := IntersectHostnames(tc.listener, tc.route)
			if ok != tc.ok {
				t.Errorf("ok = %v, want %v", ok, tc.ok)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("hostnames (-want +got):\n%s", diff)
			}
		})
	}
}

func TestRequestHost(t *testing.T) {
	for in, want := range map[string]string{
		"example.com":            "example.com",
		"very.specific.com:1234": "very.specific.com",
		"Example.COM":            "example.com",
		"example.com.":           "example.com",
		"198.18.254.1:80":        "198.18.254.1",
		"[::1]:8080":             "[::1]",
		"[::1]":                  "[::1]",
	} {
		if got := RequestHost(in); got != want {
			t.Errorf("RequestHost(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestPortPicksTheMostSpecificListener(t *testing.T) {
	mk := func(name, hostname string) *Listener { return &Listener{Name: name, Hostname: hostname} }
	p := NewPort(":80", false, []*Listener{
		mk("any", ""), mk("bar", "bar.com"), mk("foo-bar", "foo.bar.com"), mk("wild-bar", "*.bar.com"), mk("wild-foo", "*.foo.com"), mk("wild-deep", "*.x.bar.com"),
	})
	for host, want := range map[string]string{
		"bar.com":                   "bar",
		"foo.bar.com":               "foo-bar",
		"baz.bar.com":               "wild-bar",
		"multiple.prefixes.bar.com": "wild-bar",
		"a.x.bar.com":               "wild-deep",
		"multiple.prefixes.foo.com": "wild-foo",
		"foo.com":                   "any",
		"no.matching.host":          "any",
	} {
		if got := p.Listener(host); got == nil || got.Name != want {
			t.Errorf("Listener(%q) = %v, want %s", host, got, want)
		}
	}
	if l := NewPort(":80", false, []*Listener{mk("only", "only.com")}).Listener("other.com"); l != nil {
		t.Errorf("a host no listener covers got listener %s", l.Name)
	}
}

// rt builds a match for tests.
type rt struct {
	route   string
	created int // minutes after an epoch
	rule    int
	path    PathMatch
	method  string
	headers []HeaderMatch
	query   []QueryMatch
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func prefix(v string) PathMatch { return must(NewPathMatch(PathPrefix, v)) }
func exact(v string) PathMatch  { return must(NewPathMatch(PathExact, v)) }

func buildListener(hosts map[string][]rt) *Listener {
	epoch := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	l := &Listener{Name: "l"}
	for host, specs := range hosts {
		var ms []*Match
		for i, s := range specs {
			key := types.NamespacedName{Namespace: "ns", Name: s.route}
			ms = append(ms, &Match{
				Path: s.path, Method: s.method, Headers: s.headers, Query: s.query,
				Rule:  &Rule{Route: key, Index: s.rule, Name: fmt.Sprintf("%s/%d", s.route, s.rule)},
				Order: Order{Created: epoch.Add(time.Duration(s.created) * time.Minute), Route: key, Rule: s.rule, Match: i},
			})
		}
		l.AddHost(host, ms)
	}
	return l
}

func routed(l *Listener, method, target string, header ...string) string {
	r := httptest.NewRequest(method, target, nil)
	for i := 0; i+1 < len(header); i += 2 {
		r.Header.Add(header[i], header[i+1])
	}
	m := l.Route(r, RequestHost(r.Host))
	if m == nil {
		return "404"
	}
	return m.Rule.Name
}

func TestMatchPrecedence(t *testing.T) {
	hdr := func(name, value string) []HeaderMatch { return []HeaderMatch{must(NewHeaderMatch(name, value, false))} }
	l := buildListener(map[string][]rt{"": {
		{route: "catchall", created: 5, path: prefix("/")},
		{route: "prefix-v1", created: 1, path: prefix("/v1/")},
		{route: "prefix-v1-chat", created: 9, path: prefix("/v1/chat")},
		{route: "exact", created: 9, path: exact("/v1/chat/completions")},
		{route: "method", created: 9, path: prefix("/v1"), method: "POST"},
		{route: "one-header", created: 0, path: prefix("/v1"), headers: hdr("x-capstan-model", "llama")},
		{route: "two-headers", created: 9, path: prefix("/v1"), headers: append(hdr("x-capstan-model", "llama"), hdr("version", "two")...)},
		{route: "query", created: 0, path: prefix("/q"), query: []QueryMatch{must(NewQueryMatch("animal", "whale", false))}},
		{route: "older", created: 1, path: prefix("/tie")},
		{route: "newer", created: 2, path: prefix("/tie")},
		{route: "b-same-age", created: 3, path: prefix("/alpha")},
		{route: "a-same-age", created: 3, path: prefix("/alpha")},
		{route: "rules", created: 3, rule: 1, path: prefix("/rules")},
		{route: "rules", created: 3, rule: 0, path: prefix("/rules")},
	}})
	for _, tc := range []struct {
		method, target string
		header         []string
		want           string
	}{
		{"GET", "/v1/chat/completions", nil, "exact/0"},
		{"GET", "/v1/chat/completions/more", nil, "prefix-v1-chat/0"},
		{"GET", "/v1/chatter", nil, "prefix-v1/0"},
		{"GET", "/v1/embeddings", nil, "prefix-v1/0"},
		{"POST", "/v1", nil, "method/0"},
		{"GET", "/v1", []string{"X-Capstan-Model", "llama"}, "one-header/0"},
		{"GET", "/v1", []string{"X-Capstan-Model", "llama", "Version", "two"}, "two-headers/0"},
		{"POST", "/v1", []string{"X-Capstan-Model", "llama", "Version", "two"}, "method/0"},
		{"GET", "/v1", []string{"X-Capstan-Model", "qwen"}, "prefix-v1/0"}, // "/v1/" matches "/v1"
		{"GET", "/v2", []string{"X-Capstan-Model", "llama"}, "catchall/0"},
		{"GET", "/q?animal=whale", nil, "query/0"},
		{"GET", "/q?animal=dolphin", nil, "catchall/0"},
		{"GET", "/tie", nil, "older/0"},
		{"GET", "/alpha", nil, "a-same-age/0"},
		{"GET", "/rules", nil, "rules/0"},
		{"GET", "/anything", nil, "catchall/0"},
	} {
		if got := routed(l, tc.method, tc.target, tc.header...); got != tc.want {
			t.Errorf("%s %s %v: routed to %s, want %s", tc.method, tc.target, tc.header, got, tc.want)
		}
	}
}

func TestHostsDoNotFallBack(t *testing.T) {
	l := buildListener(map[string][]rt{
		"very.specific.com": {{route: "s1", path: prefix("/s1")}},
		"*.specific.com":    {{route: "s3", path: prefix("/s3")}},
		"":                  {{route: "any", path: prefix("/")}},
	})
	for target, want := range map[string]string{
		"http://very.specific.com/s1":      "s1/0",
		"http://very.specific.com:1234/s1": "s1/0",
		"http://very.specific.com/s3":      "404", // the exact host's routes only
		"http://foo.specific.com/s3":       "s3/0",
		"http://foo.specific.com/s1":       "404",
		"http://other.com/s1":              "any/0",
	} {
		if got := routed(l, "GET", target); got != want {
			t.Errorf("GET %s: routed to %s, want %s", target, got, want)
		}
	}
}

func TestPathMatches(t *testing.T) {
	for _, tc := range []struct {
		m    PathMatch
		path string
		want bool
	}{
		{prefix("/foo"), "/foo", true},
		{prefix("/foo"), "/foo/", true},
		{prefix("/foo"), "/foo/bar", true},
		{prefix("/foo"), "/foobar", false},
		{prefix("/foo/"), "/foo", true}, // a trailing slash in the prefix is ignored
		{prefix("/foo/"), "/foobar", false},
		{prefix("/"), "/anything", true},
		{exact("/foo"), "/foo", true},
		{exact("/foo"), "/foo/", false},
		{must(NewPathMatch(PathRegex, "/v[0-9]+/.*")), "/v2/x", true},
		{must(NewPathMatch(PathRegex, "/v[0-9]+/.*")), "/x/v2/x", false}, // anchored
	} {
		if got := tc.m.matches(tc.path); got != tc.want {
			t.Errorf("%s %q matches %q = %v, want %v", tc.m.Type, tc.m.Value, tc.path, got, tc.want)
		}
	}
	if _, err := NewPathMatch(PathRegex, "(unclosed"); err == nil {
		t.Error("an invalid regular expression compiled")
	}
}

func TestHeaderMatches(t *testing.T) {
	h := http.Header{"Version": {"one"}, "Multi": {"a", "b"}}
	for _, tc := range []struct {
		name, value string
		regex       bool
		want        bool
	}{
		{"version", "one", false, true}, // names are case-insensitive
		{"Version", "One", false, false},
		{"Multi", "a,b", false, true},
		{"Missing", "", false, false},
		{"Version", "o.e", true, true},
		{"Version", "o", true, false},
	} {
		m := must(NewHeaderMatch(tc.name, tc.value, tc.regex))
		if got := m.matches(h); got != tc.want {
			t.Errorf("%s=%q (regex %v) = %v, want %v", tc.name, tc.value, tc.regex, got, tc.want)
		}
	}
}

func TestQueryValue(t *testing.T) {
	for _, tc := range []struct {
		raw, name, want string
		ok              bool
	}{
		{"animal=whale", "animal", "whale", true},
		{"a=1&animal=whale&animal=dolphin", "animal", "whale", true}, // the first value
		{"Animal=whale", "animal", "", false},                        // names are case-sensitive
		{"animal=blue%20whale", "animal", "blue whale", true},
		{"an%69mal=whale", "animal", "whale", true},
		{"animal", "animal", "", true},
		{"", "animal", "", false},
	} {
		got, ok := queryValue(tc.raw, tc.name)
		if got != tc.want || ok != tc.ok {
			t.Errorf("queryValue(%q, %q) = %q, %v, want %q, %v", tc.raw, tc.name, got, ok, tc.want, tc.ok)
		}
	}
}

func TestPickFollowsWeightsExactly(t *testing.T) {
	for _, weights := range [][]int32{{70, 30, 0}, {1}, {1, 1}, {3, 7}, {1000000, 1}, {0, 5, 0, 5}, {2, 2, 2}} {
		r := &Rule{}
		bs := make([]RuleBackend, len(weights))
		var total int
		for i, w := range weights {
			bs[i].Weight = w
			bs[i].Invalid = fmt.Sprint(i)
			total += int(w)
		}
		r.SetBackends(bs)
		counts := make([]int32, len(weights))
		for range total {
			counts[atoi(r.Pick().Invalid)]++
		}
		if diff := cmp.Diff(weights, counts); diff != "" {
			t.Errorf("weights %v: picks over one period (-want +got):\n%s", weights, diff)
		}
	}
	// The order within a cycle is random: with 70/30, the 30 takes
	// three in a row within a few cycles (a fixed spread never does).
	r := &Rule{}
	r.SetBackends([]RuleBackend{{Weight: 70, Invalid: "0"}, {Weight: 30, Invalid: "1"}})
	run, longest := 0, 0
	for range 1000 {
		if r.Pick().Invalid == "1" {
			run++
		} else {
			run = 0
		}
		longest = max(longest, run)
	}
	if longest < 3 {
		t.Errorf("in 1000 picks, the longest run of the backend weighted 30 is %d", longest)
	}
	if (&Rule{}).Pick() != nil {
		t.Error("a rule without backends picked one")
	}
	zero := &Rule{}
	zero.SetBackends([]RuleBackend{{Weight: 0}})
	if zero.Pick() != nil {
		t.Error("a rule whose weights are all 0 picked a backend")
	}
}

func atoi(s string) int {
	var n int
	fmt.Sscan(s, &n)
	return n
}

func TestHeaderModifier(t *testing.T) {
	shared := make([]string, 1, 2) // room to append in place, which must not happen
	shared[0] = "append-val-1"
	in := http.Header{"X-Header-Remove": {"remove-val"}, "X-Header-Add-Append": shared, "X-Header-Set": {"set-val"}}
	m := NewHeaderModifier(
		[]Header{{"x-header-set", "set-overwrites-values"}},
		[]Header{{"X-Header-Add", "header-val-1"}, {"x-header-add-append", "header-val-2"}},
		[]string{"x-header-remove"})
	m.Apply(in)
	want := http.Header{"X-Header-Add": {"header-val-1"}, "X-Header-Add-Append": {"append-val-1", "header-val-2"}, "X-Header-Set": {"set-overwrites-values"}}
	if diff := cmp.Diff(want, in); diff != "" {
		t.Errorf("headers (-want +got):\n%s", diff)
	}
	if shared[:2][1] != "" {
		t.Error("the client's header slice was appended to in place")
	}
	(*HeaderModifier)(nil).Apply(in) // a nil modifier does nothing
}

func TestPathModifier(t *testing.T) {
	for _, tc := range []struct {
		mod   PathModifier
		match PathMatch
		path  string
		want  string
	}{
		{PathModifier{Prefix: "/one"}, prefix("/prefix/one"), "/prefix/one/two", "/one/two"},
		{PathModifier{Prefix: "/"}, prefix("/strip-prefix"), "/strip-prefix/three", "/three"},
		{PathModifier{Prefix: "/"}, prefix("/strip-prefix"), "/strip-prefix", "/"},
		{PathModifier{Prefix: "/prefix"}, prefix("/prefix/rewrite-path-and-modify-headers"), "/prefix/rewrite-path-and-modify-headers/one", "/prefix/one"},
		{PathModifier{Prefix: "/new/"}, prefix("/old/"), "/old/x", "/new/x"},
		{PathModifier{Prefix: "/new"}, prefix("/"), "/x", "/new/x"},
		{PathModifier{Full: "/one", ReplaceFull: true}, prefix("/full/one"), "/full/one/two", "/one"},
		{PathModifier{Prefix: "/b"}, exact("/a"), "/a", "/b"},
	} {
		if got := tc.mod.Apply(tc.path, &tc.match); got != tc.want {
			t.Errorf("%+v on %s (matched %s %s) = %q, want %q", tc.mod, tc.path, tc.match.Type, tc.match.Value, got, tc.want)
		}
	}
}

func TestRedirectLocation(t *testing.T) {
	m := prefix("/old")
	for _, tc := range []struct {
		rd     Redirect
		scheme string
		port   int32
		want   string
	}{
		{Redirect{Hostname: "example.org"}, "http", 80, "http://example.org/old/x?q=1"},
		{Redirect{Port: 8083}, "http", 80, "http://gw.example.com:8083/old/x?q=1"},
		{Redirect{Hostname: "example.org", Port: 8083}, "http", 80, "http://example.org:8083/old/x?q=1"},
		{Redirect{Scheme: "https"}, "http", 80, "https://gw.example.com/old/x?q=1"}, // 443 is implied
		{Redirect{Scheme: "https", Port: 8443}, "http", 80, "https://gw.example.com:8443/old/x?q=1"},
		{Redirect{Scheme: "http", Port: 80}, "https", 443, "http://gw.example.com/old/x?q=1"},
		{Redirect{}, "http", 8080, "http://gw.example.com:8080/old/x?q=1"}, // the listener's port
		{Redirect{Path: &PathModifier{Prefix: "/new"}}, "http", 80, "http://gw.example.com/new/x?q=1"},
		{Redirect{Path: &PathModifier{Full: "/full", ReplaceFull: true}}, "http", 80, "http://gw.example.com/full?q=1"},
	} {
		if got := tc.rd.Location(tc.scheme, "gw.example.com", tc.port, "/old/x", "q=1", &m); got != tc.want {
			t.Errorf("%+v from %s:%d = %q, want %q", tc.rd, tc.scheme, tc.port, got, tc.want)
		}
	}
	if got := (&Redirect{Port: 8080}).Location("http", "[::1]", 80, "/", "", &m); got != "http://[::1]:8080/" {
		t.Errorf("IPv6 host: %q", got)
	}
}

// The header-run index answers exactly as a scan of the matches would.
func TestHeaderRunsMatchAScan(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 2))
	pick := func(xs ...string) string { return xs[rnd.IntN(len(xs))] }
	runs := 0
	defer func() {
		if runs < 100 {
			t.Errorf("only %d header runs in 200 rounds: the test proves little", runs)
		}
	}()
	for round := range 200 {
		var ms []*Match
		for i := 0; i < 60; i++ {
			if rnd.IntN(4) == 0 {
				// A block of rules selecting models by one header.
				path := must(NewPathMatch(PathMatchType(pick("PathPrefix", "Exact")), pick("/v1", "/")))
				name := pick("x-capstan-model", "version")
				for range minRun + rnd.IntN(8) {
					ms = append(ms, &Match{Path: path, Rule: &Rule{Index: i}, Order: Order{Rule: i},
						Headers: []HeaderMatch{must(NewHeaderMatch(name, pick("a", "b", "c", "d", "e", "f", "g", "h", "i", "j"), false))}})
					i++
				}
				continue
			}
			m := &Match{Path: must(NewPathMatch(PathMatchType(pick("PathPrefix", "PathPrefix", "Exact")), pick("/v1", "/v1", "/v2", "/"))),
				Rule: &Rule{Index: i}, Order: Order{Rule: i}}
			if rnd.IntN(4) > 0 {
				m.Headers = append(m.Headers, must(NewHeaderMatch(pick("x-capstan-model", "x-capstan-model", "version"), pick("a", "b", "c", "d", "e", "f", "g", "h", "i", "j"), false)))
			}
			if rnd.IntN(10) == 0 {
				m.Method = "POST"
			}
			if rnd.IntN(10) == 0 {
				m.Query = append(m.Query, must(NewQueryMatch("q", "1", false)))
			}
			ms = append(ms, m)
		}
		l := &Listener{}
		l.AddHost("", ms)
		v, _ := l.hosts.lookup("")
		runs += len(v.runs)
		for range 50 {
			r := httptest.NewRequest(pick("GET", "POST"), pick("/v1/x", "/v2", "/v1", "/other")+pick("", "?q=1"), nil)
			if rnd.IntN(5) > 0 {
				r.Header.Set(pick("X-Capstan-Model", "Version"), pick("a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "zz"))
			}
			var scan *Match
			for _, m := range v.Matches {
				if m.matches(r) {
					scan = m
					break
				}
			}
			if got := l.Route(r, ""); got != scan {
				t.Fatalf("round %d: %s %s %v: indexed %v, scan %v", round, r.Method, r.URL, r.Header, got, scan)
			}
		}
	}
}

// FuzzQueryValue checks the allocation-free query scan against the
// standard library's parser.
func FuzzQueryValue(f *testing.F) {
	for _, seed := range []string{"animal=whale", "a=1&a=2", "x=%41&y", "k%3D=v%26", "+=+", "a=%zz&a=1", ""} {
		f.Add(seed, "a")
	}
	f.Fuzz(func(t *testing.T, raw, name string) {
		got, ok := queryValue(raw, name)
		want, err := url.ParseQuery(raw)
		if err != nil {
			return // the standard library rejects it (bad escapes, semicolons)
		}
		vs, has := want[name]
		if has != ok || (has && vs[0] != got) {
			t.Errorf("queryValue(%q, %q) = %q, %v; url.ParseQuery: %q, %v", raw, name, got, ok, vs, has)
		}
	})
}
