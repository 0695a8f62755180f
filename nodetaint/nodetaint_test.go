package nodetaint

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

const key = "sidelane.io/agent-not-ready"

func node(tainted bool, other ...corev1.Taint) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1"}, Spec: corev1.NodeSpec{Taints: other}}
	if tainted {
		n.Spec.Taints = append(n.Spec.Taints, corev1.Taint{Key: key, Effect: corev1.TaintEffectNoSchedule})
	}
	return n
}

type podOpt func(*corev1.Pod)

func agentPod(name, nodeName string, opts ...podOpt) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "sidelane-system"},
		Spec:       corev1.PodSpec{NodeName: nodeName},
		Status: corev1.PodStatus{
			Phase:             corev1.PodRunning,
			Conditions:        []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}},
			ContainerStatuses: []corev1.ContainerStatus{{Name: "agent", Ready: true, State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{}}}},
		},
	}
	for _, o := range opts {
		o(p)
	}
	return p
}

// crashed: the container was SIGKILLed; kubelet reports it terminated and the pod not Ready.
func crashed(p *corev1.Pod) {
	p.Status.Conditions[0].Status = corev1.ConditionFalse
	p.Status.Conditions[0].Reason = "ContainersNotReady"
	p.Status.ContainerStatuses[0].Ready = false
	p.Status.ContainerStatuses[0].State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{Reason: "Error", ExitCode: 137}}
}

// restarting: the new container runs, its readiness probe has not passed yet.
func restarting(p *corev1.Pod) {
	p.Status.Conditions[0].Status = corev1.ConditionFalse
	p.Status.ContainerStatuses[0].Ready = false
	p.Status.ContainerStatuses[0].RestartCount = 1
}

func terminating(p *corev1.Pod) {
	now := metav1.Now()
	p.DeletionTimestamp = &now
}

func pending(p *corev1.Pod) {
	p.Status = corev1.PodStatus{Phase: corev1.PodPending}
}

func TestDecide(t *testing.T) {
	dedicated := corev1.Taint{Key: "example.com/dedicated", Value: "mesh", Effect: corev1.TaintEffectNoSchedule}
	otherEffect := corev1.Taint{Key: key, Effect: corev1.TaintEffectNoExecute}
	for _, tc := range []struct {
		name   string
		node   *corev1.Node
		pods   []*corev1.Pod
		want   Action
		reason string
	}{
		{"ready agent, untainted", node(false), []*corev1.Pod{agentPod("a", "n1")}, None, "is ready"},
		{"ready agent, tainted (registered with it, or re-tainted from a stale view)", node(true), []*corev1.Pod{agentPod("a", "n1")}, Remove, "is ready"},
		{"crashed agent (SIGKILL)", node(false), []*corev1.Pod{agentPod("a", "n1", crashed)}, Add, "container agent terminated (Error, exit 137)"},
		{"restarted agent not ready yet", node(false), []*corev1.Pod{agentPod("a", "n1", restarting)}, Add, "running, not ready (restarts 1)"},
		{"crashed agent, already tainted", node(true), []*corev1.Pod{agentPod("a", "n1", crashed)}, None, "terminated"},
		{"terminating agent (graceful stop or uninstall): left to the agent", node(false), []*corev1.Pod{agentPod("a", "n1", terminating)}, None, "is terminating"},
		{"terminating agent, tainted: left alone", node(true), []*corev1.Pod{agentPod("a", "n1", terminating, crashed)}, None, "is terminating"},
		{"pending agent (new node, after a reboot)", node(false), []*corev1.Pod{agentPod("a", "n1", pending)}, Add, "is pending"},
		{"no agent pod on the node: not sidelane's", node(false), nil, None, "no agent pod"},
		{"no agent pod on the node, tainted: left alone", node(true), []*corev1.Pod{agentPod("a", "n2", crashed)}, None, "no agent pod"},
		{"another node's crashed agent does not count", node(false), []*corev1.Pod{agentPod("a", "n1"), agentPod("b", "n2", crashed)}, None, "is ready"},
		{"rolling: old one terminating, new one ready", node(true), []*corev1.Pod{agentPod("old", "n1", terminating), agentPod("new", "n1")}, Remove, "new is ready"},
		{"rolling: old one terminating, new one pending", node(false), []*corev1.Pod{agentPod("old", "n1", terminating), agentPod("new", "n1", pending)}, Add, "agent pod sidelane-system/new is pending"},
		{"same key with another effect is not ours", node(false, otherEffect, dedicated), []*corev1.Pod{agentPod("a", "n1", crashed)}, Add, "terminated"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, reason := Decide(tc.node, tc.pods, key, corev1.TaintEffectNoSchedule)
			if got != tc.want {
				t.Errorf("Decide = %v (%s), want %v", got, reason, tc.want)
			}
			if !contains(reason, tc.reason) {
				t.Errorf("reason %q does not say %q", reason, tc.reason)
			}
		})
	}
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }
