package upstream

import (
	"net"
	"syscall"
)

// quiet reports whether an idle connection can carry a request: the server
// has neither closed it nor sent anything on it. It peeks at the socket
// without blocking, one system call.
func quiet(c net.Conn) bool {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	var b [1]byte
	usable := false
	err = rc.Read(func(fd uintptr) bool {
		n, _, rerr := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		usable = n < 0 && (rerr == syscall.EAGAIN || rerr == syscall.EWOULDBLOCK)
		return true // done: never wait for the socket to become readable
	})
	return err == nil && usable
}
