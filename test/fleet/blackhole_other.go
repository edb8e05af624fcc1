//go:build !linux

package fleet

import (
	"errors"
	"io"
)

// listenBlackHole needs Linux, where a full accept queue drops SYNs.
func listenBlackHole(string, int) (io.Closer, error) {
	return nil, errors.New("the black-hole fault is simulated on Linux only")
}
