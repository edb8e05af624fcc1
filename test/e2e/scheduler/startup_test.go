package scheduler

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"k8s.io/klog/v2/ktesting"

	"github.com/capstan-dev/capstan/test/cluster"
)

// capstan-scheduler refuses to start with bad plugin args and says which
// field is wrong and why, before it takes a lease or serves anything.
func TestBadArgsStopTheScheduler(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	bin, err := cluster.Binary("capstan-scheduler")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		args string // the ModelSlots args, as YAML under pluginConfig
		want []string
	}{
		{
			name: "invalid values",
			args: "defaultNodeSlots: -1\n      scoringStrategy: Fullest\n      slotResource: {name: cpu, perSlot: 0}",
			want: []string{
				`initializing plugin \"ModelSlots\": invalid ModelSlots args: [`,
				"defaultNodeSlots: Invalid value: -1: must be greater than or equal to 0",
				`scoringStrategy: Unsupported value: \"Fullest\": supported values: \"Pack\", \"Spread\"`,
				`slotResource.name: Invalid value: \"cpu\": must be an extended resource name, for example nvidia.com/gpu`,
				"slotResource.perSlot: Invalid value: 0: must be greater than 0",
			},
		},
		{
			name: "misspelt field",
			args: "defaultNodeSlot: 1",
			want: []string{`decoding args for plugin ModelSlots: strict decoding error: unknown field \"defaultNodeSlot\"`},
		},
		{
			name: "wrong type",
			args: "maxReplicasPerNode: one",
			want: []string{"decoding args for plugin ModelSlots", "maxReplicasPerNode"},
		},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			config := fmt.Sprintf(`apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection:
  kubeconfig: %s
leaderElection:
  leaderElect: false
profiles:
- schedulerName: bad-args-%d
  plugins:
    multiPoint:
      enabled:
      - name: ModelSlots
  pluginConfig:
  - name: ModelSlots
    args:
      %s
`, testCluster.Kubeconfig, i, tc.args)
			path := writeFile(t, fmt.Sprintf("bad-args-%d.yaml", i), config)
			port, err := cluster.FreePort()
			if err != nil {
				t.Fatal(err)
			}
			p, err := testCluster.Run(fmt.Sprintf("capstan-scheduler-bad-args-%d", i), bin,
				"--config="+path, "--bind-address=127.0.0.1", "--secure-port="+strconv.Itoa(port))
			if err != nil {
				t.Fatal(err)
			}
			var exitErr error
			err = testCluster.WaitFor(ctx, 30*time.Second, "capstan-scheduler to exit", func(context.Context) (bool, error) {
				var exited bool
				exited, exitErr = p.Exited()
				return exited, nil
			})
			if err != nil {
				p.Stop(5 * time.Second)
				t.Fatalf("%v; it is still running with bad args:\n%s", err, p.LogTail(20))
			}
			if exitErr == nil || !strings.Contains(exitErr.Error(), "exit status 1") {
				t.Errorf("capstan-scheduler ended with %v, want exit status 1", exitErr)
			}
			output := p.LogTail(50)
			for _, want := range tc.want {
				if !strings.Contains(output, want) {
					t.Errorf("its output lacks %q:\n%s", want, output)
				}
			}
		})
	}
}

// writeFile writes a file into the cluster's folder.
func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(testCluster.Dir, name)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}
