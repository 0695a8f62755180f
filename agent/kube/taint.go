package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"

	"github.com/sidelane/sidelane/nodetaint"
)

// OnReady is the agent's ready hook: it removes the not-ready taint, at
// once or, with Config.Self, once the agent's own pod is Ready (in the
// background: it returns at once).
func (c *Controller) OnReady(ctx context.Context) {
	if !c.cfg.ManageTaint {
		return
	}
	if c.cfg.Self.Name == "" {
		c.untaint(ctx)
		return
	}
	go c.untaintWhenReady(ctx)
}

// untaintWhenReady waits, on the pod cache, for the agent's own pod to be
// Ready, then removes the taint; it gives up when ctx ends (the agent
// stops, and its Shutdown re-adds the taint anyway).
func (c *Controller) untaintWhenReady(ctx context.Context) {
	var last string
	for {
		changed := c.changes()
		ready, why := c.selfReady()
		if ctx.Err() != nil {
			return
		}
		if ready {
			c.untaint(ctx)
			return
		}
		if why != last {
			c.log.Info("agent ready; the node taint stays until this pod is Ready", "node", c.cfg.NodeName, "pod", c.cfg.Self.String(), "pod_state", why)
			last = why
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
	}
}

// selfReady is nodetaint.PodReady of the agent's own pod in the cache.
func (c *Controller) selfReady() (bool, string) {
	pod, err := c.pods.Pods(c.cfg.Self.Namespace).Get(c.cfg.Self.Name)
	if apierrors.IsNotFound(err) {
		return false, "not in the agent's pod cache (is --pod-name this node's agent pod?)"
	}
	if err != nil {
		return false, err.Error()
	}
	return nodetaint.PodReady(pod)
}

func (c *Controller) untaint(ctx context.Context) {
	if err := c.setTaint(ctx, false); err != nil {
		c.cfg.Metrics.Error("taint")
		c.log.Error("remove node taint", "node", c.cfg.NodeName, "taint", TaintKey, "error", err)
	}
}

// Shutdown re-adds the not-ready taint on a graceful stop, so no pod is
// scheduled onto the node while its agent is away. It uses its own bounded
// context: the agent's is already cancelled by then.
func (c *Controller) Shutdown() {
	if !c.cfg.ManageTaint {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if gone, why := c.uninstalling(ctx); gone {
		c.log.Info("agent DaemonSet is being removed: node taint left off", "node", c.cfg.NodeName, "daemonset", c.cfg.DaemonSet.String(), "reason", why)
		return
	}
	if err := c.setTaint(ctx, true); err != nil {
		c.log.Error("re-add node taint", "node", c.cfg.NodeName, "taint", TaintKey, "error", err)
	}
}

// uninstalling says whether the agent's DaemonSet is gone or being deleted
// (or no longer readable: helm removes the agent's RBAC with it). A
// rollout or a restarted pod keeps the DaemonSet, and its RBAC.
func (c *Controller) uninstalling(ctx context.Context) (bool, string) {
	ds := c.cfg.DaemonSet
	if ds.Name == "" {
		return false, ""
	}
	obj, err := c.cfg.Client.AppsV1().DaemonSets(ds.Namespace).Get(ctx, ds.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return true, "not found"
	case apierrors.IsForbidden(err), apierrors.IsUnauthorized(err):
		return true, "no longer readable"
	case err != nil:
		return false, "" // unknown: keep the node closed
	case obj.DeletionTimestamp != nil:
		return true, "being deleted"
	}
	return false, ""
}

// setTaint adds or removes TaintKey. A missing node is logged, not fatal:
// the agent may run before the kubelet registers the node.
func (c *Controller) setTaint(ctx context.Context, present bool) error {
	nodes := c.cfg.Client.CoreV1().Nodes()
	changed := false
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		node, err := nodes.Get(ctx, c.cfg.NodeName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		has := slices.ContainsFunc(node.Spec.Taints, isOurTaint)
		if has == present {
			return nil
		}
		taints := slices.Clone(node.Spec.Taints)
		if present {
			taints = append(taints, corev1.Taint{Key: TaintKey, Effect: TaintEffect})
		} else {
			taints = slices.DeleteFunc(taints, isOurTaint)
		}
		// A merge patch replaces the whole taint list; carrying the
		// resourceVersion makes it fail with a conflict (and retry) if the
		// node changed since we read it, so no other taint is lost. Patch,
		// not update: the agent's RBAC grants only get and patch on nodes.
		patch, err := json.Marshal(map[string]any{
			"metadata": map[string]any{"resourceVersion": node.ResourceVersion},
			"spec":     map[string]any{"taints": taints},
		})
		if err != nil {
			return err
		}
		_, err = nodes.Patch(ctx, c.cfg.NodeName, types.MergePatchType, patch, metav1.PatchOptions{})
		changed = err == nil
		return err
	})
	if apierrors.IsNotFound(err) {
		c.log.Warn("node not found; taint left alone", "node", c.cfg.NodeName)
		return nil
	}
	if err != nil {
		return fmt.Errorf("update node %s: %w", c.cfg.NodeName, err)
	}
	if changed {
		c.log.Info("node taint updated", "node", c.cfg.NodeName, "taint", TaintKey, "present", present)
	}
	return nil
}

func isOurTaint(t corev1.Taint) bool { return t.Key == TaintKey && t.Effect == TaintEffect }
