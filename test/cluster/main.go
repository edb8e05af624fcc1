package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// RunTests is the body of an e2e package's TestMain. Outside the private
// network namespace it makes sure the control-plane and Capstan binaries are
// built, then runs the test binary again inside a namespace via hack/netns.sh.
// Inside, it starts one cluster for the whole package, stores it in *c, runs
// the tests and stops the cluster. It returns the exit code for os.Exit.
//
//	func TestMain(m *testing.M) { os.Exit(cluster.RunTests(m, cluster.Config{}, &testCluster)) }
func RunTests(m *testing.M, cfg Config, c **Cluster) int {
	if os.Getenv("CAPSTAN_NETNS") == "" {
		return reexecInNamespace()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	cluster, err := Start(ctx, cfg)
	cancel()
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: starting the local cluster: %v\n", err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "local cluster ready in %s (kube-apiserver after %s) in %s\n",
		cluster.StartupTime.Round(time.Millisecond), cluster.APIServerReadyTime.Round(time.Millisecond), cluster.Dir)
	*c = cluster
	defer cluster.Stop()
	code := m.Run()
	if code != 0 && testing.Verbose() {
		fmt.Fprintf(os.Stderr, "control-plane logs:\n%s", cluster.Logs(15))
	}
	return code
}

func reexecInNamespace() int {
	root, err := RepoRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "FAIL:", err)
		return 1
	}
	if err := prepareBinaries(root); err != nil {
		fmt.Fprintln(os.Stderr, "FAIL:", err)
		return 1
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, "FAIL:", err)
		return 1
	}
	cmd := exec.Command(filepath.Join(root, "hack", "netns.sh"), append([]string{self}, os.Args[1:]...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			return exit.ExitCode()
		}
		fmt.Fprintln(os.Stderr, "FAIL: running the tests in a network namespace:", err)
		return 1
	}
	return 0
}

// prepareBinaries builds what the namespace cannot (the Go toolchain has no
// network there) unless the Makefile already did and said where.
func prepareBinaries(root string) error {
	if os.Getenv("CAPSTAN_TOOLS_DIR") == "" {
		cmd := exec.Command(filepath.Join(root, "hack", "build-control-plane.sh"))
		cmd.Stderr = os.Stderr
		out, err := cmd.Output()
		if err != nil {
			return fmt.Errorf("building the control plane: %w", err)
		}
		os.Setenv("CAPSTAN_TOOLS_DIR", strings.TrimSpace(string(out)))
	}
	if os.Getenv("CAPSTAN_BIN_DIR") == "" {
		bin := filepath.Join(root, "bin")
		cmd := exec.Command("go", "build", "-o", bin+"/", "./plugins/cmd/...", "./metricsadapter/cmd/...", "./router/cmd/...",
			"sigs.k8s.io/gateway-api-inference-extension/cmd/lwepp")
		cmd.Dir = root
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("building Capstan's binaries: %w", err)
		}
		os.Setenv("CAPSTAN_BIN_DIR", bin)
	}
	return nil
}

// Binary returns the path of one of Capstan's binaries (capstan-router,
// capstan-metrics-adapter, capstan-scheduler), or of lwepp (the Inference
// Extension's lightweight endpoint picker, a go.mod tool), as built for this
// test run.
func Binary(name string) (string, error) {
	dir := os.Getenv("CAPSTAN_BIN_DIR")
	if dir == "" {
		return "", errors.New("CAPSTAN_BIN_DIR is not set: run the tests through make test-e2e or go test (which sets it)")
	}
	path := filepath.Join(dir, name)
	if _, err := os.Stat(path); err != nil {
		return "", fmt.Errorf("binary %s: %w", name, err)
	}
	return path, nil
}

// RepoRoot finds the Capstan checkout that contains the working directory.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.HasPrefix(data, []byte("module github.com/capstan-dev/capstan\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("not inside the Capstan repository (no go.mod for github.com/capstan-dev/capstan above the working directory)")
		}
		dir = parent
	}
}
