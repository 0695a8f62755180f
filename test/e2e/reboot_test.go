package e2e

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sidelane/sidelane/internal/kubelet"
	"github.com/sidelane/sidelane/internal/testenv"
)

// TestNodeReboot powers a node off (runtime and agent killed, sandboxes
// gone without CNI DEL, the agent's bpffs pins and state file wiped, as
// tmpfs and bpffs are after a reboot) and brings it back with the agent
// first or the runtime first. No pod process runs before the agent has
// enrolled its pod: with the runtime first, ADD fails closed and is
// retried, and no container starts until the agent is ready. Afterwards
// the recreated pod's traffic goes through both sidecars again.
func TestNodeReboot(t *testing.T) {
	e := newEnv(t, cluster)
	if !e.capturing() {
		t.Skip("needs the eBPF datapath (SIDELANE_E2E_DATAPATH=noop or a --datapath override is set)")
	}
	ctx := context.Background()
	nodeA, nodeB := e.nodes[0], e.nodes[1]
	e.startAgent(nodeA)
	e.startAgent(nodeB)
	scNS := testenv.UniqueName("reboot-")
	e.namespace(scNS, map[string]string{"istio-injection": "enabled"})
	server := e.run(fixture(t, "sidecar-classic", scNS, "server"), nodeB)
	webPod := fixture(t, "sidecar-classic", scNS, "web")
	stand, err := kubelet.WithStandIns(webPod, e.dir)
	if err != nil {
		t.Fatal(err)
	}
	web := e.ref(e.running(e.pod(webPod, nodeA)), nodeA, stand)
	if r := mustEcho(t, web, server.addr(), "before the reboot"); r.peer != "127.0.0.6" {
		t.Fatalf("server app saw %s before the reboot, want its sidecar", r.peer)
	}

	// One after the other in this test (not subtests: the env's helpers
	// fail the test that made it).
	for _, order := range []string{"agent first", "runtime first"} {
		func() {
			t.Logf("reboot of %s, %s", nodeA.Name, order)
			// Power off. API times have seconds: the pod's last start is
			// before off.
			time.Sleep(1100 * time.Millisecond)
			off := metav1.NewTime(time.Now().Truncate(time.Second))
			nodeA.Crash()
			e.agents[nodeA.Name].stop(syscall.SIGKILL)
			if err := os.RemoveAll(e.pinDirs[nodeA.Name]); err != nil {
				t.Fatal(err)
			}
			// A reboot wipes the agent's tmpfs state (records and any
			// legacy single file).
			for _, p := range []string{"state.json", "state.d"} {
				if err := os.RemoveAll(filepath.Join(nodeA.StateDir, p)); err != nil {
					t.Fatal(err)
				}
			}
			if n := len(netnsOf(nodeA)); n != 0 {
				t.Fatalf("%d sandboxes survived the power-off", n)
			}
			uid := string(web.pod.UID)
			if order == "agent first" {
				e.startAgent(nodeA)
				nodeA.Restart()
			} else {
				nodeA.Restart()
				// The runtime retries the sandbox; nothing of the pod
				// may run while no agent can enroll it.
				e.eventually("a failed sandbox attempt for web", func() bool {
					evs, err := e.cs.CoreV1().Events(scNS).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=web,reason=FailedCreatePodSandBox"})
					return err == nil && slices.ContainsFunc(evs.Items, func(ev corev1.Event) bool {
						return !ev.LastTimestamp.Before(&off)
					})
				})
				time.Sleep(time.Second) // a few more attempts
				if _, ok := nodeA.PodCgroup(uid); ok {
					t.Fatal("web's containers started while the agent was down")
				}
				e.startAgent(nodeA)
			}
			var p *corev1.Pod
			e.eventually("web running again after the reboot", func() bool {
				var err error
				p, err = e.cs.CoreV1().Pods(scNS).Get(ctx, "web", metav1.GetOptions{})
				_, started := nodeA.PodCgroup(uid)
				return err == nil && started && p.Status.Phase == corev1.PodRunning && p.Status.StartTime != nil && !p.Status.StartTime.Before(&off)
			})
			web = e.ref(p, nodeA, stand)
			if ex, _ := e.explain(nodeA, scNS, "web"); len(ex.Attachments) != 1 || ex.Attachments[0].Mode != "sidecar" {
				t.Fatalf("%s: web after the reboot: %+v", order, ex)
			}
			before := sessions(t, web)["outbound"]
			r := mustEcho(t, web, server.addr(), "after the reboot, "+order)
			if r.peer != "127.0.0.6" {
				t.Errorf("%s: server app saw %s, want its sidecar (127.0.0.6)", order, r.peer)
			}
			if got := sessions(t, web)["outbound"]; got != before+1 {
				t.Errorf("%s: web's sidecar outbound sessions %d -> %d, want +1 (captured)", order, before, got)
			}
		}()
	}
}

func netnsOf(n *kubelet.Node) []string { return n.PodNetnses() }
