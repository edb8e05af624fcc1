package adapter

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	appsv1 "k8s.io/api/apps/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2/ktesting"
	"k8s.io/metrics/pkg/apis/custom_metrics/v1beta1"
	cmv1beta2 "k8s.io/metrics/pkg/apis/custom_metrics/v1beta2"

	"github.com/capstan-dev/capstan/metricsadapter/modelserver"
	"github.com/capstan-dev/capstan/test/cluster"
	"github.com/capstan-dev/capstan/test/components"
	"github.com/capstan-dev/capstan/test/fleet"
)

// The manifests are accepted by a real API server (schema, RBAC references,
// APIService validation), and hold what a production install needs.
func TestManifests(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	c := testCluster
	resources, err := components.Render("metricsadapter")
	if err != nil {
		t.Fatal(err)
	}
	// The namespace must exist for a dry run of the objects inside it.
	var namespace, rest bytes.Buffer
	kinds := map[string]*unstructured.Unstructured{}
	for _, r := range resources {
		y, err := r.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		out := &rest
		if r.GetKind() == "Namespace" {
			out = &namespace
		}
		out.WriteString("---\n")
		out.Write(y)
		obj, err := r.Map()
		if err != nil {
			t.Fatal(err)
		}
		kinds[r.GetKind()+"/"+r.GetName()] = &unstructured.Unstructured{Object: obj}
	}
	if err := c.Apply(ctx, "", &namespace); err != nil {
		t.Fatal(err)
	}
	if err := c.DryRunApply(ctx, adapterNamespace, &rest); err != nil {
		t.Fatalf("the API server rejects the manifests: %v", err)
	}

	for _, want := range []string{"Namespace/capstan-system", "ServiceAccount/" + adapterName, "Deployment/" + adapterName,
		"Service/" + adapterName, "APIService/v1beta1.custom.metrics.k8s.io", "APIService/v1beta2.custom.metrics.k8s.io",
		"ClusterRoleBinding/capstan-metrics-adapter:system:auth-delegator", "RoleBinding/capstan-metrics-adapter-auth-reader",
		"ClusterRole/capstan-custom-metrics-reader", "ClusterRoleBinding/capstan-custom-metrics-reader:horizontal-pod-autoscaler"} {
		if kinds[want] == nil {
			t.Errorf("the manifests lack %s", want)
		}
	}
	for _, v := range []string{"v1beta1", "v1beta2"} {
		u := kinds["APIService/"+v+".custom.metrics.k8s.io"]
		if u == nil {
			continue
		}
		if skip, _, _ := unstructured.NestedBool(u.Object, "spec", "insecureSkipTLSVerify"); skip {
			t.Errorf("APIService %s skips TLS verification", v)
		}
	}
	var d appsv1.Deployment
	if u := kinds["Deployment/"+adapterName]; u != nil {
		data, _ := json.Marshal(u.Object)
		if err := json.Unmarshal(data, &d); err != nil {
			t.Fatal(err)
		}
		pod := d.Spec.Template.Spec
		ctr := pod.Containers[0]
		switch {
		case ctr.Image != "ghcr.io/capstan-dev/capstan-metrics-adapter:v0.1.0":
			t.Errorf("image %s", ctr.Image)
		case pod.SecurityContext == nil || pod.SecurityContext.RunAsNonRoot == nil || !*pod.SecurityContext.RunAsNonRoot:
			t.Error("the pod may run as root")
		case ctr.SecurityContext == nil || ctr.SecurityContext.ReadOnlyRootFilesystem == nil || !*ctr.SecurityContext.ReadOnlyRootFilesystem:
			t.Error("the root filesystem is writable")
		case ctr.ReadinessProbe == nil || ctr.LivenessProbe == nil:
			t.Error("no probes")
		case ctr.Resources.Requests.Cpu().IsZero() || ctr.Resources.Limits.Memory().IsZero():
			t.Error("no resource requests or memory limit")
		case pod.ServiceAccountName != adapterName:
			t.Errorf("service account %q", pod.ServiceAccountName)
		}
	}
}

// Test 5: both APIServices report Available; anonymous and unprivileged
// requests are refused; the HPA controller's identity and the adapter's own
// have exactly the access the manifests mean them to have.
func TestAPIServiceAvailableAndAccessControlled(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	a := startAdapter(t)
	c := testCluster
	for _, name := range []string{"v1beta1.custom.metrics.k8s.io", "v1beta2.custom.metrics.k8s.io"} {
		s, err := getAPIService(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		if got := availableCondition(s); got != "True" {
			t.Errorf("APIService %s Available=%s", name, got)
		}
		if s.Spec.InsecureSkipTLSVerify {
			t.Errorf("APIService %s skips TLS verification", name)
		}
	}
	for _, version := range []string{"v1beta1", "v1beta2"} {
		raw, err := getRaw(ctx, "/apis/custom.metrics.k8s.io/"+version)
		if err != nil {
			t.Fatalf("discovery of %s: %v", version, err)
		}
		for _, r := range []string{`"pods/requests_waiting"`, `"deployments.apps/requests_waiting_avg"`, `"services/time_to_first_token_seconds_p90"`} {
			if !bytes.Contains(raw, []byte(r)) {
				t.Errorf("discovery of %s lacks %s", version, r)
			}
		}
	}

	path := "/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/*/requests_waiting"
	anonymous := kubernetes.NewForConfigOrDie(&rest.Config{Host: c.APIServerURL, TLSClientConfig: rest.TLSClientConfig{CAFile: c.CAFile}})
	if _, err := anonymous.Discovery().RESTClient().Get().AbsPath(path).DoRaw(ctx); !apierrors.IsForbidden(err) && !apierrors.IsUnauthorized(err) {
		t.Errorf("anonymous request through the API server: %v, want Forbidden or Unauthorized", err)
	}
	// Straight to the adapter, without a client certificate.
	direct := &http.Client{Transport: &http.Transport{TLSClientConfig: a.client.Transport.(*http.Transport).TLSClientConfig.Clone()}}
	direct.Transport.(*http.Transport).TLSClientConfig.Certificates = nil
	resp, err := direct.Get(a.url + path)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized && resp.StatusCode != http.StatusForbidden {
		t.Errorf("anonymous request to the adapter: %s, want 401 or 403", resp.Status)
	}
	// A ServiceAccount without RBAC for the group.
	if err := c.Apply(ctx, "default", strings.NewReader("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: nobody}\n")); err != nil {
		t.Fatal(err)
	}
	nobody := saClient(ctx, t, "default", "nobody")
	if _, err := nobody.Discovery().RESTClient().Get().AbsPath(path).DoRaw(ctx); !apierrors.IsForbidden(err) {
		t.Errorf("a ServiceAccount without access: %v, want Forbidden", err)
	}

	can := func(user, group, resource, verb, ns string) bool {
		t.Helper()
		sar, err := c.Client.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authorizationv1.SubjectAccessReview{
			Spec: authorizationv1.SubjectAccessReviewSpec{User: user, Groups: []string{"system:serviceaccounts", "system:authenticated"},
				ResourceAttributes: &authorizationv1.ResourceAttributes{Group: group, Resource: resource, Verb: verb, Namespace: ns}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return sar.Status.Allowed
	}
	hpa := "system:serviceaccount:kube-system:horizontal-pod-autoscaler"
	self := "system:serviceaccount:capstan-system:capstan-metrics-adapter"
	for _, tc := range []struct {
		user, group, resource, verb string
		want                        bool
	}{
		{hpa, "custom.metrics.k8s.io", "pods", "get", true},
		{hpa, "custom.metrics.k8s.io", "deployments.apps", "get", true},
		{self, "", "pods", "watch", true},
		{self, "apps", "deployments", "list", true},
		{self, "apps", "statefulsets", "list", true},
		{self, "", "services", "list", true},
		{self, "authorization.k8s.io", "subjectaccessreviews", "create", true},
		{self, "", "secrets", "list", false},
		{self, "", "pods", "delete", false},
		{self, "apps", "deployments", "update", false},
	} {
		if got := can(tc.user, tc.group, tc.resource, tc.verb, "ml"); got != tc.want {
			t.Errorf("%s may %s %s.%s: %v, want %v", tc.user, tc.verb, tc.resource, tc.group, got, tc.want)
		}
	}
}

func saClient(ctx context.Context, t *testing.T, ns, name string) kubernetes.Interface {
	t.Helper()
	path, err := testCluster.ServiceAccountKubeconfig(ctx, ns, name)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		t.Fatal(err)
	}
	return kubernetes.NewForConfigOrDie(cfg)
}

func setup(t *testing.T, prefix string, timeout time.Duration) (context.Context, string, *running) {
	t.Helper()
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	t.Cleanup(cancel)
	a := startAdapter(t)
	c := testCluster
	nodesOnce.Do(func() {
		nodesErr = c.CreateNodes(ctx, cluster.Node{Name: "adapter-0"}, cluster.Node{Name: "adapter-1"})
	})
	if nodesErr != nil {
		t.Fatal(nodesErr)
	}
	ns, err := c.CreateNamespace(ctx, prefix)
	if err != nil {
		t.Fatal(err)
	}
	sim := fleet.New(c.Client, fleet.Options{Namespace: ns})
	simCtx, stop := context.WithCancel(ctx)
	if err := sim.Start(simCtx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stop(); sim.Wait() })
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("adapter log:\n%s", a.proc.LogTail(40))
		}
	})
	return ctx, ns, a
}

// Test 4: kubectl get --raw for pods, Deployments and Services returns what
// the pods themselves serve, for every engine, old vLLM names included, in
// both API versions.
func TestRawGetsReturnWhatPodsServe(t *testing.T) {
	ctx, ns, _ := setup(t, "raw", 3*time.Minute)
	c := testCluster
	type engineCase struct {
		engine      modelserver.Engine
		legacy      bool
		raw         string            // the adapter's name for the engine's running-requests gauge
		family      string            // that gauge on the pod's page
		labels      map[string]string // and its labels there
		kv          bool              // whether the engine reports KV-cache usage
		rawKV       string
		rawKVFamily string
	}
	cases := map[string]engineCase{
		"vllm":        {engine: modelserver.VLLM, raw: "vllm_num_requests_running", family: "vllm:num_requests_running", kv: true, rawKV: "vllm_kv_cache_usage_perc", rawKVFamily: "vllm:kv_cache_usage_perc"},
		"vllm-legacy": {engine: modelserver.VLLM, legacy: true, raw: "vllm_num_requests_running", family: "vllm:num_requests_running", kv: true, rawKV: "vllm_gpu_cache_usage_perc", rawKVFamily: "vllm:gpu_cache_usage_perc"},
		"sglang":      {engine: modelserver.SGLang, raw: "sglang_num_running_reqs", family: "sglang:num_running_reqs", kv: true, rawKV: "sglang_token_usage", rawKVFamily: "sglang:token_usage"},
		"tgi":         {engine: modelserver.TGI, raw: "tgi_batch_current_size", family: "tgi_batch_current_size"},
		"triton": {engine: modelserver.Triton, raw: "nv_trt_llm_requests_scheduled", family: "nv_trt_llm_request_metrics",
			labels: map[string]string{"request_type": "scheduled"}, kv: true, rawKV: "nv_trt_llm_kv_cache_blocks_used",
			rawKVFamily: "nv_trt_llm_kv_cache_block_metrics"},
	}
	// Two replicas each; two requests run at once and the rest wait. The
	// first pod gets three requests (2 running, 1 waiting), the second one.
	for name, e := range cases {
		ann := map[string]string{fleet.MaxRunningAnnotation: "2", fleet.TTFTAnnotation: "10m"}
		if e.legacy {
			ann[fleet.EngineVersionAnnotation] = "legacy"
		}
		if err := c.Deploy(ctx, cluster.ModelServer{Namespace: ns, Name: name, Model: name, Engine: e.engine, Replicas: 2, Annotations: ann}); err != nil {
			t.Fatal(err)
		}
	}
	loadCtx, stopLoad := context.WithCancel(ctx)
	defer stopLoad()
	first := map[string]string{}
	second := map[string]string{}
	for name := range cases {
		pods, err := c.WaitForReadyPods(ctx, ns, "app="+name, 2, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		first[name], second[name] = pods[0].Name, pods[1].Name
		waitServing(ctx, t, pods[0].Status.PodIP)
		waitServing(ctx, t, pods[1].Status.PodIP)
		load(loadCtx, t, pods[0].Status.PodIP, name, 3)
		load(loadCtx, t, pods[1].Status.PodIP, name, 1)
	}

	base := "/apis/custom.metrics.k8s.io/v1beta2/namespaces/" + ns
	for name, e := range cases {
		t.Run(name, func(t *testing.T) {
			p0, p1 := first[name], second[name]
			pods, _ := c.Pods(ctx, ns, "app="+name)
			ips := podIPs(pods)
			expect := func(path string, want map[string]string) {
				t.Helper()
				var got map[string]string
				var list *v1beta2MetricValueList
				err := c.WaitFor(ctx, 15*time.Second, path, func(ctx context.Context) (bool, error) {
					var err error
					got, list, err = metricValues(ctx, path)
					if apierrors.IsNotFound(err) {
						return false, nil
					}
					return cmp.Equal(want, got), err
				})
				if err != nil {
					t.Fatalf("GET %s: (-want +got):\n%s", path, cmp.Diff(want, got))
				}
				for _, item := range list.Items {
					if age := time.Since(item.Timestamp.Time); age > 5*time.Second || age < -time.Second {
						t.Errorf("GET %s: %s's value is %s old", path, item.DescribedObject.Name, age)
					}
				}
			}
			sel := "?labelSelector=app%3D" + name
			expect(base+"/pods/*/requests_running"+sel, map[string]string{p0: "2", p1: "1"})
			expect(base+"/pods/*/requests_waiting"+sel, map[string]string{p0: "1", p1: "0"})
			expect(base+"/deployments.apps/"+name+"/requests_running", map[string]string{name: "3"})
			expect(base+"/deployments.apps/"+name+"/requests_running_avg", map[string]string{name: "1500m"})
			expect(base+"/deployments.apps/"+name+"/requests_waiting", map[string]string{name: "1"})
			expect(base+"/services/"+name+"/requests_running", map[string]string{name: "3"})

			// The engine's own gauge, under its sanitized name, equals what
			// the pod serves.
			served := map[string]string{}
			for pod, ip := range ips {
				v, ok, err := podGauge(ctx, ip, e.family, e.labels)
				if err != nil || !ok {
					t.Fatalf("%s serves no %s: %v", pod, e.family, err)
				}
				served[pod] = resource.NewMilliQuantity(int64(v*1000), resource.DecimalSI).String()
			}
			expect(base+"/pods/*/"+e.raw+sel, served)
			if e.kv {
				expect(base+"/pods/*/kv_cache_usage"+sel, map[string]string{p0: "1", p1: "500m"})
				expect(base+"/deployments.apps/"+name+"/kv_cache_usage_avg", map[string]string{name: "750m"})
				servedKV := map[string]string{}
				for pod, ip := range ips {
					labels := map[string]string(nil)
					if e.engine == modelserver.Triton {
						labels = map[string]string{"kv_cache_block_type": "used"}
					}
					v, ok, err := podGauge(ctx, ip, e.rawKVFamily, labels)
					if err != nil || !ok {
						t.Fatalf("%s serves no %s: %v", pod, e.rawKVFamily, err)
					}
					servedKV[pod] = resource.NewMilliQuantity(int64(v*1000), resource.DecimalSI).String()
				}
				expect(base+"/pods/*/"+e.rawKV+sel, servedKV)
			} else if _, _, err := metricValues(ctx, base+"/pods/*/kv_cache_usage"+sel); !apierrors.IsNotFound(err) {
				t.Errorf("%s reports no KV-cache usage, yet the API answered %v", e.engine, err)
			}
		})
	}

	t.Run("v1beta1", func(t *testing.T) {
		path := "/apis/custom.metrics.k8s.io/v1beta1/namespaces/" + ns + "/pods/*/requests_running?labelSelector=app%3Dvllm"
		raw, err := getRaw(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		list := &v1beta1.MetricValueList{}
		if err := json.Unmarshal(raw, list); err != nil {
			t.Fatal(err)
		}
		got := map[string]string{}
		for _, item := range list.Items {
			if item.MetricName != "requests_running" {
				t.Errorf("v1beta1 item names metric %q", item.MetricName)
			}
			got[item.DescribedObject.Name] = item.Value.String()
		}
		if diff := cmp.Diff(map[string]string{first["vllm"]: "2", second["vllm"]: "1"}, got); diff != "" {
			t.Errorf("v1beta1 (-want +got):\n%s", diff)
		}
	})

	t.Run("rates and latency quantiles", func(t *testing.T) {
		fast := cluster.ModelServer{Namespace: ns, Name: "fast", Model: "fast", Replicas: 1,
			Annotations: map[string]string{fleet.TTFTAnnotation: "30ms", fleet.TPOTAnnotation: "1ms"}}
		if err := c.Deploy(ctx, fast); err != nil {
			t.Fatal(err)
		}
		pods, err := c.WaitForReadyPods(ctx, ns, "app=fast", 1, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		ip := pods[0].Status.PodIP
		waitServing(ctx, t, ip)
		// 40 requests of 7 prompt words over about 4 seconds.
		for range 10 {
			load(ctx, t, ip, "fast", 4).Wait()
			time.Sleep(300 * time.Millisecond) // pacing the load, not synchronizing
		}
		var list *v1beta2MetricValueList
		err = c.WaitFor(ctx, 15*time.Second, "token rate and TTFT of the fast pod", func(ctx context.Context) (bool, error) {
			_, l1, err := metricValues(ctx, base+"/pods/"+pods[0].Name+"/prompt_tokens_per_second")
			if err != nil {
				return false, nil
			}
			_, l2, err := metricValues(ctx, base+"/deployments.apps/fast/time_to_first_token_seconds_p50")
			if err != nil {
				return false, nil
			}
			list = &v1beta2MetricValueList{Items: append(l1.Items, l2.Items...)}
			return l1.Items[0].Value.MilliValue() > 0, nil
		})
		if err != nil {
			t.Fatal(err)
		}
		rate, ttft := list.Items[0], list.Items[1]
		if rate.WindowSeconds == nil || *rate.WindowSeconds < 1 || *rate.WindowSeconds > 15 {
			t.Errorf("token rate window %v, want the real span of at most the 10s window (plus a checkpoint)", rate.WindowSeconds)
		}
		// The engine's TTFT buckets around 30ms are 0.02 and 0.04.
		if v := ttft.Value.AsApproximateFloat64(); v < 0.02 || v > 0.04 || ttft.WindowSeconds == nil {
			t.Errorf("TTFT p50 = %v (window %v), want within the 20-40ms bucket", v, ttft.WindowSeconds)
		}
	})
}

type v1beta2MetricValueList = cmv1beta2.MetricValueList

// waitServing waits until the simulator listens on the pod IP.
func waitServing(ctx context.Context, t *testing.T, ip string) {
	t.Helper()
	err := cluster.WaitFor(ctx, 10*time.Second, "the simulator to serve "+ip, func(ctx context.Context) (bool, error) {
		_, _, err := podGauge(ctx, ip, "none", nil)
		return err == nil, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func hpaFor(name string, metric autoscalingv2.MetricSpec) *autoscalingv2.HorizontalPodAutoscaler {
	zero := int32(0)
	one := int32(1)
	return &autoscalingv2.HorizontalPodAutoscaler{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: autoscalingv2.HorizontalPodAutoscalerSpec{
			ScaleTargetRef: autoscalingv2.CrossVersionObjectReference{APIVersion: "apps/v1", Kind: "Deployment", Name: name},
			MinReplicas:    &one,
			MaxReplicas:    4,
			Metrics:        []autoscalingv2.MetricSpec{metric},
			Behavior: &autoscalingv2.HorizontalPodAutoscalerBehavior{
				ScaleDown: &autoscalingv2.HPAScalingRules{StabilizationWindowSeconds: &zero},
				ScaleUp:   &autoscalingv2.HPAScalingRules{StabilizationWindowSeconds: &zero},
			},
		},
	}
}

// scaleTo waits until the HPA has set the Deployment to n replicas, and
// checks that it could read its metric all along.
func scaleTo(ctx context.Context, t *testing.T, ns, name string, n int32, timeout time.Duration) time.Duration {
	t.Helper()
	c := testCluster
	start := time.Now()
	var last string
	err := c.WaitFor(ctx, timeout, fmt.Sprintf("the HPA to scale %s to %d", name, n), func(ctx context.Context) (bool, error) {
		d, err := c.Client.AppsV1().Deployments(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		h, err := c.Client.AutoscalingV2().HorizontalPodAutoscalers(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		last = fmt.Sprintf("replicas %d, HPA desired %d, conditions %s", *d.Spec.Replicas, h.Status.DesiredReplicas, conditions(h))
		return *d.Spec.Replicas == n, nil
	})
	if err != nil {
		t.Fatalf("%v (last: %s)", err, last)
	}
	return time.Since(start)
}

func conditions(h *autoscalingv2.HorizontalPodAutoscaler) string {
	var out []string
	for _, c := range h.Status.Conditions {
		out = append(out, fmt.Sprintf("%s=%s (%s: %s)", c.Type, c.Status, c.Reason, c.Message))
	}
	return strings.Join(out, "; ")
}

func scalingActive(ctx context.Context, t *testing.T, ns, name string) {
	t.Helper()
	c := testCluster
	err := c.WaitFor(ctx, 30*time.Second, "the HPA to read its metric", func(ctx context.Context) (bool, error) {
		h, err := c.Client.AutoscalingV2().HorizontalPodAutoscalers(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		for _, cond := range h.Status.Conditions {
			if cond.Type == autoscalingv2.ScalingActive {
				return cond.Status == corev1.ConditionTrue, nil
			}
		}
		return false, nil
	})
	if err != nil {
		h, _ := c.Client.AutoscalingV2().HorizontalPodAutoscalers(ns).Get(ctx, name, metav1.GetOptions{})
		t.Fatalf("%v: %s", err, conditions(h))
	}
}

// Test 2: load raises waiting requests on a one-replica model, the real HPA
// controller scales it up on the per-pod metric, and back down once the load
// stops.
func TestHPAScalesOnWaitingRequests(t *testing.T) {
	ctx, ns, _ := setup(t, "hpa", 4*time.Minute)
	c := testCluster
	m := cluster.ModelServer{Namespace: ns, Name: "llama", Model: "llama", Replicas: 1,
		Annotations: map[string]string{fleet.MaxRunningAnnotation: "1", fleet.TTFTAnnotation: "10m"}}
	if err := c.Deploy(ctx, m); err != nil {
		t.Fatal(err)
	}
	pods, err := c.WaitForReadyPods(ctx, ns, "app=llama", 1, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	waitServing(ctx, t, pods[0].Status.PodIP)
	avg := resource.MustParse("2")
	h := hpaFor("llama", autoscalingv2.MetricSpec{Type: autoscalingv2.PodsMetricSourceType, Pods: &autoscalingv2.PodsMetricSource{
		Metric: autoscalingv2.MetricIdentifier{Name: "requests_waiting"},
		Target: autoscalingv2.MetricTarget{Type: autoscalingv2.AverageValueMetricType, AverageValue: &avg},
	}})
	if _, err := c.Client.AutoscalingV2().HorizontalPodAutoscalers(ns).Create(ctx, h, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	scalingActive(ctx, t, ns, "llama")

	// 12 requests, one runs, 11 wait: an average of 11 against a target of 2.
	loadCtx, stopLoad := context.WithCancel(ctx)
	defer stopLoad()
	wg := load(loadCtx, t, pods[0].Status.PodIP, "llama", 12)
	up := scaleTo(ctx, t, ns, "llama", 4, time.Minute)
	t.Logf("scaled 1 -> 4 replicas %s after the load started", up.Round(100*time.Millisecond))
	stopLoad()
	wg.Wait()
	down := scaleTo(ctx, t, ns, "llama", 1, time.Minute)
	t.Logf("scaled 4 -> 1 replica %s after the load stopped", down.Round(100*time.Millisecond))
}

// Test 3: beside a healthy model server, one pod refuses connections, one
// hangs on /metrics, one serves garbage, one is Pending and one is Running
// but not Ready. The API still answers within two scrape timeouts with the
// healthy pods, the broken ones are tried (and counted) while the Pending
// and unready ones are never contacted, and the HPA scales both ways.
func TestFaultMixStillScales(t *testing.T) {
	ctx, ns, a := setup(t, "faults", 4*time.Minute)
	c := testCluster
	m := cluster.ModelServer{Namespace: ns, Name: "mix", Model: "mix", Replicas: 1,
		Annotations: map[string]string{fleet.MaxRunningAnnotation: "1", fleet.TTFTAnnotation: "10m"}}
	if err := c.Deploy(ctx, m); err != nil {
		t.Fatal(err)
	}
	// Bare pods with the Deployment's labels: its selector (and so the
	// HPA's) covers them, but no ReplicaSet owns them.
	tmpl := m.Deployment().Spec.Template
	bare := map[string]func(*corev1.Pod){
		"refusing":  func(p *corev1.Pod) { p.Annotations[fleet.FaultAnnotation] = string(fleet.FaultRefuse) },
		"hanging":   func(p *corev1.Pod) { p.Annotations[fleet.FaultAnnotation] = string(fleet.FaultHangMetrics) },
		"garbage":   func(p *corev1.Pod) { p.Annotations[fleet.FaultAnnotation] = string(fleet.FaultGarbageMetrics) },
		"pending":   func(p *corev1.Pod) { p.Spec.NodeSelector = map[string]string{"capstan.dev/no-such-node": "true"} },
		"not-ready": func(p *corev1.Pod) { p.Annotations["sim.capstan.dev/unready"] = "true" },
	}
	for name, mutate := range bare {
		p := &corev1.Pod{ObjectMeta: *tmpl.ObjectMeta.DeepCopy(), Spec: *tmpl.Spec.DeepCopy()}
		p.Name, p.Namespace = name, ns
		p.Annotations = map[string]string{}
		mutate(p)
		if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// 1 healthy + 3 faulty pods Ready; the pending and not-ready ones not.
	var healthyPod corev1.Pod
	err := c.WaitFor(ctx, time.Minute, "the pods to settle", func(ctx context.Context) (bool, error) {
		pods, err := c.Pods(ctx, ns, "app=mix")
		if err != nil {
			return false, err
		}
		ready := 0
		for _, p := range pods {
			switch {
			case p.Name == "pending" && p.Status.Phase != corev1.PodPending:
				return false, fmt.Errorf("the pending pod is %s", p.Status.Phase)
			case p.Name == "not-ready" && (p.Status.Phase != corev1.PodRunning || modelserver.IsReady(&p)):
				return false, nil
			case modelserver.IsReady(&p):
				ready++
				if _, isBare := bare[p.Name]; !isBare {
					healthyPod = p
				}
			}
		}
		return ready == 4 && len(pods) == 6, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	waitServing(ctx, t, healthyPod.Status.PodIP)

	// The adapter tries the broken pods and says why each fails; it never
	// contacts the Pending or unready one.
	want := map[string]string{"refusing": "refused", "hanging": "timeout", "garbage": "parse_error", healthyPod.Name: "success"}
	err = c.WaitFor(ctx, 30*time.Second, "the adapter to have scraped every Ready pod", func(ctx context.Context) (bool, error) {
		page, err := a.metrics(ctx)
		if err != nil {
			return false, err
		}
		for pod, result := range want {
			re := regexp.MustCompile(`capstan_scrape_target_scrapes_total\{namespace="` + ns + `",pod="` + regexp.QuoteMeta(pod) + `",result="` + result + `"\} [1-9]`)
			if !re.MatchString(page) {
				return false, nil
			}
		}
		for _, never := range []string{"pending", "not-ready"} {
			if strings.Contains(page, `namespace="`+ns+`",pod="`+never+`"`) {
				return false, fmt.Errorf("the adapter has series for %s, which must never be contacted", never)
			}
		}
		return true, nil
	})
	if err != nil {
		page, _ := a.metrics(ctx)
		var lines []string
		for _, l := range strings.Split(page, "\n") {
			if strings.Contains(l, ns) {
				lines = append(lines, l)
			}
		}
		t.Fatalf("%v\n%s", err, strings.Join(lines, "\n"))
	}

	// The API answers at once (well within two scrape timeouts) with the
	// healthy pod, every time, while the others keep failing.
	path := "/apis/custom.metrics.k8s.io/v1beta2/namespaces/" + ns + "/pods/*/requests_waiting?labelSelector=app%3Dmix"
	var slowest time.Duration
	for range 10 {
		start := time.Now()
		got, _, err := metricValues(ctx, path)
		took := time.Since(start)
		slowest = max(slowest, took)
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(map[string]string{healthyPod.Name: "0"}, got); diff != "" {
			t.Errorf("pods (-want +got):\n%s", diff)
		}
		time.Sleep(200 * time.Millisecond) // spread the queries over the failing pods' retries
	}
	if slowest > 2*scrapeTimeout {
		t.Errorf("the slowest answer took %s, more than two scrape timeouts (%s)", slowest, 2*scrapeTimeout)
	}
	t.Logf("slowest of 10 answers beside the broken pods: %s", slowest.Round(time.Millisecond))

	// The HPA scales on the Deployment's total of waiting requests, which
	// the broken pods neither fail nor drag down.
	avg := resource.MustParse("2")
	h := hpaFor("mix", autoscalingv2.MetricSpec{Type: autoscalingv2.ObjectMetricSourceType, Object: &autoscalingv2.ObjectMetricSource{
		DescribedObject: autoscalingv2.CrossVersionObjectReference{APIVersion: "apps/v1", Kind: "Deployment", Name: "mix"},
		Metric:          autoscalingv2.MetricIdentifier{Name: "requests_waiting"},
		Target:          autoscalingv2.MetricTarget{Type: autoscalingv2.AverageValueMetricType, AverageValue: &avg},
	}})
	if _, err := c.Client.AutoscalingV2().HorizontalPodAutoscalers(ns).Create(ctx, h, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	scalingActive(ctx, t, ns, "mix")
	loadCtx, stopLoad := context.WithCancel(ctx)
	defer stopLoad()
	wg := load(loadCtx, t, healthyPod.Status.PodIP, "mix", 12)
	up := scaleTo(ctx, t, ns, "mix", 4, time.Minute)
	t.Logf("scaled 1 -> 4 replicas %s after the load started, beside the broken pods", up.Round(100*time.Millisecond))
	stopLoad()
	wg.Wait()
	down := scaleTo(ctx, t, ns, "mix", 1, time.Minute)
	t.Logf("scaled 4 -> 1 replica %s after the load stopped", down.Round(100*time.Millisecond))
}

// While kube-apiserver is away the adapter stays alive (its /livez and
// /healthz answer, so a kubelet would not restart it), and once the API
// server is back it serves fresh values again without a restart.
func TestAPIServerOutage(t *testing.T) {
	ctx, ns, a := setup(t, "outage", 3*time.Minute)
	c := testCluster
	m := cluster.ModelServer{Namespace: ns, Name: "llama", Model: "llama", Replicas: 1,
		Annotations: map[string]string{fleet.TTFTAnnotation: "10m"}}
	if err := c.Deploy(ctx, m); err != nil {
		t.Fatal(err)
	}
	pods, err := c.WaitForReadyPods(ctx, ns, "app=llama", 1, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	pod := pods[0]
	waitServing(ctx, t, pod.Status.PodIP)
	path := "/apis/custom.metrics.k8s.io/v1beta2/namespaces/" + ns + "/pods/*/requests_running?labelSelector=app%3Dllama"
	expect := func(what, want string) {
		t.Helper()
		var got map[string]string
		err := c.WaitFor(ctx, 30*time.Second, what, func(ctx context.Context) (bool, error) {
			got, _, _ = metricValues(ctx, path)
			return got[pod.Name] == want, nil
		})
		if err != nil {
			t.Fatalf("%v (last answer %v)", err, got)
		}
	}
	expect("the pod's value before the outage", "0")

	c.StopAPIServer()
	restarted := false
	defer func() {
		if !restarted {
			if err := c.StartAPIServer(context.Background()); err != nil {
				t.Errorf("restarting kube-apiserver: %v", err)
			}
		}
	}()
	outage := time.Now()
	for time.Since(outage) < 5*time.Second { // the length of the outage
		for _, probe := range []string{"/livez", "/healthz"} {
			resp, err := a.client.Get(a.url + probe)
			if err != nil {
				t.Fatalf("%s during the outage: %v", probe, err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Errorf("%s during the outage: %s", probe, resp.Status)
			}
		}
		if exited, err := a.proc.Exited(); exited {
			t.Fatalf("the adapter exited during the outage: %v", err)
		}
		time.Sleep(500 * time.Millisecond) // probing period
	}
	// Load the pod during the outage: the change must show once the API
	// server is back.
	loadCtx, stopLoad := context.WithCancel(ctx)
	defer stopLoad()
	load(loadCtx, t, pod.Status.PodIP, "llama", 2)
	if err := c.StartAPIServer(ctx); err != nil {
		t.Fatal(err)
	}
	restarted = true
	back := time.Now()
	expect("the value changed during the outage, after it", "2")
	t.Logf("fresh values through the API %s after kube-apiserver was back", time.Since(back).Round(100*time.Millisecond))
}
