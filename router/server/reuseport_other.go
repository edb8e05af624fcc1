//go:build !linux

package server

import "syscall"

// reusePort does nothing where SO_REUSEPORT is not set: each Gateway address
// is then served by one process.
func reusePort(_, _ string, _ syscall.RawConn) error { return nil }
