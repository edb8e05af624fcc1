package cluster

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Process is one program started by the harness: a control-plane binary, or a
// Capstan component a test runs against the cluster. Its output goes to a log
// file in the cluster's folder so a failure can show the end of it, and it is
// killed with the harness even when the harness dies without cleaning up.
type Process struct {
	name string
	path string
	args []string
	env  []string // added to the harness's environment
	// LogPath is where the process's stdout and stderr go.
	LogPath string

	mu      sync.Mutex
	cmd     *exec.Cmd
	done    chan struct{} // closed when the process has exited
	waitErr error
}

func newProcess(name, logDir, path string, args ...string) *Process {
	return &Process{name: name, path: path, args: args, LogPath: filepath.Join(logDir, name+".log")}
}

// start launches the process. It is killed with the harness even when the
// harness itself dies without cleaning up (SIGKILL on parent death).
func (p *Process) start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil && !p.exitedLocked() {
		return fmt.Errorf("%s is already running", p.name)
	}
	logFile, err := os.OpenFile(p.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(p.path, p.args...)
	if len(p.env) > 0 {
		cmd.Env = append(os.Environ(), p.env...)
	}
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return fmt.Errorf("starting %s (%s): %w", p.name, p.path, err)
	}
	p.cmd = cmd
	done := make(chan struct{})
	p.done = done
	go func() {
		err := cmd.Wait()
		logFile.Close()
		p.mu.Lock()
		p.waitErr = err
		p.mu.Unlock()
		close(done)
	}()
	return nil
}

// Name is what the harness calls the process, and its log file.
func (p *Process) Name() string { return p.name }

// Exited reports whether the process has exited, and how it ended.
func (p *Process) Exited() (exited bool, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || !p.exitedLocked() {
		return false, nil
	}
	if p.waitErr == nil {
		return true, errors.New("exited with status 0")
	}
	return true, p.waitErr
}

func (p *Process) exitedLocked() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Stop sends SIGTERM to the process group, waits up to grace, then kills it.
func (p *Process) Stop(grace time.Duration) {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	if cmd == nil {
		return
	}
	pgid := -cmd.Process.Pid
	_ = syscall.Kill(pgid, syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(grace):
		_ = syscall.Kill(pgid, syscall.SIGKILL)
		<-done
	}
}

// Kill sends SIGKILL to the process group, as a crash or the OOM killer
// would end it (no signal handler, no drain), and waits for it to exit.
func (p *Process) Kill() {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	<-done
}

// Failure returns an error saying why the process is not healthy, with the end
// of its log.
func (p *Process) Failure(reason string) error {
	return fmt.Errorf("%s %s; last lines of %s:\n%s", p.name, reason, p.LogPath, p.LogTail(20))
}

// LogTail returns the last lines of the process's output.
func (p *Process) LogTail(lines int) string {
	data, err := os.ReadFile(p.LogPath)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	data = bytes.TrimRight(data, "\n")
	all := strings.Split(string(data), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return "    " + strings.Join(all, "\n    ")
}

// Run starts a program against the cluster (a Capstan component under test)
// with its output in the cluster's log folder. Cluster.Stop stops it too.
func (c *Cluster) Run(name, path string, args ...string) (*Process, error) {
	return c.RunWithEnv(name, path, nil, args...)
}

// RunWithEnv is Run with environment variables ("NAME=value") added to the
// harness's own.
func (c *Cluster) RunWithEnv(name, path string, env []string, args ...string) (*Process, error) {
	p := newProcess(name, filepath.Join(c.Dir, "logs"), path, args...)
	p.env = env
	if err := p.start(); err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.others = append(c.others, p)
	c.mu.Unlock()
	return p, nil
}

// WaitHealthy polls url until it answers 200, failing early with the end of the
// process's log if it exits. TLS certificates are not verified.
func (p *Process) WaitHealthy(ctx context.Context, url string, timeout time.Duration) error {
	client := &http.Client{
		Timeout: 2 * time.Second,
		// Loopback health checks of processes this harness started; the
		// certificate would be the component's self-signed one.
		Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}, //nolint:gosec
	}
	defer client.CloseIdleConnections()
	deadline := time.Now().Add(timeout)
	var last string
	for {
		if exited, err := p.Exited(); exited {
			return p.Failure("exited during start-up (" + err.Error() + ")")
		}
		resp, err := client.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			return p.Failure(fmt.Sprintf("was not healthy after %s (%s: %s)", timeout, url, last))
		}
		select {
		case <-ctx.Done():
			return p.Failure("did not start before the context ended: " + ctx.Err().Error())
		case <-time.After(50 * time.Millisecond):
		}
	}
}
