package cluster

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
)

// Node describes a kwok node to create.
type Node struct {
	Name   string
	Labels map[string]string
	// Allocatable overrides or adds to the default (32 cpu, 256Gi memory,
	// 110 pods); capacity is set to the same values.
	Allocatable corev1.ResourceList
	Taints      []corev1.Taint
}

// CreateNodes creates the nodes and waits until each can take pods: kwok has
// marked it Ready and the node lifecycle controller has lifted the not-ready
// taint every new node starts with. Until then the scheduler passes it over,
// and pods created at once would all land on the nodes that were quicker.
func (c *Cluster) CreateNodes(ctx context.Context, nodes ...Node) error {
	for _, n := range nodes {
		if _, err := c.Client.CoreV1().Nodes().Create(ctx, kwokNode(n), metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("creating node %s: %w", n.Name, err)
		}
	}
	for _, n := range nodes {
		err := c.WaitFor(ctx, 30*time.Second, "node "+n.Name+" to be Ready without the not-ready taint", func(ctx context.Context) (bool, error) {
			node, err := c.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			return NodeReady(node) && !slices.ContainsFunc(node.Spec.Taints, func(t corev1.Taint) bool {
				return t.Key == corev1.TaintNodeNotReady
			}), nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

func kwokNode(n Node) *corev1.Node {
	alloc := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("32"),
		corev1.ResourceMemory: resource.MustParse("256Gi"),
		corev1.ResourcePods:   resource.MustParse("110"),
	}
	maps.Copy(alloc, n.Allocatable)
	labels := map[string]string{"kubernetes.io/hostname": n.Name, "type": "kwok"}
	maps.Copy(labels, n.Labels)
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name:   n.Name,
			Labels: labels,
			// kwok manages every node in this cluster; the annotation also
			// tells a person reading the object that it is fake.
			Annotations: map[string]string{"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
		},
		Spec:   corev1.NodeSpec{Taints: n.Taints},
		Status: corev1.NodeStatus{Allocatable: alloc, Capacity: alloc.DeepCopy()},
	}
}

// NodeReady reports whether the node's Ready condition is True.
func NodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// WaitFor polls cond every 50 ms until it returns true or timeout passes. An
// error from cond is treated as "not yet" (API calls fail transiently); the
// timeout error says what was awaited and the last error cond returned.
func (c *Cluster) WaitFor(ctx context.Context, timeout time.Duration, what string, cond func(context.Context) (bool, error)) error {
	return WaitFor(ctx, timeout, what, cond)
}

// WaitFor is Cluster.WaitFor for conditions that need no cluster.
func WaitFor(ctx context.Context, timeout time.Duration, what string, cond func(context.Context) (bool, error)) error {
	var last error
	err := wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		ok, err := cond(ctx)
		if err != nil {
			// Keep polling through transient errors; report the last one.
			last = err
			return false, nil
		}
		return ok, nil
	})
	if err != nil {
		if last != nil {
			return fmt.Errorf("timed out after %s waiting for %s (last error: %w)", timeout, what, last)
		}
		return fmt.Errorf("timed out after %s waiting for %s", timeout, what)
	}
	return nil
}
