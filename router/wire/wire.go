// Package wire writes HTTP/1.1 header fields, for the router's server and
// its upstream client, which write their heads themselves.
//
// http.Header.Write would do, but it sorts the fields first, which costs
// allocations on every message, and the order of distinct fields carries no
// meaning (RFC 9110 section 5.3).
package wire

import (
	"bufio"
	"strings"

	"golang.org/x/net/http/httpguts"
)

// WriteFields writes every field of h that skip does not reject, one line
// per value. Fields whose name is invalid are left out and a line break in
// a value becomes a space, as net/http does, so that no value can end the
// head early.
func WriteFields(w *bufio.Writer, h map[string][]string, skip func(name string) bool) {
	for k, vv := range h {
		if skip(k) || !httpguts.ValidHeaderFieldName(k) {
			continue
		}
		for _, v := range vv {
			WriteField(w, k, v)
		}
	}
}

// WriteField writes one field line.
func WriteField(w *bufio.Writer, name, value string) {
	if strings.ContainsAny(value, "\r\n") {
		value = newlineToSpace.Replace(value)
	}
	w.WriteString(name)
	w.WriteString(": ")
	w.WriteString(strings.TrimSpace(value))
	w.WriteString("\r\n")
}

var newlineToSpace = strings.NewReplacer("\n", " ", "\r", " ")
