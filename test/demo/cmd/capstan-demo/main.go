// Command capstan-demo runs Capstan's closed loop on a local cluster and shows
// it live (see package demo). It must run inside a Capstan network namespace;
// make demo (hack/demo.sh) sets that up.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/demo"
)

func main() {
	var cfg demo.Config
	duration := flag.Duration("duration", 0, "Run this long in all, then print the summary and exit (non-interactive). 0: run the load once, then keep the cluster up until Ctrl-C.")
	netns := flag.String("netns", "capstan-demo", "Name of the network namespace, for the commands printed for another shell.")
	flag.IntVar(&cfg.Clients, "clients", 24, "Peak concurrent clients per model.")
	flag.DurationVar(&cfg.Ramp, "ramp", 20*time.Second, "How long the load takes to reach its peak.")
	flag.DurationVar(&cfg.Hold, "hold", 30*time.Second, "How long the peak load holds before it stops.")
	flag.IntVar(&cfg.GPUNodes, "gpu-nodes", 3, "kwok GPU nodes.")
	flag.IntVar(&cfg.SlotsPerNode, "slots-per-node", 2, "Model slots per GPU node (capstan.dev/model-slots).")
	maxReplicas := flag.Int("max-replicas", 5, "Each model HPA's maxReplicas.")
	flag.StringVar(&cfg.RouterAddr, "router-address", "198.18.255.10:8080", "Where capstan-router listens.")
	klog.InitFlags(nil)
	flag.Set("v", "0")
	flag.Parse()
	cfg.MaxReplicas = int32(*maxReplicas)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, *duration, *netns); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, cfg demo.Config, duration time.Duration, netns string) error {
	fmt.Println("Starting a local cluster (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok)...")
	c, err := cluster.Start(ctx, cluster.Config{})
	if err != nil {
		return err
	}
	defer c.Stop()
	fmt.Printf("  ready in %s\n", c.StartupTime.Round(time.Millisecond))
	d, err := demo.Setup(ctx, c, cfg, os.Stdout)
	if err != nil {
		return err
	}
	defer d.Close()
	fmt.Printf(`
Send your own requests from another shell while it runs:
  ip netns exec %[1]s curl -s http://%[2]s/v1/chat/completions -H 'Content-Type: application/json' \
    -d '{"model":"llama-3-8b","messages":[{"role":"user","content":"hello"}]}'
  ip netns exec %[1]s kubectl --kubeconfig %[3]s get pods -n demo -o wide
`, netns, d.RouterAddr, c.Kubeconfig)
	if duration == 0 {
		fmt.Println("Ctrl-C stops the demo and tears everything down.")
	}
	time.Sleep(3 * time.Second) // time to read the commands before the view takes the screen

	runCtx := ctx
	if duration > 0 {
		var cancel context.CancelFunc
		runCtx, cancel = context.WithTimeout(ctx, duration)
		defer cancel()
	}
	tty := isTerminal(os.Stdout)
	start := time.Now()
	observed := make(chan error, 1)
	go func() {
		observed <- d.Observe(runCtx, time.Second, func(views []demo.ModelView) {
			if tty {
				fmt.Print("\033[H\033[2J")
				demo.Render(os.Stdout, views, time.Since(start), d.Clients(), d.Stats.Figures())
			} else {
				demo.RenderLine(os.Stdout, views, time.Since(start), d.Clients(), d.Stats.Figures())
			}
		})
	}()
	if err := d.RunLoad(runCtx); err != nil && runCtx.Err() == nil {
		return err
	}
	if err := d.RunBurst(runCtx); err != nil && runCtx.Err() == nil {
		return err
	}
	<-observed
	demo.Summary(os.Stdout, d.Config, d.Stats.Figures())
	if f := d.Stats.Figures(); f.ClientErrors > 0 {
		return fmt.Errorf("%d client errors", f.ClientErrors)
	}
	return nil
}

func isTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
