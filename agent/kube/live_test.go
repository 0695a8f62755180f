package kube_test

import (
	"context"
	"reflect"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/sidelane/sidelane/agent"
	"github.com/sidelane/sidelane/agent/kube"
)

// hasEvent reports whether the pod has an Event with reason whose message
// contains every one of parts.
func hasEvent(t *testing.T, cs kubernetes.Interface, ns, pod, reason string, parts ...string) bool {
	t.Helper()
	evs, err := cs.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{FieldSelector: "involvedObject.name=" + pod})
	if err != nil {
		t.Fatal(err)
	}
	return slices.ContainsFunc(evs.Items, func(e corev1.Event) bool {
		if e.Reason != reason {
			return false
		}
		for _, p := range parts {
			if !strings.Contains(e.Message, p) {
				return false
			}
		}
		return true
	})
}

// TestRunningPodPatches is finding 7 of the security review on a real API
// server: patching a running pod's annotations or labels (anyone with
// pods/patch can) must not turn its capture off or change it, while the
// namespace's istio.io/dataplane-mode label still moves pods live. Each
// patch is followed by waiting for the controller's SidelaneRestartRequired
// Event about it, so the mode checked afterwards is the one the controller
// chose for the patched pod.
func TestRunningPodPatches(t *testing.T) {
	ctx := context.Background()
	cs, err := kubernetes.NewForConfig(cluster.RESTConfig)
	if err != nil {
		t.Fatal(err)
	}
	const node, ns = "node-patches", "patches"
	if _, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{"istio-injection": "enabled"}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	sidecar := createPod(t, cs, loadFixture(t, "sidecar-classic"), ns, "web-sidecar", node)
	plain := createPod(t, cs, loadFixture(t, "plain"), ns, "web-plain", node)
	stateDir := t.TempDir()
	ra := startAgent(t, cs, node, stateDir)
	for _, c := range []struct {
		pod       *corev1.Pod
		cid, mode string
	}{{sidecar, "c-sidecar", agent.ModeSidecar}, {plain, "c-plain", agent.ModeNone}} {
		if rep, err := add(ra, c.pod, c.cid); err != nil || !rep.OK || rep.Mode != c.mode {
			t.Fatalf("ADD %s: %v %+v, want mode %s", c.pod.Name, err, rep, c.mode)
		}
	}
	capture := entryOf(ra, "c-sidecar").Capture

	setLabels(t, cs, "namespace", "", ns, `{"metadata":{"labels":{"istio.io/dataplane-mode":"ambient"}}}`)
	eventually(t, "plain pod moved to node mode by the namespace label", func() bool { return modeOf(ra, "c-plain") == agent.ModeNode })

	patches := []struct {
		name, pod, cid, patch string
		event                 []string // parts of the Event saying the change needs a restart
		mode                  string
	}{
		{"remove the sidecar status", "web-sidecar", "c-sidecar", `{"metadata":{"annotations":{"sidecar.istio.io/status":null}}}`,
			[]string{"would get node mode"}, agent.ModeSidecar},
		{"label inject=false", "web-sidecar", "c-sidecar", `{"metadata":{"labels":{"sidecar.istio.io/inject":"false"}}}`,
			[]string{"would get none mode", "sidecar.istio.io/inject=false"}, agent.ModeSidecar},
		{"change a capture annotation", "web-sidecar", "c-sidecar", `{"metadata":{"annotations":{"traffic.sidecar.istio.io/excludeOutboundPorts":"9999"}}}`,
			[]string{"capture annotations", "restart the pod"}, agent.ModeSidecar},
		{"add a sidecar status to a node pod", "web-plain", "c-plain", `{"metadata":{"annotations":{"sidecar.istio.io/status":"{}"}}}`,
			[]string{"would get none mode", "sidecar.istio.io/status"}, agent.ModeNode},
		{"give a node pod the agent's label", "web-plain", "c-plain", `{"metadata":{"labels":{"app.kubernetes.io/name":"sidelane"}}}`,
			[]string{"would get none mode", "agent pod"}, agent.ModeNode},
	}
	for _, p := range patches {
		setLabels(t, cs, "pod", ns, p.pod, p.patch)
		eventually(t, "restart-required Event after: "+p.name, func() bool {
			return hasEvent(t, cs, ns, p.pod, kube.EventRestartRequired, p.event...)
		})
		if m := modeOf(ra, p.cid); m != p.mode {
			t.Errorf("%s: %s moved to %q mode, want %s", p.name, p.pod, m, p.mode)
		}
	}
	if got := entryOf(ra, "c-sidecar").Capture; !reflect.DeepEqual(got, capture) {
		t.Errorf("capture settings of the running sidecar pod changed: %+v, want the creation-time %+v", got, capture)
	}
	for _, pod := range []string{"web-sidecar", "web-plain"} {
		if hasEvent(t, cs, ns, pod, kube.EventModeChanged, "to none") {
			t.Errorf("%s: a pod patch moved it to none", pod)
		}
	}

	// The namespace label still moves the node pod, both ways, and never
	// the sidecar pod (whose patched labels now look like a plain pod's).
	setLabels(t, cs, "namespace", "", ns, `{"metadata":{"labels":{"istio.io/dataplane-mode":null}}}`)
	eventually(t, "plain pod back to none when the namespace label goes", func() bool { return modeOf(ra, "c-plain") == agent.ModeNone })
	setLabels(t, cs, "namespace", "", ns, `{"metadata":{"labels":{"istio.io/dataplane-mode":"ambient"}}}`)
	eventually(t, "plain pod in node mode again", func() bool { return modeOf(ra, "c-plain") == agent.ModeNode })
	if m := modeOf(ra, "c-sidecar"); m != agent.ModeSidecar {
		t.Errorf("sidecar pod in %q mode after the namespace toggles", m)
	}

	// A restart reconciles from the recorded creation-time rule, not from
	// the patched pod.
	ra.stop()
	ra = startAgent(t, cs, node, stateDir)
	if m := modeOf(ra, "c-sidecar"); m != agent.ModeSidecar {
		t.Errorf("after restart the patched sidecar pod is in %q mode", m)
	}
	if m := modeOf(ra, "c-plain"); m != agent.ModeNode {
		t.Errorf("after restart the patched node pod is in %q mode", m)
	}
	if got := entryOf(ra, "c-sidecar").Capture; !reflect.DeepEqual(got, capture) {
		t.Errorf("after restart the capture settings changed: %+v", got)
	}
}
