package fleet

import (
	"errors"
	"io"
	"net"
	"strconv"
	"syscall"
	"time"
)

// blackHole is a port that takes no connection. It is a listening socket
// with a backlog of 0 whose accept queue holds one connection the simulator
// made to itself and never accepts: with the queue full, the kernel drops
// every further SYN, so a client's connect neither succeeds nor is refused
// but times out, as it does to a pod behind a partitioned network.
type blackHole struct {
	fd     int
	filler net.Conn
}

func listenBlackHole(ip string, port int) (io.Closer, error) {
	addr := net.ParseIP(ip)
	if addr == nil {
		return nil, errors.New("not an IP address: " + ip)
	}
	family := syscall.AF_INET6
	var sa syscall.Sockaddr
	if v4 := addr.To4(); v4 != nil {
		family = syscall.AF_INET
		sa4 := &syscall.SockaddrInet4{Port: port}
		copy(sa4.Addr[:], v4)
		sa = sa4
	} else {
		sa6 := &syscall.SockaddrInet6{Port: port}
		copy(sa6.Addr[:], addr.To16())
		sa = sa6
	}
	fd, err := syscall.Socket(family, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	// Connections accepted before the fault still hold the address.
	if err := syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1); err != nil {
		syscall.Close(fd)
		return nil, err
	}
	if err := syscall.Bind(fd, sa); err != nil {
		syscall.Close(fd)
		return nil, err
	}
	if err := syscall.Listen(fd, 0); err != nil {
		syscall.Close(fd)
		return nil, err
	}
	// A backlog of 0 still queues one connection: fill it.
	filler, err := net.DialTimeout("tcp", net.JoinHostPort(ip, strconv.Itoa(port)), time.Second)
	if err != nil {
		syscall.Close(fd)
		return nil, err
	}
	return &blackHole{fd: fd, filler: filler}, nil
}

func (b *blackHole) Close() error {
	b.filler.Close()
	return syscall.Close(b.fd)
}
