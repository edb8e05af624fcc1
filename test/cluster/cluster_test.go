package cluster

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Outside Capstan's network namespace, Start refuses with a message that says
// what to do, instead of starting a control plane whose pod IPs nothing can
// serve.
func TestStartOutsideNamespace(t *testing.T) {
	if os.Getenv("CAPSTAN_NETNS") != "" {
		t.Skip("running inside the namespace")
	}
	_, err := Start(context.Background(), Config{ToolsDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "hack/netns.sh") {
		t.Fatalf("Start outside the namespace: %v, want an error pointing at hack/netns.sh", err)
	}
}

func TestMissingTools(t *testing.T) {
	err := checkTools(t.TempDir())
	if err == nil || !strings.Contains(err.Error(), "hack/build-control-plane.sh") {
		t.Fatalf("checkTools on an empty folder: %v", err)
	}
}

func TestProcessFailureShowsLog(t *testing.T) {
	dir := t.TempDir()
	p := newProcess("false-server", dir, "/bin/sh", "-c", "echo listening failed: address in use; exit 3")
	if err := p.start(); err != nil {
		t.Fatal(err)
	}
	err := p.WaitHealthy(context.Background(), "http://127.0.0.1:1/healthz", 5e9)
	if err == nil {
		t.Fatal("WaitHealthy succeeded for a process that exited")
	}
	for _, want := range []string{"false-server", "exit status 3", "listening failed: address in use"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}
}

// Without root, hack/netns.sh says plainly why it cannot go on.
func TestNamespaceScriptWithoutRoot(t *testing.T) {
	if _, err := exec.LookPath("setpriv"); err != nil || os.Geteuid() != 0 {
		t.Skip("needs root and setpriv to run the script as another user")
	}
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	script, err := os.Open(filepath.Join(root, "hack", "netns.sh"))
	if err != nil {
		t.Fatal(err)
	}
	defer script.Close()
	// The script is fed to bash on stdin: the checkout may sit in a folder
	// only root can enter (mktemp -d makes it 0700), which is not what this
	// test is about.
	cmd := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", "-s", "true")
	cmd.Stdin, cmd.Dir = script, "/"
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatal("hack/netns.sh succeeded without root")
	}
	if !strings.Contains(string(out), "needs root") {
		t.Errorf("output %q does not say root is needed", out)
	}
}

// The free ports are distinct and bindable, and FreeAddr is one of them on
// loopback.
func TestFreePorts(t *testing.T) {
	ports, err := freePorts(7)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[int]bool{}
	for _, p := range ports {
		if p <= 0 || seen[p] {
			t.Fatalf("ports %v: want 7 distinct ones", ports)
		}
		seen[p] = true
	}
	addr := FreeAddr(t)
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("binding FreeAddr's %s: %v", addr, err)
	}
	l.Close()
	if host, _, _ := net.SplitHostPort(addr); host != "127.0.0.1" {
		t.Errorf("FreeAddr returned %s, want a loopback address", addr)
	}
}
