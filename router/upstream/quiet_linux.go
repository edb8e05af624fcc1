package upstream

import (
	"net"
	"syscall"
)

// peeker looks at what a connection holds for reading without reading it
// and without blocking: one system call, and no allocation (what it needs
// is made once per connection).
type peeker struct {
	rc    syscall.RawConn // nil: the connection has no socket to look at
	look  func(fd uintptr) bool
	found peeked
	b     [1]byte
}

func (p *peeker) attach(c net.Conn) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return
	}
	p.rc = rc
	p.look = func(fd uintptr) bool {
		n, _, err := syscall.Recvfrom(int(fd), p.b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		switch {
		case n > 0:
			p.found = idleBytes
		case n < 0 && (err == syscall.EAGAIN || err == syscall.EWOULDBLOCK):
			p.found = idleQuiet
		default:
			// n == 0 is the server's FIN; any other error (a reset)
			// leaves the connection unusable.
			p.found = idleGone
		}
		return true // done: never wait for the socket to become readable
	}
}

func (p *peeker) peek() peeked {
	if p.rc == nil {
		return idleQuiet // cannot tell
	}
	if err := p.rc.Read(p.look); err != nil {
		return idleGone // a deadline passed or the connection was closed
	}
	return p.found
}
