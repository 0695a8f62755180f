package kube_test

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes"

	"github.com/sidelane/sidelane/agent"
	"github.com/sidelane/sidelane/agent/cnirpc"
	"github.com/sidelane/sidelane/agent/kube"
	"github.com/sidelane/sidelane/agent/metrics"
	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/internal/kubeharness"
	"github.com/sidelane/sidelane/istio/classify"
)

var cluster *kubeharness.Cluster

func TestMain(m *testing.M) { os.Exit(kubeharness.Main(m, &cluster)) }

// runningAgent is an in-process agent with the Kubernetes controller, the
// way cmd/sidelane wires them, on a no-op datapath.
type runningAgent struct {
	agent  *agent.Agent
	ctrl   *kube.Controller
	client cnirpc.Client
	stop   func()
}

func startAgent(t *testing.T, cs kubernetes.Interface, node, stateDir string) *runningAgent {
	t.Helper()
	return startAgentAs(t, cs, node, stateDir, types.NamespacedName{})
}

// startAgentAs is startAgent with kube.Config.Self (the agent's own pod).
func startAgentAs(t *testing.T, cs kubernetes.Interface, node, stateDir string, self types.NamespacedName) *runningAgent {
	t.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	ctrl, err := kube.New(kube.Config{Client: cs, NodeName: node, Classify: classify.DefaultConfig(), Log: log, ManageTaint: true, Capture: kube.IstioCapture, Self: self})
	if err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(stateDir, "cni.sock")
	a, err := agent.New(agent.Config{
		Socket: socket, StateDir: stateDir, Log: log, Classifier: ctrl,
		Metrics: metrics.New(nil), Startup: ctrl.Start, OnReady: ctrl.OnReady,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctrl.SetTarget(a)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	ra := &runningAgent{agent: a, ctrl: ctrl, client: cnirpc.Client{Socket: socket, Timeout: 10 * time.Second}}
	stopped := false
	ra.stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent run: %v", err)
		}
		ctrl.Shutdown()
	}
	t.Cleanup(ra.stop)
	eventually(t, "agent ready", func() bool { ok, _ := a.Ready(); return ok })
	return ra
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func loadFixture(t *testing.T, name string) *corev1.Pod {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "istio", "classify", "testdata", "pods", name+".yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var pod corev1.Pod
	if err := yaml.NewYAMLOrJSONDecoder(bytes.NewReader(b), 4096).Decode(&pod); err != nil {
		t.Fatal(err)
	}
	return &pod
}

func createPod(t *testing.T, cs kubernetes.Interface, pod *corev1.Pod, ns, name, node string) *corev1.Pod {
	t.Helper()
	pod = pod.DeepCopy()
	pod.Namespace, pod.Name, pod.Spec.NodeName = ns, name, node
	pod.ResourceVersion = ""
	// The ServiceAccount admission plugin is off in the harness; the
	// injected token volume needs the name it would have filled in.
	if pod.Spec.ServiceAccountName == "" {
		pod.Spec.ServiceAccountName = "default"
	}
	out, err := cs.CoreV1().Pods(ns).Create(context.Background(), pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create pod %s/%s: %v", ns, name, err)
	}
	return out
}

func add(ra *runningAgent, pod *corev1.Pod, cid string) (*cnirpc.Reply, error) {
	return ra.client.Do(context.Background(), cnirpc.Request{
		Op: cnirpc.OpAdd, Network: "k8s-pod-network",
		Attachment: cnirpc.Attachment{ContainerID: cid, IfName: "eth0"},
		Netns:      "/var/run/netns/" + cid,
		Pod:        cnirpc.PodRef{Namespace: pod.Namespace, Name: pod.Name, UID: string(pod.UID)},
	})
}

func modeOf(ra *runningAgent, cid string) string {
	for _, e := range ra.agent.Store().List() {
		if e.ContainerID == cid {
			return e.Mode
		}
	}
	return ""
}

func entryOf(ra *runningAgent, cid string) store.Entry {
	for _, e := range ra.agent.Store().List() {
		if e.ContainerID == cid {
			return e
		}
	}
	return store.Entry{}
}

func hasTaint(t *testing.T, cs kubernetes.Interface, node string) bool {
	n, err := cs.CoreV1().Nodes().Get(context.Background(), node, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return slices.ContainsFunc(n.Spec.Taints, func(tn corev1.Taint) bool { return tn.Key == kube.TaintKey })
}

func setLabels(t *testing.T, cs kubernetes.Interface, kind, ns, name, patch string) {
	t.Helper()
	ctx := context.Background()
	var err error
	if kind == "namespace" {
		_, err = cs.CoreV1().Namespaces().Patch(ctx, name, types.MergePatchType, []byte(patch), metav1.PatchOptions{})
	} else {
		_, err = cs.CoreV1().Pods(ns).Patch(ctx, name, types.MergePatchType, []byte(patch), metav1.PatchOptions{})
	}
	if err != nil {
		t.Fatalf("patch %s %s: %v", kind, name, err)
	}
}

func TestControllerLifecycle(t *testing.T) {
	ctx := context.Background()
	cs, err := kubernetes.NewForConfig(cluster.RESTConfig)
	if err != nil {
		t.Fatal(err)
	}
	const node = "node-lifecycle"
	if _, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: node},
		Spec:       corev1.NodeSpec{Taints: []corev1.Taint{{Key: kube.TaintKey, Effect: kube.TaintEffect}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	sidecar := createPod(t, cs, loadFixture(t, "sidecar-classic"), "shop", "web-sidecar", node)
	plain := createPod(t, cs, loadFixture(t, "plain"), "shop", "web-plain", node)
	// A pod on another node is not in this agent's cache.
	other := createPod(t, cs, loadFixture(t, "plain"), "shop", "web-elsewhere", "node-other")

	stateDir := t.TempDir()
	ra := startAgent(t, cs, node, stateDir)
	eventually(t, "taint removed once ready", func() bool { return !hasTaint(t, cs, node) })

	for _, c := range []struct {
		pod  *corev1.Pod
		cid  string
		mode string
	}{{sidecar, "c-sidecar", agent.ModeSidecar}, {plain, "c-plain", agent.ModeNone}} {
		rep, err := add(ra, c.pod, c.cid)
		if err != nil || !rep.OK {
			t.Fatalf("ADD %s: %v %+v", c.pod.Name, err, rep)
		}
		if rep.Mode != c.mode {
			t.Errorf("ADD %s: mode %q, want %q", c.pod.Name, rep.Mode, c.mode)
		}
	}

	if e := entryOf(ra, "c-sidecar"); e.Capture == nil || e.Capture.OutboundPort != 15001 || !e.Capture.InboundAllPorts {
		t.Errorf("sidecar pod capture settings %+v, want Istio's defaults", e.Capture)
	}

	// A capture annotation Istio rejects fails ADD, naming it.
	bad := loadFixture(t, "sidecar-classic")
	bad.Annotations["traffic.sidecar.istio.io/excludeOutboundPorts"] = "http"
	bad = createPod(t, cs, bad, "shop", "web-bad", node)
	if rep, err := add(ra, bad, "c-bad"); err != nil || rep.OK || !strings.Contains(rep.Error, "excludeOutboundPorts") {
		t.Errorf("ADD with a bad capture annotation: %v %+v", err, rep)
	}

	// A pod not on this node is never seen: ADD fails with a retry.
	rep, err := add(ra, other, "c-other")
	if err != nil || rep.OK || !rep.Retry || !strings.Contains(rep.Error, "not in the agent's cache") {
		t.Fatalf("ADD of an unseen pod: %v %+v, want a retryable cache error", err, rep)
	}

	// ADD racing the pod's creation waits for the informer.
	result := make(chan *cnirpc.Reply, 1)
	late := loadFixture(t, "plain")
	late.Namespace, late.Name = "shop", "web-late"
	go func() {
		r, err := add(ra, late, "c-late")
		if err != nil {
			r = &cnirpc.Reply{Error: err.Error()}
		}
		result <- r
	}()
	time.Sleep(200 * time.Millisecond) // let the ADD start waiting
	createPod(t, cs, late, "shop", "web-late", node)
	if r := <-result; !r.OK || r.Mode != agent.ModeNone {
		t.Fatalf("ADD racing pod creation: %+v", r)
	}

	// Live toggle: the namespace goes ambient.
	setLabels(t, cs, "namespace", "", "shop", `{"metadata":{"labels":{"istio.io/dataplane-mode":"ambient"}}}`)
	eventually(t, "plain pod moved to node mode", func() bool { return modeOf(ra, "c-plain") == agent.ModeNode })
	if m := modeOf(ra, "c-sidecar"); m != agent.ModeSidecar {
		t.Errorf("sidecar pod moved to %q; a sidecar wins over the namespace label", m)
	}
	eventually(t, "mode change event on the pod", func() bool {
		evs, err := cs.CoreV1().Events("shop").List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=web-plain"})
		if err != nil {
			t.Fatal(err)
		}
		return slices.ContainsFunc(evs.Items, func(e corev1.Event) bool {
			return e.Reason == kube.EventModeChanged && strings.Contains(e.Message, "from none to node")
		})
	})
	// The pod opts out.
	setLabels(t, cs, "pod", "shop", "web-plain", `{"metadata":{"labels":{"istio.io/dataplane-mode":"none"}}}`)
	eventually(t, "plain pod opted out", func() bool { return modeOf(ra, "c-plain") == agent.ModeNone })

	// explain over the socket.
	rep, err = ra.client.Do(ctx, cnirpc.Request{Op: cnirpc.OpExplain, Pod: cnirpc.PodRef{Namespace: "shop", Name: "web-plain"}})
	if err != nil || !rep.OK || rep.Explain == nil || len(rep.Explain.Attachments) != 1 {
		t.Fatalf("explain: %v %+v", err, rep)
	}
	if a := rep.Explain.Attachments[0]; a.Mode != agent.ModeNone || !strings.Contains(a.Reason, "opts out") {
		t.Errorf("explain attachment = %+v", a)
	}

	// Graceful stop re-taints the node.
	ra.stop()
	if !hasTaint(t, cs, node) {
		t.Error("taint not re-added on shutdown")
	}

	// While the agent is down: a pod is deleted and the namespace flips.
	zero := int64(0) // no kubelet here to finish a graceful delete
	if err := cs.CoreV1().Pods("shop").Delete(ctx, "web-sidecar", metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	setLabels(t, cs, "pod", "shop", "web-plain", `{"metadata":{"labels":{"istio.io/dataplane-mode":null}}}`)
	ra = startAgent(t, cs, node, stateDir)
	if m := modeOf(ra, "c-sidecar"); m != "" {
		t.Errorf("attachment of a pod deleted while down still there (mode %q)", m)
	}
	if m := modeOf(ra, "c-plain"); m != agent.ModeNode {
		t.Errorf("after restart plain pod mode %q, want node (reconciled at startup)", m)
	}
	if m := modeOf(ra, "c-late"); m != agent.ModeNode {
		t.Errorf("after restart late pod mode %q, want node", m)
	}
}

// TestTaintWaitsForOwnPodReady: an agent that knows its own pod (the
// chart's POD_NAME) removes the node taint only once that pod is Ready,
// the controller's test (nodetaint.PodReady). Removing it as soon as the
// agent was ready, while kubelet still reported the pod not Ready, made
// the controller put the taint back until the readiness probe passed: a
// taint flap and a Warning Event on every agent restart.
func TestTaintWaitsForOwnPodReady(t *testing.T) {
	ctx := context.Background()
	cs, err := kubernetes.NewForConfig(cluster.RESTConfig)
	if err != nil {
		t.Fatal(err)
	}
	const node, ns = "node-selfready", "sidelane-selfready"
	if _, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: node},
		Spec:       corev1.NodeSpec{Taints: []corev1.Taint{{Key: kube.TaintKey, Effect: kube.TaintEffect}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	self := createPod(t, cs, loadFixture(t, "plain"), ns, "sidelane-agent-x7k2p", node)
	// As kubelet reports a started container whose readiness probe has
	// not passed yet.
	setStatus := func(ready corev1.ConditionStatus) {
		t.Helper()
		p, err := cs.CoreV1().Pods(ns).Get(ctx, self.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		now := metav1.Now()
		p.Status.Phase = corev1.PodRunning
		p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: ready, LastTransitionTime: now}}
		p.Status.ContainerStatuses = nil
		for _, c := range p.Spec.Containers {
			p.Status.ContainerStatuses = append(p.Status.ContainerStatuses, corev1.ContainerStatus{
				Name: c.Name, Image: c.Image, ImageID: c.Image, Ready: ready == corev1.ConditionTrue,
				State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}},
			})
		}
		if _, err := cs.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	setStatus(corev1.ConditionFalse)

	ra := startAgentAs(t, cs, node, t.TempDir(), types.NamespacedName{Namespace: ns, Name: self.Name})
	// The agent serves ADDs (fail-closed capture works) but leaves the
	// taint: before this change it was gone within milliseconds here.
	time.Sleep(time.Second)
	if ok, why := ra.agent.Ready(); !ok {
		t.Fatalf("agent not ready: %s", why)
	}
	if !hasTaint(t, cs, node) {
		t.Fatal("taint removed while the agent's own pod is not Ready: the controller would put it back (flap)")
	}
	setStatus(corev1.ConditionTrue)
	eventually(t, "taint removed once the agent's pod is Ready", func() bool { return !hasTaint(t, cs, node) })

	// A graceful stop still re-adds it.
	ra.stop()
	if !hasTaint(t, cs, node) {
		t.Error("taint not re-added on a graceful stop")
	}
}
