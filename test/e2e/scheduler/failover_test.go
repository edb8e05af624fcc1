package scheduler

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2/ktesting"
	"k8s.io/utils/ptr"
	kresource "sigs.k8s.io/kustomize/api/resource"

	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/components"
)

const (
	// failoverName is the profile and the lease of the two schedulers
	// TestFailover runs. They cannot share the package's capstan-scheduler
	// (startScheduler), which keeps running for the other tests: it would
	// schedule the test's pods and hold the lease.
	failoverName = "capstan-scheduler-failover"
	// Short lease timings, so that the test sees a failover in seconds (the
	// manifests keep kube-scheduler's 15s/10s/2s).
	failoverLease   = 4 * time.Second
	failoverRenew   = 3 * time.Second
	failoverRetry   = 500 * time.Millisecond
	leaseAcquiredIn = `"Successfully acquired lease"`
)

// Two capstan-scheduler processes run as the manifests run their two
// replicas (their configuration, leader election on, the manifests'
// ServiceAccount and RBAC); one takes the lease and schedules, the other
// waits. When the leader is killed (SIGKILL: it cannot release the lease),
// the standby takes the lease and schedules a new replica within twice the
// lease duration of the kill, and a replica beyond the model slots waits
// with the same PodScheduled message the first leader gave one.
func TestFailover(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	// Installs the manifests (ServiceAccount, RBAC, ConfigMap) once for the
	// package.
	startScheduler(t)
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	c := testCluster

	resources, err := components.Render("scheduler")
	if err != nil {
		t.Fatal(err)
	}
	grantTestLease(ctx, t, resources)
	_, env, err := components.DeploymentCommand(resources)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := components.SchedulerConfig(resources)
	if err != nil {
		t.Fatal(err)
	}
	if !ptr.Deref(cfg.LeaderElection.LeaderElect, false) {
		t.Fatal("the manifests' configuration does not turn leader election on")
	}
	kubeconfig, err := c.ServiceAccountKubeconfig(ctx, systemNamespace, "capstan-scheduler")
	if err != nil {
		t.Fatal(err)
	}
	cfg.ClientConnection.Kubeconfig = kubeconfig
	cfg.Profiles[0].SchedulerName = ptr.To(failoverName)
	cfg.LeaderElection.ResourceName = failoverName
	cfg.LeaderElection.LeaseDuration = metav1.Duration{Duration: failoverLease}
	cfg.LeaderElection.RenewDeadline = metav1.Duration{Duration: failoverRenew}
	cfg.LeaderElection.RetryPeriod = metav1.Duration{Duration: failoverRetry}
	configPath, err := writeConfig(cfg, failoverName+".yaml")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		err := c.Client.CoordinationV1().Leases(systemNamespace).Delete(ctx, failoverName, metav1.DeleteOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("deleting lease %s: %v", failoverName, err)
		}
	})

	ns := testNamespace(ctx, t, "failover")
	slotNodes(ctx, t, "failover", 2)
	const model, selector = "llama-3-8b", "app=llama-3-8b"
	create := func(name string) {
		t.Helper()
		pod := modelPod(ns, name, model, nil)
		pod.Spec.SchedulerName = failoverName
		pod.Spec.NodeSelector = map[string]string{groupLabel: "failover"}
		if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	scheds := []*failoverScheduler{
		runFailoverScheduler(ctx, t, "capstan-scheduler-failover-0", configPath, kubeconfig, env),
		runFailoverScheduler(ctx, t, "capstan-scheduler-failover-1", configPath, kubeconfig, env),
	}
	for _, s := range scheds {
		s.waitReady(ctx, t)
	}

	// One of them takes the lease; the other stays a standby.
	var leader, standby *failoverScheduler
	var firstHolder string
	err = c.WaitFor(ctx, 20*time.Second, "one scheduler to hold lease "+failoverName, func(ctx context.Context) (bool, error) {
		holder, err := leaseHolder(ctx)
		if holder == "" || err != nil {
			return false, err
		}
		var leading []*failoverScheduler
		for _, s := range scheds {
			if s.logContains(t, leaseAcquiredIn) {
				leading = append(leading, s)
			}
		}
		if len(leading) > 1 {
			return false, fmt.Errorf("both schedulers say they acquired the lease")
		}
		if len(leading) == 0 {
			return false, nil
		}
		firstHolder, leader = holder, leading[0]
		return true, nil
	})
	if err != nil {
		t.Fatalf("%v\n%s\n%s", err, scheds[0].LogTail(30), scheds[1].LogTail(30))
	}
	standby = scheds[0]
	if leader == scheds[0] {
		standby = scheds[1]
	}
	t.Logf("%s leads (lease holder %s); %s is the standby", leader.name, firstHolder, standby.name)

	// The leader schedules: two replicas fill the node's two slots, the
	// third waits with the reason.
	for _, name := range []string{"before-0", "before-1", "before-2"} {
		create(name)
	}
	p := waitForPlacement(ctx, t, ns, selector, 2, 1, 15*time.Second)
	var pendingBefore, msgBefore string
	for name, msg := range p.unschedulable {
		pendingBefore, msgBefore = name, msg
	}
	if !strings.Contains(msgBefore, "model "+model+": all 2 model slots on 1 node") {
		t.Errorf("the waiting replica's condition does not name the model-slot cap: %q", msgBefore)
	}
	for _, pods := range p.bound {
		for _, pod := range pods {
			if bound := boundLine(ns, pod.Name); !leader.logShows(ctx, t, bound) || standby.logContains(t, bound) {
				t.Errorf("pod %s was not bound by the leader %s alone", pod.Name, leader.name)
			}
		}
	}
	if standby.logContains(t, leaseAcquiredIn) {
		t.Errorf("the standby %s acquired the lease while the leader ran", standby.name)
	}

	// SIGKILL the leader: it cannot release the lease, which the standby
	// takes only once it has expired.
	killedAt := leader.kill()

	// Free one slot, and ask for one replica more: only a scheduler that
	// leads can bind it.
	var freed string
	for _, pods := range p.bound {
		freed = pods[0].Name
	}
	for _, name := range []string{pendingBefore, freed} {
		if err := c.Client.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}); err != nil {
			t.Fatal(err)
		}
	}
	create("after-0")

	var tookLease, bound time.Duration
	deadline := 2 * failoverLease
	err = c.WaitFor(ctx, deadline-time.Since(killedAt), "the standby to take the lease and bind after-0", func(ctx context.Context) (bool, error) {
		if tookLease == 0 {
			if holder, err := leaseHolder(ctx); err != nil {
				return false, err
			} else if holder != "" && holder != firstHolder {
				tookLease = time.Since(killedAt)
			}
		}
		if bound == 0 {
			pod, err := c.Client.CoreV1().Pods(ns).Get(ctx, "after-0", metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			if pod.Spec.NodeName != "" {
				bound = time.Since(killedAt)
			}
		}
		return tookLease > 0 && bound > 0, nil
	})
	if err != nil {
		t.Fatalf("%v within %v of the kill (lease taken after %v, after-0 bound after %v)\n%s",
			err, deadline, tookLease, bound, standby.LogTail(30))
	}
	t.Logf("after SIGKILL of the leader: the standby took the lease after %v and bound a new replica after %v (lease duration %v, retry period %v)",
		tookLease.Round(time.Millisecond), bound.Round(time.Millisecond), failoverLease, failoverRetry)
	if !standby.logContains(t, leaseAcquiredIn) || !standby.logShows(ctx, t, boundLine(ns, "after-0")) {
		t.Errorf("after-0 was not bound by the former standby %s", standby.name)
	}

	// The new leader gives a replica beyond the slots the same reason.
	create("after-1")
	p = waitForPlacement(ctx, t, ns, selector, 2, 1, 15*time.Second)
	msgAfter, ok := p.unschedulable["after-1"]
	if !ok {
		t.Fatalf("after-1 is not the waiting replica: %v", p.unschedulable)
	}
	if msgAfter != msgBefore {
		t.Errorf("the waiting replica's reason changed with the leader:\nbefore: %q\nafter:  %q", msgBefore, msgAfter)
	}
}

// grantTestLease lets the manifests' ServiceAccount hold the lease
// failoverName with the manifests' own leader-election Role, copied with the
// lease's name changed.
func grantTestLease(ctx context.Context, t *testing.T, resources []*kresource.Resource) {
	t.Helper()
	c := testCluster
	roles, err := components.Decode[rbacv1.Role](resources, "Role")
	if err != nil {
		t.Fatal(err)
	}
	bindings, err := components.Decode[rbacv1.RoleBinding](resources, "RoleBinding")
	if err != nil {
		t.Fatal(err)
	}
	const leRole = "capstan-scheduler:leader-election"
	i := slices.IndexFunc(roles, func(r rbacv1.Role) bool { return r.Name == leRole })
	j := slices.IndexFunc(bindings, func(b rbacv1.RoleBinding) bool { return b.Name == leRole })
	if i < 0 || j < 0 {
		t.Fatalf("manifests/scheduler has no Role and RoleBinding %s", leRole)
	}
	role, binding := roles[i], bindings[j]
	granted := false
	for k, rule := range role.Rules {
		for l, name := range rule.ResourceNames {
			if name == schedulerName {
				role.Rules[k].ResourceNames[l], granted = failoverName, true
			}
		}
	}
	if !granted {
		t.Fatalf("Role %s does not name the lease %s", leRole, schedulerName)
	}
	name := leRole + "-failover-test"
	role.ObjectMeta = metav1.ObjectMeta{Name: name, Namespace: systemNamespace}
	binding.ObjectMeta = metav1.ObjectMeta{Name: name, Namespace: systemNamespace}
	binding.RoleRef.Name = name
	rbac := c.Client.RbacV1()
	if _, err := rbac.Roles(systemNamespace).Create(ctx, &role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = rbac.RoleBindings(systemNamespace).Delete(ctx, name, metav1.DeleteOptions{})
		_ = rbac.Roles(systemNamespace).Delete(ctx, name, metav1.DeleteOptions{})
	})
	if _, err := rbac.RoleBindings(systemNamespace).Create(ctx, &binding, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// leaseHolder returns the holderIdentity of the lease failoverName, "" when
// the lease does not exist yet.
func leaseHolder(ctx context.Context) (string, error) {
	var l *coordinationv1.Lease
	l, err := testCluster.Client.CoordinationV1().Leases(systemNamespace).Get(ctx, failoverName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	return ptr.Deref(l.Spec.HolderIdentity, ""), nil
}

// boundLine is what kube-scheduler logs (-v=2) when it has bound a pod.
func boundLine(ns, pod string) string {
	return fmt.Sprintf(`"Successfully bound pod to node" pod="%s/%s"`, ns, pod)
}

// failoverScheduler is one capstan-scheduler process of TestFailover. It is
// started here rather than by components.StartScheduler, which waits for
// the lease (a standby never gets it).
type failoverScheduler struct {
	*cluster.Process
	name, logPath, url string
}

// runFailoverScheduler starts capstan-scheduler as components.StartScheduler
// does: the configuration file, the manifests' environment, the
// ServiceAccount's kubeconfig for delegated authentication, a loopback port.
func runFailoverScheduler(ctx context.Context, t *testing.T, name, configPath, kubeconfig string, env []string) *failoverScheduler {
	t.Helper()
	bin, err := cluster.Binary("capstan-scheduler")
	if err != nil {
		t.Fatal(err)
	}
	port, err := cluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	p, err := testCluster.RunWithEnv(name, bin, env, "--config="+configPath, "-v=2",
		"--bind-address=127.0.0.1", "--secure-port="+strconv.Itoa(port),
		"--authentication-kubeconfig="+kubeconfig, "--authorization-kubeconfig="+kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Kill)
	return &failoverScheduler{Process: p, name: name, logPath: p.LogPath, url: "https://127.0.0.1:" + strconv.Itoa(port)}
}

// waitReady waits until the process answers /readyz (a standby does too).
func (s *failoverScheduler) waitReady(ctx context.Context, t *testing.T) {
	t.Helper()
	client := insecureClient(t, "", "")
	err := testCluster.WaitFor(ctx, 30*time.Second, s.name+" to be ready", func(context.Context) (bool, error) {
		if exited, _ := s.Exited(); exited {
			return false, fmt.Errorf("%s exited", s.name)
		}
		resp, err := client.Get(s.url + "/readyz")
		if err != nil {
			return false, err
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	})
	if err != nil {
		t.Fatalf("%v\n%s:\n%s", err, s.name, s.LogTail(30))
	}
}

// kill sends SIGKILL to the process and returns when it is gone.
func (s *failoverScheduler) kill() time.Time {
	at := time.Now()
	s.Kill()
	return at
}

// logShows waits a little for text in s's log: the scheduler logs a binding
// after the API server has it, so the test may see the pod bound first.
func (s *failoverScheduler) logShows(ctx context.Context, t *testing.T, text string) bool {
	t.Helper()
	err := testCluster.WaitFor(ctx, 5*time.Second, fmt.Sprintf("%q in %s's log", text, s.name), func(context.Context) (bool, error) {
		return s.logContains(t, text), nil
	})
	return err == nil
}

func (s *failoverScheduler) logContains(t *testing.T, text string) bool {
	t.Helper()
	data, err := os.ReadFile(s.logPath)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Contains(string(data), text)
}
