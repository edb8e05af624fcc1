//go:build race

package server

// raceEnabled: the test binary runs under the race detector, which makes
// goroutines and memory accesses several times dearer.
const raceEnabled = true
