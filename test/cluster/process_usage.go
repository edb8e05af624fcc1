package cluster

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

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

// PidOf finds the process running a binary, as /proc numbers it. The e2e
// suites run in their own PID namespace without their own /proc, so a
// child's PID as exec reports it is not the number /proc knows it by.
func PidOf(binary string) (int, error) {
	dirs, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", d.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if argv0, _, _ := bytes.Cut(cmdline, []byte{0}); string(argv0) == binary {
			return pid, nil
		}
	}
	return 0, fmt.Errorf("no process runs %s", binary)
}

// MemoryMiB reads one memory figure of a running process from
// /proc/<pid>/status, in MiB: "VmRSS", "VmHWM" (the peak resident set),
// "RssAnon", "RssFile".
func MemoryMiB(pid int, field string) (float64, error) {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(status)) {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 64)
			return kb / 1024, err
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}
