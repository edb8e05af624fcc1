// Package cluster runs a real, local Kubernetes control plane for tests:
// etcd, kube-apiserver (with the aggregation layer), kube-controller-manager,
// kube-scheduler and kwok, each a separate process with its own PKI and
// kubeconfig. It must run inside the private network namespace hack/netns.sh
// makes, where the pod IPs kwok hands out (198.18.0.0/17) are local addresses a
// simulated model server can listen on.
package cluster

import (
	"context"
	"crypto/x509"
	"crypto/x509/pkix"
	_ "embed"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// AdvertiseAddress is the address kube-apiserver advertises. hack/netns.sh
// puts it on lo.
const AdvertiseAddress = "198.18.255.1"

// DefaultPodCIDR is where kwok takes pod IPs from: local inside the namespace,
// reserved for benchmarking everywhere else, and wide enough for thousands of
// simulated pods.
const DefaultPodCIDR = "198.18.0.0/17"

//go:embed stages.yaml
var stages []byte

// Config says how to start a cluster. The zero value is usable.
type Config struct {
	// ToolsDir holds kube-apiserver, kube-controller-manager, kube-scheduler,
	// etcd and kwok, as hack/build-control-plane.sh builds them. Default:
	// $CAPSTAN_TOOLS_DIR.
	ToolsDir string
	// Dir keeps the cluster's PKI, etcd data, logs and kubeconfig. Default: a
	// new temporary folder that Stop removes.
	Dir string
	// HPASyncPeriod is how often the HPA controller reconciles. Default 1s
	// (the kube-controller-manager default is 15s).
	HPASyncPeriod time.Duration
	// PodCIDR is the range kwok assigns pod IPs from. Default DefaultPodCIDR.
	PodCIDR string
	// WithoutScheduler leaves out kube-scheduler, for tests that bring their
	// own scheduler or bind pods themselves.
	WithoutScheduler bool
	// Extra flags, appended after the harness's own.
	APIServerArgs, ControllerManagerArgs, SchedulerArgs []string
}

// Cluster is a running local control plane.
type Cluster struct {
	// Dir holds everything the cluster wrote; see Config.Dir.
	Dir string
	// Kubeconfig is the path of an admin (system:masters) kubeconfig.
	Kubeconfig string
	// RESTConfig and Client are admin clients for the API server.
	RESTConfig *rest.Config
	Client     kubernetes.Interface
	// APIServerURL is https://127.0.0.1:<port>.
	APIServerURL string
	// CAFile is the cluster CA bundle, for APIService caBundle and clients.
	CAFile string
	// StartupTime is how long Start took, from the first process to a cluster
	// that accepts pods; APIServerReadyTime is the part until kube-apiserver
	// was ready.
	StartupTime, APIServerReadyTime time.Duration

	cfg       Config
	removeDir bool
	pki       *pki
	etcd      *Process
	apiserver *Process

	mu     sync.Mutex
	others []*Process // stopped before the API server, newest first
	// controllers are the control-plane processes among others, with the
	// URL of their health check.
	controllers map[*Process]string
	kwok        *Process
}

// Start brings up a cluster and returns once pods can be created and
// scheduled. On failure it stops whatever it started and returns an error
// naming the process that failed, with the end of its log.
func Start(ctx context.Context, cfg Config) (c *Cluster, err error) {
	t0 := time.Now()
	if err := checkNamespace(); err != nil {
		return nil, err
	}
	cfg = withDefaults(cfg)
	if err := checkTools(cfg.ToolsDir); err != nil {
		return nil, err
	}
	c = &Cluster{cfg: cfg, Dir: cfg.Dir}
	if c.Dir == "" {
		if c.Dir, err = os.MkdirTemp("", "capstan-cluster-"); err != nil {
			return nil, err
		}
		c.removeDir = true
	}
	defer func() {
		if err != nil {
			c.Stop()
		}
	}()
	logDir := filepath.Join(c.Dir, "logs")
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return nil, err
	}
	if c.pki, err = newPKI(filepath.Join(c.Dir, "pki"), []string{AdvertiseAddress}); err != nil {
		return nil, fmt.Errorf("creating the cluster PKI: %w", err)
	}
	c.CAFile = c.pki.CAFile

	ports, err := freePorts(7)
	if err != nil {
		return nil, err
	}
	etcdClient, etcdPeer, apiPort, kcmPort, schedPort, kwokPort := ports[0], ports[1], ports[2], ports[3], ports[4], ports[5]
	c.APIServerURL = "https://127.0.0.1:" + strconv.Itoa(apiPort)

	if err := c.writeKubeconfig(); err != nil {
		return nil, err
	}
	tool := func(name string) string { return filepath.Join(cfg.ToolsDir, name) }
	etcdURL := func(port int) string { return "http://127.0.0.1:" + strconv.Itoa(port) }

	c.etcd = newProcess("etcd", logDir, tool("etcd"),
		"--name=capstan", "--data-dir="+filepath.Join(c.Dir, "etcd"),
		"--listen-client-urls="+etcdURL(etcdClient), "--advertise-client-urls="+etcdURL(etcdClient),
		"--listen-peer-urls="+etcdURL(etcdPeer), "--initial-advertise-peer-urls="+etcdURL(etcdPeer),
		"--initial-cluster=capstan="+etcdURL(etcdPeer),
		// The data dies with the test; fsync would only slow every write.
		"--unsafe-no-fsync=true", "--log-level=warn",
		"--listen-metrics-urls="+etcdURL(ports[6]))
	if err := c.etcd.start(); err != nil {
		return nil, err
	}

	p := c.pki
	c.apiserver = newProcess("kube-apiserver", logDir, tool("kube-apiserver"), append([]string{
		"--etcd-servers=" + etcdURL(etcdClient),
		"--bind-address=127.0.0.1", "--secure-port=" + strconv.Itoa(apiPort),
		"--advertise-address=" + AdvertiseAddress,
		"--tls-cert-file=" + p.APIServerCert, "--tls-private-key-file=" + p.APIServerKey,
		"--client-ca-file=" + p.CAFile,
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + p.ServiceAccountPub,
		"--service-account-signing-key-file=" + p.ServiceAccountKey,
		"--service-cluster-ip-range=198.19.0.0/16",
		"--authorization-mode=Node,RBAC",
		// As every production cluster runs it: kubelets may change only
		// their own Node and Pods, and no label under
		// node-restriction.kubernetes.io/.
		"--enable-admission-plugins=NodeRestriction",
		// The aggregation layer, which the metrics adapter's APIService needs.
		"--requestheader-client-ca-file=" + p.FrontProxyCAFile,
		"--requestheader-allowed-names=front-proxy-client",
		"--requestheader-username-headers=X-Remote-User",
		"--requestheader-group-headers=X-Remote-Group",
		"--requestheader-extra-headers-prefix=X-Remote-Extra-",
		"--proxy-client-cert-file=" + p.FrontProxyClientCert,
		"--proxy-client-key-file=" + p.FrontProxyClientKey,
		"--profiling=false",
	}, cfg.APIServerArgs...)...)
	if err := c.startAPIServer(ctx); err != nil {
		return nil, err
	}
	c.APIServerReadyTime = time.Since(t0)

	controllerFlags := []string{"--kubeconfig=" + c.Kubeconfig,
		"--authentication-kubeconfig=" + c.Kubeconfig, "--authorization-kubeconfig=" + c.Kubeconfig,
		"--bind-address=127.0.0.1", "--leader-elect=false"}
	kcm := newProcess("kube-controller-manager", logDir, tool("kube-controller-manager"), append(append(controllerFlags,
		"--secure-port="+strconv.Itoa(kcmPort),
		// kwok assigns pod IPs itself; nothing allocates node CIDRs.
		"--controllers=*,-node-ipam-controller",
		"--root-ca-file="+p.CAFile,
		"--service-account-private-key-file="+p.ServiceAccountKey,
		"--use-service-account-credentials=false",
		"--horizontal-pod-autoscaler-sync-period="+cfg.HPASyncPeriod.String(),
	), cfg.ControllerManagerArgs...)...)
	c.others = append(c.others, kcm)

	kwokConfig := filepath.Join(c.Dir, "kwok.yaml")
	if err := os.WriteFile(kwokConfig, kwokConfiguration(cfg.PodCIDR), 0o644); err != nil {
		return nil, err
	}
	kwok := newProcess("kwok", logDir, tool("kwok"),
		"--kubeconfig="+c.Kubeconfig, "--config="+kwokConfig, "--manage-all-nodes=true",
		"--server-address=127.0.0.1:"+strconv.Itoa(kwokPort), "--node-lease-duration-seconds=40")
	c.others = append(c.others, kwok)
	c.kwok = kwok

	c.controllers = map[*Process]string{
		kcm:  "https://127.0.0.1:" + strconv.Itoa(kcmPort) + "/healthz",
		kwok: "http://127.0.0.1:" + strconv.Itoa(kwokPort) + "/healthz",
	}
	if !cfg.WithoutScheduler {
		sched := newProcess("kube-scheduler", logDir, tool("kube-scheduler"), append(append(controllerFlags,
			"--secure-port="+strconv.Itoa(schedPort)), cfg.SchedulerArgs...)...)
		c.others = append(c.others, sched)
		c.controllers[sched] = "https://127.0.0.1:" + strconv.Itoa(schedPort) + "/healthz"
	}
	if err := c.startControllers(ctx); err != nil {
		return nil, err
	}
	// Pods cannot be created until the service-account controller has made
	// the namespace's default ServiceAccount.
	err = c.WaitFor(ctx, 30*time.Second, "the default ServiceAccount", func(ctx context.Context) (bool, error) {
		_, err := c.Client.CoreV1().ServiceAccounts(metav1.NamespaceDefault).Get(ctx, "default", metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return false, nil
		}
		return err == nil, err
	})
	if err != nil {
		return nil, c.withProcessState(err)
	}
	if err := c.warmUpPodIPs(ctx); err != nil {
		return nil, c.withProcessState(err)
	}
	c.StartupTime = time.Since(t0)
	return c, nil
}

func withDefaults(cfg Config) Config {
	if cfg.ToolsDir == "" {
		cfg.ToolsDir = os.Getenv("CAPSTAN_TOOLS_DIR")
	}
	if cfg.HPASyncPeriod == 0 {
		cfg.HPASyncPeriod = time.Second
	}
	if cfg.PodCIDR == "" {
		cfg.PodCIDR = DefaultPodCIDR
	}
	return cfg
}

func checkTools(dir string) error {
	if dir == "" {
		return errors.New("no control-plane binaries: set CAPSTAN_TOOLS_DIR to the folder hack/build-control-plane.sh prints (make test-e2e does this)")
	}
	for _, name := range []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"} {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			return fmt.Errorf("control-plane binary %s missing from %s (run hack/build-control-plane.sh): %w", name, dir, err)
		}
	}
	return nil
}

// checkNamespace fails unless the advertise address is local, which is true
// only inside the namespace hack/netns.sh sets up.
func checkNamespace() error {
	l, err := net.Listen("tcp", net.JoinHostPort(AdvertiseAddress, "0"))
	if err != nil {
		return fmt.Errorf("%s is not a local address here, so this is not Capstan's private network namespace: "+
			"run the command through hack/netns.sh (e2e test packages re-run themselves there from TestMain): %w",
			AdvertiseAddress, err)
	}
	return l.Close()
}

func (c *Cluster) startAPIServer(ctx context.Context) error {
	if err := c.apiserver.start(); err != nil {
		return err
	}
	return c.apiserver.WaitHealthy(ctx, c.APIServerURL+"/readyz", 60*time.Second)
}

// startControllers starts kube-controller-manager, kwok and kube-scheduler and
// waits until each reports healthy.
func (c *Cluster) startControllers(ctx context.Context) error {
	for proc := range c.controllers {
		if err := proc.start(); err != nil {
			return err
		}
	}
	for proc, url := range c.controllers {
		if err := proc.WaitHealthy(ctx, url, 60*time.Second); err != nil {
			return err
		}
	}
	return nil
}

// StopAPIServer stops kube-apiserver and leaves everything else running, so a
// test can see how a component behaves while the API is gone.
func (c *Cluster) StopAPIServer() {
	c.apiserver.Stop(10 * time.Second)
}

// StartAPIServer starts kube-apiserver again after StopAPIServer, with the
// same flags and data, and waits until it is ready. It also restarts
// kube-controller-manager and kube-scheduler: after a long outage their
// informers back off for up to 30 s before they watch again, and the next
// test would wait on that instead of on the component it tests. kwok keeps
// running, because it remembers which pod IPs it handed out only in memory.
// Components the test started itself are left alone; how they recover is
// what the test is about.
func (c *Cluster) StartAPIServer(ctx context.Context) error {
	if err := c.startAPIServer(ctx); err != nil {
		return err
	}
	for proc, url := range c.controllers {
		if proc == c.kwok {
			continue
		}
		proc.Stop(5 * time.Second)
		if err := proc.start(); err != nil {
			return err
		}
		if err := proc.WaitHealthy(ctx, url, 60*time.Second); err != nil {
			return err
		}
	}
	return nil
}

// Stop stops every process the cluster started, newest first, and removes its
// folder if Start created it. It is safe to call more than once.
func (c *Cluster) Stop() {
	c.mu.Lock()
	others := c.others
	c.others = nil
	c.mu.Unlock()
	for i := len(others) - 1; i >= 0; i-- {
		others[i].Stop(5 * time.Second)
	}
	for _, p := range []*Process{c.apiserver, c.etcd} {
		if p != nil {
			p.Stop(10 * time.Second)
		}
	}
	if c.removeDir && os.Getenv("CAPSTAN_KEEP_CLUSTER") == "" {
		_ = os.RemoveAll(c.Dir)
	}
}

// Logs returns the end of every process's log, for a failing test to print.
func (c *Cluster) Logs(lines int) string {
	var out string
	for _, p := range c.processes() {
		if p != nil {
			out += fmt.Sprintf("==> %s <==\n%s\n", p.name, p.LogTail(lines))
		}
	}
	return out
}

func (c *Cluster) processes() []*Process {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []*Process
	for _, p := range append([]*Process{c.etcd, c.apiserver}, c.others...) {
		if p != nil {
			out = append(out, p)
		}
	}
	return out
}

// withProcessState adds to err the first control-plane process that has died.
func (c *Cluster) withProcessState(err error) error {
	for _, p := range c.processes() {
		if exited, exitErr := p.Exited(); exited {
			return fmt.Errorf("%w; %w", err, p.Failure("exited ("+exitErr.Error()+")"))
		}
	}
	return err
}

// IssueServingCert signs a serving certificate for hosts with the cluster CA
// and writes it into the cluster's folder, for servers the API server must
// trust (an aggregated APIService with caBundle, a webhook).
func (c *Cluster) IssueServingCert(name string, hosts ...string) (certFile, keyFile string, err error) {
	return c.pki.issueTo(name, c.pki.ca, pkix.Name{CommonName: name}, x509.ExtKeyUsageServerAuth, hosts...)
}

// CABundle returns the cluster CA certificate in PEM.
func (c *Cluster) CABundle() []byte { return c.pki.ca.certPEM }

func kwokConfiguration(podCIDR string) []byte {
	// kwok v0.8.0 refuses a partial configuration: every parallelism field is set.
	return append([]byte(`apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
options:
  cidr: `+podCIDR+`
  nodeIP: 198.18.255.2
  manageAllNodes: true
  podPlayStageParallelism: 8
  nodePlayStageParallelism: 4
  nodeLeaseParallelism: 4
  podsOnNodeSyncParallelism: 2
  enablePodsOnNodeSyncListPager: true
---
`), stages...)
}
