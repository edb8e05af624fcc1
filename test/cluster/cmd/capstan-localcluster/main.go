// Command capstan-localcluster runs the test harness's control plane and the
// model-server fleet simulator in the foreground, for a person to use with
// kubectl (see make cluster-up). It must run inside Capstan's private network
// namespace. SIGINT or SIGTERM stops everything it started.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/fleet"
)

func main() {
	dir := flag.String("dir", "", "Folder for the cluster's state, logs and kubeconfig (required; kept after exit).")
	nodes := flag.Int("nodes", 2, "How many kwok nodes to create.")
	slots := flag.Int("model-slots", 0, "If above 0, label each node capstan.dev/model-slots=<n>.")
	hpaSync := flag.Duration("horizontal-pod-autoscaler-sync-period", 5*time.Second, "kube-controller-manager's HPA sync period.")
	klog.InitFlags(nil)
	flag.Parse()
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "error: --dir is required")
		os.Exit(2)
	}
	if err := run(*dir, *nodes, *slots, *hpaSync); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

func run(dir string, nodes, slots int, hpaSync time.Duration) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	c, err := cluster.Start(ctx, cluster.Config{Dir: dir, HPASyncPeriod: hpaSync})
	if err != nil {
		return err
	}
	defer c.Stop()
	for i := range nodes {
		n := cluster.Node{Name: fmt.Sprintf("kwok-node-%d", i)}
		if slots > 0 {
			n.Labels = map[string]string{"capstan.dev/model-slots": fmt.Sprint(slots)}
		}
		if err := c.CreateNodes(ctx, n); err != nil {
			return err
		}
	}
	sim := fleet.New(c.Client, fleet.Options{})
	if err := sim.Start(ctx); err != nil {
		return err
	}
	// The ready marker tells hack/cluster-up.sh that kubectl can be used.
	if err := os.WriteFile(filepath.Join(dir, "ready"), nil, 0o644); err != nil {
		return err
	}
	fmt.Printf("local cluster ready in %s; KUBECONFIG=%s\n", c.StartupTime.Round(time.Millisecond), c.Kubeconfig)
	<-ctx.Done()
	_ = os.Remove(filepath.Join(dir, "ready"))
	sim.Wait()
	return nil
}
