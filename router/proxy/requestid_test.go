package proxy

import (
	"strconv"
	"strings"
	"testing"
)

// A request ID is 32 lower-case hex digits, and every one of its 128 bits
// is random: over many IDs each is seen both set and clear.
func TestNewRequestID(t *testing.T) {
	var set, unset [2]uint64 // the bits seen set, and seen clear, in each half
	for range 1000 {
		id := newRequestID()
		if len(id) != 32 || strings.Trim(id, "0123456789abcdef") != "" {
			t.Fatalf("ID %q is not 32 lower-case hex digits", id)
		}
		for half := range 2 {
			u, err := strconv.ParseUint(id[16*half:16*half+16], 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			set[half] |= u
			unset[half] |= ^u
		}
	}
	for half := range 2 {
		if set[half] != ^uint64(0) || unset[half] != ^uint64(0) {
			t.Errorf("bits %d to %d: never set %016x, never clear %016x; want none fixed",
				64*half, 64*half+63, ^set[half], ^unset[half])
		}
	}
	if n := testing.AllocsPerRun(100, func() { _ = newRequestID() }); n != 1 {
		t.Errorf("newRequestID allocates %v times, want 1 (the string)", n)
	}
}
