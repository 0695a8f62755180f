package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"google.golang.org/protobuf/proto"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"

	"github.com/sidelane/sidelane/internal/kubelet"
	"github.com/sidelane/sidelane/internal/testenv"
	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/controller"
	"github.com/sidelane/sidelane/policy/envoyfilter"
	"github.com/sidelane/sidelane/policy/input"
)

// TestControllerSplit runs the cluster-wide controller as its own process
// next to the two node agents: the controller writes the EnvoyFilter and
// the status, the agents serve the same policy to their node proxies over
// xDS. Then the controller goes away: the agents keep capturing (a new
// per-node pod is enrolled) and keep following policy changes over xDS,
// while the policy's status says no controller applied the new generation
// to sidecars.
func TestControllerSplit(t *testing.T) {
	e := newEnv(t, cluster)
	if !e.capturing() {
		t.Skip("per-node xDS needs the eBPF datapath (" + DatapathEnv + "=noop set)")
	}
	ctx := context.Background()
	nodeA := e.nodes[0]
	kubectl := func(stdin string, args ...string) {
		t.Helper()
		cmd := exec.Command(e.cluster.Kubectl, append([]string{"--kubeconfig", e.cluster.Kubeconfig}, args...)...)
		cmd.Stdin = strings.NewReader(stdin)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/api").Output()
	if err != nil {
		t.Fatalf("locate istio.io/api: %v", err)
	}
	kubectl("", "apply", "--server-side", "-f", strings.TrimSpace(string(out))+"/kubernetes/customresourcedefinitions.gen.yaml")
	kubectl("", "apply", "--server-side", "-f", "../../charts/sidelane/crds/sidelane.io_l7policies.yaml")
	kubectl("", "wait", "--for=condition=Established", "--timeout=120s", "crd/envoyfilters.networking.istio.io", "crd/l7policies.sidelane.io")

	xdsSocket := func(n *kubelet.Node) string { return filepath.Join(filepath.Dir(n.StateDir), "xds.sock") }
	e.agentArgs = func(n *kubelet.Node) []string {
		return []string{"--node-proxy-address", gateway(n).String(), "--node-proxy-netns", "/var/run/netns/" + n.Netns,
			"--xds-socket", xdsSocket(n), "--xds-socket-gid", "-1"}
	}
	for _, n := range e.nodes {
		e.startAgent(n)
	}
	ctrl := e.startController()

	ns := testenv.UniqueName("ctl-")
	e.namespace(ns, map[string]string{"istio.io/dataplane-mode": "ambient"})
	web := e.run(fixture(t, "plain", ns, "web-a"), nodeA)
	if got := e.mode(nodeA, ns, web.pod.Name); got != "node" {
		t.Fatalf("%s: mode %q, want node", web, got)
	}
	xds := watchListeners(t, xdsSocket(nodeA), nodeA.Name)
	policyYAML := func(path string) string {
		return fmt.Sprintf(`apiVersion: sidelane.io/v1alpha1
kind: L7Policy
metadata: {name: web, namespace: %s}
spec:
  podSelector: {matchLabels: {app: web}}
  ports:
    - port: 8080
      rules: [{http: [{method: GET, path: %s}]}]
`, ns, path)
	}
	chain := web.pod.Status.PodIP + ":8080"
	rbacPath := func() string {
		l := xds.get("sidelane_inbound/" + ns + "/" + web.pod.Name)
		i := slices.IndexFunc(l.GetFilterChains(), func(c *listenerv3.FilterChain) bool { return c.GetName() == chain })
		if i < 0 {
			return ""
		}
		b, err := proto.Marshal(l.GetFilterChains()[i])
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range []string{"/v1", "/v2"} {
			if bytes.Contains(b, []byte(p)) {
				return p
			}
		}
		return "?"
	}
	dyn := dynamic.NewForConfigOrDie(e.cluster.RESTConfig)
	policy := func() *v1alpha1.L7Policy {
		u, err := dyn.Resource(input.L7PolicyGVR).Namespace(ns).Get(ctx, "web", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var p v1alpha1.L7Policy
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &p); err != nil {
			t.Fatal(err)
		}
		return &p
	}

	kubectl(policyYAML("/v1"), "apply", "-f", "-")
	e.eventually("the controller writes the EnvoyFilter and Enforced; the agent serves the RBAC chain", func() bool {
		_, err := dyn.Resource(controller.EnvoyFilterGVR).Namespace(ns).Get(ctx, envoyfilter.Name([]string{"web"}), metav1.GetOptions{})
		ok, _ := controller.SidecarEnforcement(policy())
		return err == nil && ok && rbacPath() == "/v1"
	})

	// The controller goes away (every replica down).
	ctrl.stop()
	kubectl(policyYAML("/v2"), "apply", "-f", "-")
	e.eventually("the agent follows the policy change over xDS without a controller", func() bool { return rbacPath() == "/v2" })
	p := policy()
	if ok, why := controller.SidecarEnforcement(p); ok || !strings.Contains(why, fmt.Sprintf("generation %d", p.Generation)) {
		t.Errorf("status with no controller: enforced=%v %q (generation %d)", ok, why, p.Generation)
	}
	// and the agents keep capturing: a new per-node pod is enrolled.
	web2 := e.run(fixture(t, "plain", ns, "web-a2"), nodeA)
	if got := e.mode(nodeA, ns, web2.pod.Name); got != "node" {
		t.Errorf("%s started with no controller: mode %q, want node", web2, got)
	}
	e.eventually("its inbound listener over xDS", func() bool { return xds.get("sidelane_inbound/"+ns+"/"+web2.pod.Name) != nil })
}

// controllerProc is a `sidelane controller` process.
type controllerProc struct {
	cmd  *exec.Cmd
	done chan struct{}
}

// startController runs the real controller binary against the cluster and
// waits for /readyz.
func (e *env) startController() *controllerProc {
	e.t.Helper()
	metrics := freePort(e.t)
	logPath := filepath.Join(e.dir, "controller.log")
	logf, err := os.Create(logPath)
	if err != nil {
		e.t.Fatal(err)
	}
	c := &controllerProc{done: make(chan struct{})}
	c.cmd = exec.Command(filepath.Join(e.bin, "sidelane"), "controller", "--kubeconfig", e.cluster.Kubeconfig,
		"--namespace", "default", "--identity", "e2e", "--metrics-addr", metrics, "--log-level", "debug")
	c.cmd.Stdout, c.cmd.Stderr = logf, logf
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := c.cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	go func() { _ = c.cmd.Wait(); logf.Close(); close(c.done) }()
	e.t.Cleanup(func() {
		c.stop()
		if e.t.Failed() {
			b, _ := os.ReadFile(logPath)
			e.t.Logf("controller log (tail):\n%s", tail(string(b), 3000))
		}
	})
	probe := &agentProc{metrics: metrics}
	e.eventually("controller ready", func() bool { return probe.httpOK("/readyz") })
	return c
}

func (c *controllerProc) stop() {
	select {
	case <-c.done:
		return
	default:
	}
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	<-c.done
}
