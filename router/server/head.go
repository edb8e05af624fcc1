package server

import (
	"bytes"
	"io"
	"net"

	"golang.org/x/net/http/httpguts"
)

// headScan follows a request head's bytes as the connection reads them,
// for what http.ReadRequest does not tell: how many field lines the head
// has (MaxHeaderFields), and which fields framed the request, since
// ReadRequest drops Host, merges equal Content-Length fields, drops
// Content-Length when there is a Transfer-Encoding and Transfer-Encoding
// from an HTTP/1.0 request.
//
// Its lines are textproto's, which ReadRequest reads: a line ends at a LF
// (a CR before it is part of the end), a line that starts with a space or
// a tab continues the field before it (obs-fold), and the head ends at an
// empty line. ReadRequest still parses and validates everything; the scan
// only ever adds a rejection, or a close after the response.
type headScan struct {
	// on: the bytes read belong to the head, until its end.
	on bool
	// ended: the empty line that ends the head was seen.
	ended bool
	// lines counts the lines ended so far, the request line included.
	lines int

	// The line being read: its length so far and first byte, what it is,
	// and, while kind is lineName and the name came in pieces, its first
	// bytes (nameLen one more than name holds: too long to matter).
	lineLen int
	first   byte
	kind    lineKind
	name    [len("transfer-encoding")]byte
	nameLen int

	// inHost: the field being read (with its continuation lines) is Host.
	// hostValue: a byte of its value came; hostSpace: white space came
	// after it, which must end the value.
	inHost, hostValue, hostSpace bool

	// What the head held.
	hosts, contentLengths, transferEncodings int
	// badHost: a Host field's value is not a valid host (as net/http
	// checks it: ReadRequest keeps no Host field to check when the request
	// target is in absolute form).
	badHost bool
	// badName: a field name has a space, which textproto lets through
	// (uncanonicalised) and net/http's server rejects: "Transfer-Encoding
	// : chunked" is a classic way to be read two ways.
	badName bool
}

type lineKind uint8

const (
	lineName  lineKind = iota // a field line, before its colon
	lineHost                  // in the value of a Host field
	lineOther                 // nothing more to learn from this line
)

// start begins the scan of a head whose first bytes are buffered.
func (h *headScan) start(buffered []byte) {
	*h = headScan{on: true}
	h.feed(buffered)
}

// fields is the number of field lines (continuation lines included) seen.
func (h *headScan) fields() int { return max(h.lines-1, 0) }

// suspiciousFraming reports whether the head's framing calls for closing
// the connection after the response (RFC 9112 section 6.1 and 6.3): a
// Transfer-Encoding together with a Content-Length, which ReadRequest
// resolves for the Transfer-Encoding but which may be a smuggling attempt
// that a server in front read the other way, or a Transfer-Encoding in an
// HTTP/1.0 request, whose framing is faulty.
func (h *headScan) suspiciousFraming(http11 bool) bool {
	return h.transferEncodings > 0 && (h.contentLengths > 0 || !http11)
}

func (h *headScan) feed(p []byte) {
	for h.on && !h.ended && len(p) > 0 {
		line := p
		i := bytes.IndexByte(p, '\n')
		if i >= 0 {
			line, p = p[:i], p[i+1:]
		} else {
			p = nil
		}
		h.add(line)
		if i >= 0 {
			h.endLine()
		}
	}
}

// add takes bytes of the current line, without its LF.
func (h *headScan) add(b []byte) {
	if len(b) == 0 {
		return
	}
	if h.lineLen == 0 {
		h.first = b[0]
		switch {
		case h.lines == 0: // the request line
			h.kind = lineOther
		case b[0] == ' ' || b[0] == '\t':
			// A continuation. textproto joins it to the line before with
			// a space, which, in a Host value, makes it invalid unless
			// nothing came before (the value's leading space is trimmed).
			h.kind = lineOther
			if h.inHost {
				h.kind = lineHost
				if h.hostValue {
					h.badHost = true
				}
			}
		default:
			h.kind, h.nameLen, h.inHost = lineName, 0, false
		}
	}
	h.lineLen += len(b)
	if h.kind == lineName {
		name := b
		colon := bytes.IndexByte(b, ':')
		if colon >= 0 {
			name, b = b[:colon], b[colon+1:]
		}
		if bytes.IndexByte(name, ' ') >= 0 {
			h.badName = true
		}
		switch {
		case colon >= 0 && h.nameLen == 0:
			// The whole name came in one piece, as it nearly always does.
			h.fieldName(name)
		default:
			// Keep the name's first bytes, as many as a framing field's
			// has and one more (a longer name is none of them).
			if h.nameLen <= len(h.name) {
				n := copy(h.name[h.nameLen:], name)
				h.nameLen += n
				if n < len(name) {
					h.nameLen = len(h.name) + 1
				}
			}
			if colon >= 0 {
				h.fieldName(h.name[:min(h.nameLen, len(h.name))])
			}
		}
		if colon < 0 {
			return
		}
	}
	if h.kind == lineHost {
		for _, c := range b {
			switch c {
			case ' ', '\t', '\r':
				// Trimmed at either end of the value, invalid within.
				h.hostSpace = h.hostValue
			default:
				if h.hostSpace || !validHostByte[c] {
					h.badHost = true
				}
				h.hostValue = true
			}
		}
	}
}

// fieldName classifies a field line by its name once its colon came.
func (h *headScan) fieldName(name []byte) {
	h.kind = lineOther
	if h.nameLen > len(h.name) {
		return // too long
	}
	// Lengths first: most names are none of these.
	switch len(name) {
	case len("host"):
		if asciiEqualFold(string(name), "host") {
			h.hosts++
			h.kind, h.inHost = lineHost, true
		}
	case len("content-length"):
		if asciiEqualFold(string(name), "content-length") {
			h.contentLengths++
		}
	case len("transfer-encoding"):
		if asciiEqualFold(string(name), "transfer-encoding") {
			h.transferEncodings++
		}
	}
}

func (h *headScan) endLine() {
	if h.lines > 0 && (h.lineLen == 0 || h.lineLen == 1 && h.first == '\r') {
		h.ended = true
		return
	}
	h.lines++
	h.lineLen = 0
}

// validHostByte is httpguts.ValidHostHeader byte by byte, so that a value
// arriving in pieces can be checked as it comes.
var validHostByte = func() (valid [256]bool) {
	for i := range valid {
		valid[i] = httpguts.ValidHostHeader(string([]byte{byte(i)}))
	}
	return valid
}()

// connReader is what a connection's bufio.Reader reads: the connection,
// cut off (io.EOF) once a request head grows past its limits, and showing
// each head's bytes to its scan as they arrive.
type connReader struct {
	nc net.Conn
	// left is how many more bytes the head being read may bring.
	left      int64
	maxFields int
	scan      headScan
}

func (r *connReader) Read(p []byte) (int, error) {
	if r.left <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > r.left {
		p = p[:r.left]
	}
	n, err := r.nc.Read(p)
	r.left -= int64(n)
	if r.scan.on {
		r.scan.feed(p[:n])
		if r.scan.fields() > r.maxFields {
			r.left = 0
		}
	}
	return n, err
}

// hasToken reports whether v, a field value, holds token (ASCII, lower
// case), case-insensitively and between spaces, tabs or commas. It is
// net/http's test of an Expect field, so that the two servers read one
// alike.
func hasToken(v, token string) bool {
	for sp := 0; sp+len(token) <= len(v); sp++ {
		if b := v[sp]; b != token[0] && b|0x20 != token[0] {
			continue
		}
		if sp > 0 && !isTokenBoundary(v[sp-1]) {
			continue
		}
		if end := sp + len(token); end != len(v) && !isTokenBoundary(v[end]) {
			continue
		}
		if asciiEqualFold(v[sp:sp+len(token)], token) {
			return true
		}
	}
	return false
}

func isTokenBoundary(b byte) bool { return b == ' ' || b == ',' || b == '\t' }

func asciiEqualFold(s, t string) bool {
	if len(s) != len(t) {
		return false
	}
	for i := 0; i < len(s); i++ {
		a, b := s[i], t[i]
		if 'A' <= a && a <= 'Z' {
			a += 'a' - 'A'
		}
		if 'A' <= b && b <= 'Z' {
			b += 'a' - 'A'
		}
		if a != b {
			return false
		}
	}
	return true
}
