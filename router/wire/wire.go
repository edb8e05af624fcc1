// Package wire holds what the router's HTTP/1.1 server and its upstream
// client share about their connections: writing header fields (they write
// their heads themselves) and re-arming deadlines sparingly.
//
// http.Header.Write would do for the fields, but it sorts them first, which
// costs allocations on every message, and the order of distinct fields
// carries no meaning (RFC 9110 section 5.3).
package wire

import (
	"bufio"
	"strings"
	"time"

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

// Deadline is a connection deadline that is set again only when it has
// drifted. Setting a deadline changes a runtime timer; a busy connection
// with long timeouts would otherwise pay for one or more on every request.
// The zero value means no deadline is known to be set.
type Deadline struct{ at time.Time }

// Arm makes the deadline about now+timeout: it keeps the one set when that
// lies within the last eighth of the timeout (never later than
// now+timeout), and calls set with a new one otherwise. A timeout may so
// end up to an eighth shorter.
func (d *Deadline) Arm(timeout time.Duration, set func(time.Time) error) error {
	want := time.Now().Add(timeout)
	if !d.at.After(want) && d.at.After(want.Add(-timeout/8)) {
		return nil
	}
	d.at = want
	return set(want)
}

// Forget records that the deadline was changed behind Arm's back.
func (d *Deadline) Forget() { d.at = time.Time{} }
