package charttest

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/sidelane/sidelane/cni"
	"github.com/sidelane/sidelane/internal/kubeharness"
)

const agentTaint = "sidelane.io/agent-not-ready"

// TestAgentNodePatchesLimited: RBAC gives the agent "patch nodes" on every
// node; the chart's ValidatingAdmissionPolicy narrows it to the node in the
// agent's pod-bound token and to sidelane's taint. Checked with the real
// API server and the agent's real token (bound to a pod on node-a).
func TestAgentNodePatchesLimited(t *testing.T) {
	c := kubeharness.Start(t)
	admin := installRBAC(t, c)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	adminKube := kubernetes.NewForConfigOrDie(c.RESTConfig)
	for _, n := range []string{"node-a", "node-b"} {
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n, Labels: map[string]string{"role": "worker"}},
			Spec: corev1.NodeSpec{Taints: []corev1.Taint{{Key: "example.com/dedicated", Value: "mesh", Effect: corev1.TaintEffectNoSchedule}}}}
		if _, err := adminKube.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := adminKube.CoreV1().Pods(namespace).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "agent-a", Namespace: namespace},
		Spec:       corev1.PodSpec{NodeName: "node-a", ServiceAccountName: release, Containers: []corev1.Container{{Name: "agent", Image: "agent"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	client := func(sa string, tokenArgs ...string) kubernetes.Interface {
		t.Helper()
		token := strings.TrimSpace(admin.must(append([]string{"create", "token", sa, "-n", namespace}, tokenArgs...)...))
		ca := c.RESTConfig.CAData
		if len(ca) == 0 && c.RESTConfig.CAFile != "" {
			var err error
			if ca, err = os.ReadFile(c.RESTConfig.CAFile); err != nil {
				t.Fatal(err)
			}
		}
		kc, err := cni.Kubeconfig(c.Server, ca, []byte(token))
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(t.TempDir(), "kubeconfig")
		if err := os.WriteFile(path, kc, 0o600); err != nil {
			t.Fatal(err)
		}
		rc, err := clientcmd.BuildConfigFromFlags("", path)
		if err != nil {
			t.Fatal(err)
		}
		return kubernetes.NewForConfigOrDie(rc)
	}
	agent := client(release, "--bound-object-kind", "Pod", "--bound-object-name", "agent-a")
	unbound := client(release)
	// The controller re-taints any node whose agent is not Ready: no node
	// in its token, only the taint.
	ctrl := client(release + "-controller")

	// The agent's own taint code sends a merge patch of the whole taint
	// list; these build the same kind of patch.
	taints := func(node string, add ...corev1.Taint) []corev1.Taint {
		n, err := adminKube.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return append(n.Spec.Taints, add...)
	}
	ours := corev1.Taint{Key: agentTaint, Effect: corev1.TaintEffectNoSchedule}
	patch := func(k kubernetes.Interface, node string, body map[string]any) error {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		_, err = k.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, b, metav1.PatchOptions{})
		return err
	}
	spec := func(ts []corev1.Taint) map[string]any { return map[string]any{"spec": map[string]any{"taints": ts}} }

	// Admission policies take effect a moment after they are created:
	// wait until one request the policy must deny is denied.
	eventually(t, "the admission policy is in effect", func() string {
		err := patch(unbound, "node-b", map[string]any{"metadata": map[string]any{"labels": map[string]any{"probe": "x"}}})
		if err == nil || !strings.Contains(err.Error(), "sidelane agent may change only") {
			return fmt.Sprintf("label patch with an unbound token: %v", err)
		}
		return ""
	})

	tests := []struct {
		name    string
		k       kubernetes.Interface
		node    string
		body    map[string]any
		allowed bool
	}{
		{"add our taint to its own node", agent, "node-a", spec(taints("node-a", ours)), true},
		{"remove our taint from its own node", agent, "node-a", spec(taints("node-a")), true},
		{"our taint on another node", agent, "node-b", spec(taints("node-b", ours)), false},
		{"another taint on its own node", agent, "node-a", spec(taints("node-a", corev1.Taint{Key: "evil", Effect: corev1.TaintEffectNoExecute})), false},
		{"drop a foreign taint from its own node", agent, "node-a", spec(nil), false},
		{"label its own node", agent, "node-a", map[string]any{"metadata": map[string]any{"labels": map[string]any{"secure": "true"}}}, false},
		{"cordon its own node", agent, "node-a", map[string]any{"spec": map[string]any{"unschedulable": true}}, false},
		{"a token bound to no pod", unbound, "node-a", spec(taints("node-a", ours)), false},
		{"controller: our taint on any node", ctrl, "node-b", spec(taints("node-b", ours)), true},
		{"controller: remove our taint", ctrl, "node-b", spec(taints("node-b")), true},
		{"controller: another taint", ctrl, "node-b", spec(taints("node-b", corev1.Taint{Key: "evil", Effect: corev1.TaintEffectNoExecute})), false},
		{"controller: drop a foreign taint", ctrl, "node-b", spec(nil), false},
		{"controller: label a node", ctrl, "node-b", map[string]any{"metadata": map[string]any{"labels": map[string]any{"secure": "true"}}}, false},
		{"controller: cordon a node", ctrl, "node-b", map[string]any{"spec": map[string]any{"unschedulable": true}}, false},
	}
	for _, tc := range tests {
		err := patch(tc.k, tc.node, tc.body)
		if got := err == nil; got != tc.allowed {
			t.Errorf("%s: allowed %v (%v), want %v", tc.name, got, err, tc.allowed)
		} else if err != nil && !strings.Contains(err.Error(), "may change only") {
			t.Errorf("%s: denied, but not by sidelane's policy: %v", tc.name, err)
		}
	}
}
