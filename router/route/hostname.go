package route

import (
	"cmp"
	"slices"
	"strings"
)

// HostnameMatches reports whether pattern covers host, as the Gateway API
// matches hostnames: an empty pattern covers everything, "*.example.com"
// covers every name that ends in ".example.com" with at least one label
// before it (so not "example.com" itself), and any other pattern covers
// only itself. host may itself be a wildcard, which pattern covers when it
// covers every name host does.
func HostnameMatches(pattern, host string) bool {
	switch {
	case pattern == "":
		return true
	case pattern == host:
		return true
	case strings.HasPrefix(pattern, "*."):
		suffix := pattern[1:] // ".example.com"
		return len(host) > len(suffix) && strings.HasSuffix(host, suffix)
	}
	return false
}

// IntersectHostnames returns the hostnames a route with hostnames route
// serves on a listener with hostname listener ("" for none), and whether
// they intersect at all. A route hostname that the listener covers is kept
// as it is; a wildcard route hostname that covers the listener's narrows to
// the listener's; the others are dropped. No hostnames on either side means
// the other side's, and none on both means any host ("").
func IntersectHostnames(listener string, route []string) ([]string, bool) {
	if len(route) == 0 {
		return []string{listener}, true
	}
	if listener == "" {
		return slices.Clone(route), true
	}
	var out []string
	for _, h := range route {
		var got string
		switch {
		case HostnameMatches(listener, h):
			got = h
		case HostnameMatches(h, listener):
			got = listener
		default:
			continue
		}
		if !slices.Contains(out, got) {
			out = append(out, got)
		}
	}
	return out, len(out) > 0
}

// RequestHost returns a request's Host without its port, in lower case and
// without a trailing dot, as hostnames are matched. It allocates only when
// the host has upper-case letters.
func RequestHost(host string) string {
	if strings.HasPrefix(host, "[") {
		// An IPv6 literal: [::1]:80.
		if i := strings.IndexByte(host, ']'); i > 0 {
			return host[:i+1]
		}
		return host
	}
	if i := strings.LastIndexByte(host, ':'); i >= 0 {
		host = host[:i]
	}
	host = strings.TrimSuffix(host, ".")
	for i := 0; i < len(host); i++ {
		if c := host[i]; 'A' <= c && c <= 'Z' {
			return strings.ToLower(host)
		}
	}
	return host
}

// hostIndex finds the most specific of a set of hostnames that covers a
// host: an exact name first, then the wildcard with the longest suffix, then
// the catch-all "".
type hostIndex[T any] struct {
	exact     map[string]T
	wildcards []wildcardEntry[T] // longest suffix first
	any       T
	hasAny    bool
}

type wildcardEntry[T any] struct {
	suffix string // ".example.com"
	value  T
}

func (x *hostIndex[T]) add(hostname string, v T) {
	switch {
	case hostname == "":
		x.any, x.hasAny = v, true
	case strings.HasPrefix(hostname, "*."):
		x.wildcards = append(x.wildcards, wildcardEntry[T]{suffix: hostname[1:], value: v})
		slices.SortStableFunc(x.wildcards, func(a, b wildcardEntry[T]) int { return cmp.Compare(len(b.suffix), len(a.suffix)) })
	default:
		if x.exact == nil {
			x.exact = map[string]T{}
		}
		x.exact[hostname] = v
	}
}

// lookup returns the entry for the most specific hostname covering host,
// which must be as RequestHost returns it.
func (x *hostIndex[T]) lookup(host string) (T, bool) {
	if v, ok := x.exact[host]; ok {
		return v, true
	}
	for _, w := range x.wildcards {
		if len(host) > len(w.suffix) && strings.HasSuffix(host, w.suffix) {
			return w.value, true
		}
	}
	return x.any, x.hasAny
}
