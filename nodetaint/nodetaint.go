// Package nodetaint keeps the sidelane.io/agent-not-ready taint on every
// node whose sidelane agent pod exists but is not Ready, and off once it
// is. It runs in `sidelane controller` (a Deployment), because the one
// case the agent cannot cover itself is its own crash: a SIGKILLed or
// OOM-killed agent, or a node whose kubelet restarted its pods, never runs
// the agent's graceful shutdown that re-adds the taint.
//
// The decision is level-based (Decide): from the node and the agent pods
// bound to it, never from the event that triggered it, so a stale or
// missed event is repaired by the next one or by the periodic resync.
// Istio's former taint controller (istio/istio cni/pkg/taint) worked the
// same way: it watched nodes and the "critical" DaemonSet pods, tainted a
// node when one of them was not Ready and untainted it once all were.
// Unlike that one, a node with no agent pod at all is left alone (a node
// the DaemonSet does not select is not sidelane's), and so is one whose
// agent pod is terminating: a graceful stop taints the node itself, and
// `helm uninstall` deletes the DaemonSet, after which a taint would keep
// every pod off the node.
package nodetaint

import (
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// Action is what Decide wants done to a node's taint.
type Action int

// Decide's answers.
const (
	None   Action = iota
	Add           // an agent pod on the node is not Ready and the taint is missing
	Remove        // an agent pod on the node is Ready and the taint is there
)

func (a Action) String() string {
	switch a {
	case Add:
		return "added"
	case Remove:
		return "removed"
	}
	return "none"
}

// Decide says what the taint (key, effect) on node should become, given
// the agent pods bound to it (others are ignored), and why.
func Decide(node *corev1.Node, agents []*corev1.Pod, key string, effect corev1.TaintEffect) (Action, string) {
	var bound []*corev1.Pod
	terminating := 0
	for _, p := range agents {
		if p.Spec.NodeName != node.Name {
			continue
		}
		// A terminating agent is stopping gracefully and taints the node
		// itself (or is being uninstalled with its DaemonSet: then a taint
		// would keep every pod off a node that is leaving sidelane).
		if p.DeletionTimestamp != nil {
			terminating++
			continue
		}
		bound = append(bound, p)
	}
	if len(bound) == 0 {
		if terminating > 0 {
			return None, "the agent pod is terminating (its graceful stop taints the node)"
		}
		return None, "no agent pod on the node"
	}
	has := slices.ContainsFunc(node.Spec.Taints, func(t corev1.Taint) bool { return t.Key == key && t.Effect == effect })
	var why []string
	for _, p := range bound {
		ok, reason := PodReady(p)
		if ok {
			if has {
				return Remove, fmt.Sprintf("agent pod %s/%s is ready", p.Namespace, p.Name)
			}
			return None, fmt.Sprintf("agent pod %s/%s is ready", p.Namespace, p.Name)
		}
		why = append(why, fmt.Sprintf("agent pod %s/%s %s", p.Namespace, p.Name, reason))
	}
	reason := strings.Join(why, "; ")
	if has {
		return None, reason
	}
	return Add, reason
}

// PodReady is the pod's Ready condition, and when false why, in words.
// The agent waits for it on its own pod before it removes the taint
// itself (kube.Config.Self), so both writers of the taint apply one test.
func PodReady(p *corev1.Pod) (bool, string) {
	if p.Status.Phase != corev1.PodRunning {
		return false, "is " + strings.ToLower(string(p.Status.Phase))
	}
	for _, c := range p.Status.Conditions {
		if c.Type != corev1.PodReady {
			continue
		}
		if c.Status == corev1.ConditionTrue {
			return true, ""
		}
		for _, cs := range p.Status.ContainerStatuses {
			switch {
			case cs.State.Terminated != nil:
				return false, fmt.Sprintf("is not ready: container %s terminated (%s, exit %d)", cs.Name, cs.State.Terminated.Reason, cs.State.Terminated.ExitCode)
			case cs.State.Waiting != nil:
				return false, fmt.Sprintf("is not ready: container %s waiting (%s)", cs.Name, cs.State.Waiting.Reason)
			case !cs.Ready:
				return false, fmt.Sprintf("is not ready: container %s running, not ready (restarts %d)", cs.Name, cs.RestartCount)
			}
		}
		return false, "is not ready: " + c.Reason
	}
	return false, "has no Ready condition"
}
