package cluster

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

// warmUpPodIPs has kwok hand out one pod IP, through a throwaway node and
// pod, before any test creates pods.
//
// kwok v0.8.0 creates its pod-IP pool lazily with a Load and a separate
// Store (PodController.ipPool). When the first pods of a cluster start on
// several of its workers at once, two pools can be created, and pods from
// both get the same addresses: two simulated servers then fight over one IP
// ("bind: address already in use") and a test waits for an endpoint that
// never comes. Creating the pool with one pod, alone, avoids the race; the
// pool lives as long as kwok does.
func (c *Cluster) warmUpPodIPs(ctx context.Context) error {
	const name = "capstan-pod-ip-warm-up"
	if err := c.CreateNodes(ctx, Node{Name: name}); err != nil {
		return err
	}
	pods := c.Client.CoreV1().Pods(metav1.NamespaceDefault)
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PodSpec{
			NodeName:   name,
			Containers: []corev1.Container{{Name: "warm-up", Image: "warm-up"}},
		},
	}
	if _, err := pods.Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating the pod-IP warm-up pod: %w", err)
	}
	err := c.WaitFor(ctx, 30*time.Second, "kwok to give the warm-up pod an IP", func(ctx context.Context) (bool, error) {
		p, err := pods.Get(ctx, name, metav1.GetOptions{})
		return err == nil && p.Status.PodIP != "", err
	})
	if err != nil {
		return err
	}
	// Tests count the cluster's nodes and pods; leave none behind.
	now := metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}
	if err := pods.Delete(ctx, name, now); err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	if err := c.Client.CoreV1().Nodes().Delete(ctx, name, now); err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	return c.WaitFor(ctx, 30*time.Second, "the warm-up pod and node to be gone", func(ctx context.Context) (bool, error) {
		_, podErr := pods.Get(ctx, name, metav1.GetOptions{})
		_, nodeErr := c.Client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		for _, err := range []error{podErr, nodeErr} {
			if !apierrors.IsNotFound(err) {
				return false, err // nil while it still exists
			}
		}
		return true, nil
	})
}
