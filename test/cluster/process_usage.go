package cluster

import "time"

// CPUTime returns the user plus system CPU time the process used over its
// whole life, once it has exited (false before), for benchmarks that compare
// what components cost rather than how fast a shared machine let them run.
func (p *Process) CPUTime() (time.Duration, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || !p.exitedLocked() || p.cmd.ProcessState == nil {
		return 0, false
	}
	return p.cmd.ProcessState.UserTime() + p.cmd.ProcessState.SystemTime(), true
}
