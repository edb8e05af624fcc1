package components

import (
	"context"
	"slices"
	"strconv"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/test/cluster"
)

// Router is capstan-router installed in a cluster from a kustomization
// under manifests/: its objects applied, a kubeconfig for its
// ServiceAccount made, and its Deployment's command read, so that Start can
// run the binary the way the Deployment would, as many times as a test
// needs.
type Router struct {
	// Args and Env are the Deployment's container arguments and the
	// environment it sets ("NAME=value").
	Args, Env []string
	// Kubeconfig authenticates as the router's ServiceAccount.
	Kubeconfig string

	cluster *cluster.Cluster
}

// InstallRouter applies manifests/<dir> ("router", "router/gateway") to
// the cluster but the kinds skipped, as Install does, and makes a kubeconfig
// for the router's ServiceAccount.
func InstallRouter(ctx context.Context, c *cluster.Cluster, dir string, skip ...string) (*Router, error) {
	resources, err := Render(dir)
	if err != nil {
		return nil, err
	}
	args, env, err := Install(ctx, c, resources, skip...)
	if err != nil {
		return nil, err
	}
	kubeconfig, err := c.ServiceAccountKubeconfig(ctx, Namespace, "capstan-router")
	if err != nil {
		return nil, err
	}
	return &Router{Args: args, Env: env, Kubeconfig: kubeconfig, cluster: c}, nil
}

// RouterOptions says how Start runs one capstan-router. The zero value runs
// it as the Deployment would, on a free loopback port.
type RouterOptions struct {
	// Name names the process and its log file. Default "capstan-router".
	Name string
	// Addr is the host:port it serves the API on (--bind-address).
	// Default a free loopback port.
	Addr string
	// AdminAddr is the host:port of its health endpoints and metrics
	// (--admin-bind-address). Default a free loopback port.
	AdminAddr string
	// Args follow the Deployment's arguments and the harness's own
	// (--kubeconfig, --bind-address, --admin-bind-address,
	// --shutdown-delay=0s); later flags win.
	Args []string
	// Env is added to the environment the Deployment sets ("NAME=value").
	Env []string
}

// routerReadyTimeout bounds the wait for a started router's /readyz.
const routerReadyTimeout = time.Minute

// Start runs capstan-router and returns once it is ready. Cluster.Stop
// stops it, if the caller does not before.
func (r *Router) Start(ctx context.Context, opts RouterOptions) (*Component, error) {
	c, err := r.start(opts)
	if err != nil {
		return nil, err
	}
	if err := c.WaitHealthy(ctx, c.AdminURL+"/readyz", routerReadyTimeout); err != nil {
		return nil, err
	}
	return c, nil
}

// StartTest is Start for a test: it fails t if the router does not become
// ready, and stops the router when the test ends, showing the end of its log
// if the test failed.
func (r *Router) StartTest(t testing.TB, ctx context.Context, opts RouterOptions) *Component {
	t.Helper()
	c, err := r.start(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Stop(10 * time.Second)
		if t.Failed() {
			t.Logf("%s log:\n%s", c.Name(), c.LogTail(60))
		}
	})
	if err := c.WaitHealthy(ctx, c.AdminURL+"/readyz", routerReadyTimeout); err != nil {
		t.Fatal(err)
	}
	return c
}

// start launches the router without waiting for it.
func (r *Router) start(opts RouterOptions) (*Component, error) {
	if opts.Name == "" {
		opts.Name = "capstan-router"
	}
	for _, addr := range []*string{&opts.Addr, &opts.AdminAddr} {
		if *addr == "" {
			port, err := cluster.FreePort()
			if err != nil {
				return nil, err
			}
			*addr = "127.0.0.1:" + strconv.Itoa(port)
		}
	}
	bin, err := cluster.Binary("capstan-router")
	if err != nil {
		return nil, err
	}
	args := append(slices.Clone(r.Args), "--kubeconfig="+r.Kubeconfig, "--bind-address="+opts.Addr,
		"--admin-bind-address="+opts.AdminAddr, "--shutdown-delay=0s")
	p, err := r.cluster.RunWithEnv(opts.Name, bin, append(slices.Clone(r.Env), opts.Env...), append(args, opts.Args...)...)
	if err != nil {
		return nil, err
	}
	return &Component{Process: p, URL: "http://" + opts.Addr, AdminURL: "http://" + opts.AdminAddr}, nil
}

// StartRouter installs manifests/router but its Deployment and runs
// capstan-router on addr (host:port) with the manifests' arguments followed
// by extra ones (later flags win). It returns once the router is ready.
func StartRouter(ctx context.Context, c *cluster.Cluster, name, addr string, extra ...string) (*Component, error) {
	r, err := InstallRouter(ctx, c, "router", "Deployment")
	if err != nil {
		return nil, err
	}
	return r.Start(ctx, RouterOptions{Name: name, Addr: addr, Args: extra})
}

// RouterPod creates a Pod in capstan-system that stands for a router
// process run outside the cluster: it has the router Deployment's labels and
// ports, so that whatever finds routers by their pods (the metrics adapter)
// finds it, and it is Running and Ready with an IP of the test network. Run
// the router with its admin address on that IP (AdminAddr: ip:8081).
func RouterPod(ctx context.Context, c *cluster.Cluster, name string) (ip string, err error) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: Namespace, Name: name, Labels: map[string]string{"app.kubernetes.io/name": "capstan-router"}},
		Spec: corev1.PodSpec{
			SecurityContext: &corev1.PodSecurityContext{RunAsNonRoot: ptr.To(true), RunAsUser: ptr.To[int64](65532),
				SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault}},
			Containers: []corev1.Container{{Name: "router", Image: "capstan.dev/router-stand-in:latest",
				Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}, {Name: "admin", ContainerPort: 8081}},
				SecurityContext: &corev1.SecurityContext{AllowPrivilegeEscalation: ptr.To(false),
					Capabilities: &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}}}}},
		},
	}
	if _, err := c.Client.CoreV1().Pods(Namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		return "", err
	}
	err = c.WaitFor(ctx, 30*time.Second, "router stand-in pod "+name+" to be Ready", func(ctx context.Context) (bool, error) {
		p, err := c.Client.CoreV1().Pods(Namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		ip = p.Status.PodIP
		return ip != "" && modelserver.IsReady(p), nil
	})
	return ip, err
}

// DeleteRouterPod removes a pod RouterPod made.
func DeleteRouterPod(ctx context.Context, c *cluster.Cluster, name string) error {
	return c.Client.CoreV1().Pods(Namespace).Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)})
}
