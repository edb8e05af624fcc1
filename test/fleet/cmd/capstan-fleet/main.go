// Command capstan-fleet serves simulated model servers for every model pod of
// a local cluster (see package fleet). It must run where the pod IPs are
// local: inside the network namespace hack/netns.sh creates.
package main

import (
	"context"
	"flag"
	"os"
	"os/signal"
	"syscall"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"github.com/capstan-dev/capstan/test/fleet"
)

func main() {
	var opts fleet.Options
	kubeconfig := flag.String("kubeconfig", os.Getenv("KUBECONFIG"), "Path to a kubeconfig.")
	flag.StringVar(&opts.Namespace, "namespace", "", "Only simulate pods in this namespace (default all).")
	flag.IntVar(&opts.MaxRunning, "max-running", 8, "Default batch size per engine; requests beyond it wait.")
	flag.DurationVar(&opts.TTFT, "ttft", 0, "Default time to first token (0 means 10ms).")
	flag.DurationVar(&opts.TPOT, "tpot", 0, "Default time per output token (0 means 1ms).")
	flag.IntVar(&opts.OutputTokens, "output-tokens", 16, "Default response length in tokens.")
	klog.InitFlags(nil)
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	logger := klog.FromContext(ctx)

	cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		logger.Error(err, "Loading kubeconfig")
		klog.FlushAndExit(klog.ExitFlushTimeout, 1)
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		logger.Error(err, "Creating client")
		klog.FlushAndExit(klog.ExitFlushTimeout, 1)
	}
	f := fleet.New(client, opts)
	if err := f.Start(ctx); err != nil {
		logger.Error(err, "Starting the fleet")
		klog.FlushAndExit(klog.ExitFlushTimeout, 1)
	}
	logger.Info("Simulating model servers", "namespace", opts.Namespace)
	<-ctx.Done()
	f.Wait()
}
