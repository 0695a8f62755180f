package node

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/sidelane/sidelane/internal/nodeharness"
	"github.com/sidelane/sidelane/internal/testenv"
)

const (
	releaseNS = "sidelane-system"
	taint     = "sidelane.io/agent-not-ready=true:NoSchedule"
)

// helmInstallArgs is what the README's "Install on a cluster" tells a
// user, plus what this node differs in: its CNI dirs, cgroup2 subtree and
// bpffs are its own, and the image is imported (pullPolicy Never). The
// agent's capabilities are the chart's defaults.
func helmInstallArgs(n *nodeharness.Node) []string {
	return []string{
		"--namespace", releaseNS, "--create-namespace",
		"--set", "image.pullPolicy=Never",
		"--set", "cni.confDir=" + n.CNIConfDir,
		"--set", "cni.binDir=" + n.CNIBinDir,
		"--set", "agent.cgroupRoot=" + n.CgroupV2,
		"--set", "agent.bpffs=" + n.BPFFS,
		// Every node address, not only 127.0.0.1: the test reads /metrics
		// through the API server's pod proxy, as a Prometheus would.
		"--set", "agent.httpBindAddress=",
	}
}

func helm(t *testing.T, n *nodeharness.Node, args ...string) string {
	t.Helper()
	out, err := n.Exec(testenv.RequireTool(t, "helm"), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("helm %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestChartOnRealNode: `helm install` of charts/sidelane with the image
// make image built, on a real node: install-cni chains sidelane-cni into
// the runtime's real conf dir, the agent comes up on eBPF on the node's
// cgroup root and removes the node's taint, and pods then start through
// the chain (primary bridge + sidelane-cni).
func TestChartOnRealNode(t *testing.T) {
	testenv.Privileged(t)
	image := imageArchive(t)
	n := nodeharness.Start(t, tools(t), []string{taint})
	if err := n.ImportImage(image); err != nil {
		t.Fatal(err)
	}
	if out, _ := n.Kubectl("get", "node", n.Name, "-o", "jsonpath={.spec.taints}"); !strings.Contains(out, "sidelane.io/agent-not-ready") {
		t.Fatalf("node registered without the taint: %s", out)
	}
	primaryConf := filepath.Join(n.CNIConfDir, "10-bridge.conflist")
	primaryBefore, err := os.ReadFile(primaryConf)
	if err != nil {
		t.Fatal(err)
	}
	chart := filepath.Join(testenv.RepoRoot(t), "charts", "sidelane")
	// Istio's CRDs (EnvoyFilter), as an Istio install has them: the chart's
	// controller writes EnvoyFilters.
	istioAPI, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/api").Output()
	if err != nil {
		t.Fatalf("locate istio.io/api: %v", err)
	}
	for _, args := range [][]string{
		{"apply", "--server-side", "-f", strings.TrimSpace(string(istioAPI)) + "/kubernetes/customresourcedefinitions.gen.yaml"},
		{"wait", "--for=condition=Established", "--timeout=120s", "crd/envoyfilters.networking.istio.io"},
	} {
		if out, err := n.Kubectl(args...); err != nil {
			t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	helm(t, n, append([]string{"install", "sidelane", chart}, helmInstallArgs(n)...)...)

	t.Run("agent ready, taint removed", func(t *testing.T) {
		if out, err := n.Kubectl("-n", releaseNS, "rollout", "status", "daemonset/sidelane", "--timeout=180s"); err != nil {
			pods, _ := n.Kubectl("-n", releaseNS, "describe", "pods")
			logs, _ := n.Kubectl("-n", releaseNS, "logs", "daemonset/sidelane", "--all-containers", "--tail=50")
			t.Fatalf("agent DaemonSet not ready: %v\n%s\n%s\n%s", err, out, pods, logs)
		}
		waitFor(t, "taint "+taint+" removed", func() string {
			out, _ := n.Kubectl("get", "node", n.Name, "-o", "jsonpath={.spec.taints}")
			if strings.Contains(out, "sidelane.io/agent-not-ready") {
				return "taints: " + out
			}
			return ""
		})
		// The agent is on the node's network (hostNetwork), /metrics on 127.0.0.1.
		metrics, err := n.HTTPGet(t.Context(), "http://127.0.0.1:15190/metrics")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(metrics, `sidelane_datapath_info{backend="ebpf"`) {
			t.Errorf("the agent does not run the eBPF datapath:\n%s", grepLines(metrics, "sidelane_datapath_info"))
		}
	})

	t.Run("sidelane-cni chained in the runtime's conf dir", func(t *testing.T) {
		b, err := os.ReadFile(filepath.Join(n.CNIConfDir, "10-bridge.conflist"))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(b), `"type": "bridge"`) || !strings.Contains(string(b), `"sidelane-cni"`) {
			t.Fatalf("conflist does not chain sidelane-cni after the bridge:\n%s", b)
		}
		if _, err := os.Stat(filepath.Join(n.CNIBinDir, "sidelane-cni")); err != nil {
			t.Fatalf("plugin binary not installed: %v", err)
		}
	})

	t.Run("plain pod through the chain", func(t *testing.T) {
		apply(t, n, podManifest("plain", ""))
		ip := waitPodRunning(t, n, "default", "plain")
		if out := get(t, n, ip+":8080"); out != "plain" {
			t.Fatalf("GET the pod from the node: %q", out)
		}
		// The runtime called sidelane-cni after the bridge: the agent saw the ADD.
		logs, err := n.Kubectl("-n", releaseNS, "logs", "daemonset/sidelane", "-c", "agent")
		if err != nil || !strings.Contains(logs, `"pod added"`) || !strings.Contains(logs, "default/plain") {
			t.Fatalf("the agent logged no ADD of default/plain (%v):\n%s", err, logs)
		}
	})

	t.Run("injected pods: istio-validation under eBPF capture", func(t *testing.T) { testInjectedPods(t, n) })

	t.Run("controller Deployment writes EnvoyFilters", func(t *testing.T) {
		if out, err := n.Kubectl("-n", releaseNS, "rollout", "status", "deployment/sidelane-controller", "--timeout=180s"); err != nil {
			logs, _ := n.Kubectl("-n", releaseNS, "logs", "deployment/sidelane-controller", "--tail=40")
			t.Fatalf("controller Deployment not ready: %v\n%s\n%s", err, out, logs)
		}
		apply(t, n, `apiVersion: sidelane.io/v1alpha1
kind: L7Policy
metadata: {name: health-only, namespace: shop}
spec:
  podSelector: {}
  ports:
    - port: 8080
      rules: [{http: [{method: GET, path: /healthz}]}]
`)
		waitFor(t, "an EnvoyFilter for L7Policy shop/health-only", func() string {
			out, err := n.Kubectl("get", "envoyfilters", "-n", "shop", "-o", "jsonpath={.items[*].metadata.name}")
			if err != nil || strings.TrimSpace(out) == "" {
				return fmt.Sprintf("envoyfilters: %q %v", out, err)
			}
			return ""
		})
		waitFor(t, "policy status Enforced", func() string {
			out, _ := n.Kubectl("get", "l7policy", "health-only", "-n", "shop", "-o", `jsonpath={.status.conditions[?(@.type=="Enforced")].status}`)
			if strings.TrimSpace(out) != "True" {
				return "Enforced=" + out
			}
			return ""
		})
		if out, err := n.Kubectl("delete", "l7policy", "health-only", "-n", "shop", "--wait=true"); err != nil {
			t.Fatalf("delete L7Policy: %v\n%s", err, out)
		}
	})

	t.Run("no iptables rule in any pod netns", func(t *testing.T) {
		// containerd's pod netns mounts are in the node's mount namespace.
		out, err := n.Exec("sh", "-c", `set -e; n=0; for f in /run/netns/cni-*; do n=$((n+1)); echo "== $f"; nsenter --net=$f iptables-save; nsenter --net=$f nft list ruleset; done; echo "netns=$n"`).CombinedOutput()
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if !strings.Contains(string(out), "netns=") || strings.Contains(string(out), "netns=0") {
			t.Fatalf("no pod netns found:\n%s", out)
		}
		for _, l := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(l, "-A ") || strings.Contains(l, " rule ") || strings.HasPrefix(strings.TrimSpace(l), "chain ") {
				t.Fatalf("a pod netns has netfilter rules:\n%s", out)
			}
		}
	})

	t.Run("sidelane explain in the agent pod", func(t *testing.T) {
		out, err := n.Kubectl("-n", releaseNS, "exec", "daemonset/sidelane", "-c", "agent", "--", "/usr/local/bin/sidelane", "explain", "shop/web")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(out, "sidecar") {
			t.Fatalf("explain shop/web does not say sidecar mode:\n%s", out)
		}
		t.Logf("sidelane explain shop/web:\n%s", out)
	})

	t.Run("ambient label moves a running pod and back; events and metrics through the API", func(t *testing.T) {
		apply(t, n, "apiVersion: v1\nkind: Namespace\nmetadata: {name: amb}\n")
		apply(t, n, strings.Replace(podManifest("app", ""), "namespace: default", "namespace: amb", 1))
		waitPodRunning(t, n, "amb", "app")
		before, _ := n.Kubectl("get", "pod", "-n", "amb", "app", "-o", "jsonpath={.status.containerStatuses[0].containerID}")
		mode := func(want string) func() string {
			return func() string {
				out, err := n.Kubectl("-n", releaseNS, "exec", "daemonset/sidelane", "-c", "agent", "--", "/usr/local/bin/sidelane", "explain", "-o", "json", "amb/app")
				if err != nil {
					return err.Error()
				}
				// The mode in force is the attachment's (the datapath's state).
				var e struct{ Attachments []struct{ Mode string } }
				if err := json.Unmarshal([]byte(out), &e); err != nil {
					return fmt.Sprintf("%v: %s", err, out)
				}
				if len(e.Attachments) != 1 || e.Attachments[0].Mode != want {
					return fmt.Sprintf("attachments %+v, want one in mode %s", e.Attachments, want)
				}
				return ""
			}
		}
		waitFor(t, "amb/app in mode none", mode("none"))
		if _, err := n.Kubectl("label", "namespace", "amb", "istio.io/dataplane-mode=ambient"); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "amb/app moved to mode node", mode("node"))
		if _, err := n.Kubectl("label", "namespace", "amb", "istio.io/dataplane-mode-"); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "amb/app moved back to mode none", mode("none"))
		after, _ := n.Kubectl("get", "pod", "-n", "amb", "app", "-o", "jsonpath={.status.containerStatuses[0].containerID}")
		if before == "" || before != after {
			t.Errorf("the pod's container changed (%q -> %q): it was restarted", before, after)
		}
		waitFor(t, "SidelaneModeChanged events on amb/app", func() string {
			out, err := n.Kubectl("get", "events", "-n", "amb", "--field-selector", "involvedObject.name=app,reason=SidelaneModeChanged", "-o", "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}")
			if err != nil || !strings.Contains(out, "to node mode") || !strings.Contains(out, "to none mode") {
				return fmt.Sprintf("events %q %v", out, err)
			}
			return ""
		})
		agentPod, err := n.Kubectl("-n", releaseNS, "get", "pods", "-l", "app.kubernetes.io/component=agent", "-o", "jsonpath={.items[0].metadata.name}")
		if err != nil {
			t.Fatal(err)
		}
		metrics, err := n.Kubectl("get", "--raw", "/api/v1/namespaces/"+releaseNS+"/pods/"+agentPod+":15190/proxy/metrics")
		if err != nil || !strings.Contains(metrics, "sidelane_datapath_info") {
			t.Fatalf("agent /metrics through the API server: %v\n%s", err, metrics)
		}
	})

	t.Run("a crashed agent: the controller re-taints the node until it is Ready", func(t *testing.T) { testCrashedAgentRetaints(t, n) })

	t.Run("helm upgrade to a second image under a running stream", func(t *testing.T) { testUpgradeUnderStream(t, n, chart) })

	t.Run("node reboot: nothing runs uncaptured, every pod captured again", func(t *testing.T) { testReboot(t, n) })

	t.Run("a pod created while the agent is away never runs uncaptured", func(t *testing.T) {
		// The agent pod goes away (a node selector no node matches) while
		// install-cni's entry stays (cni.cleanupOnExit false), as in a
		// rollout between the old pod's exit and the new one's start.
		if _, err := n.Kubectl("-n", releaseNS, "patch", "daemonset", "sidelane", "-p", `{"spec":{"template":{"spec":{"nodeSelector":{"sidelane.test/away":"x"}}}}}`); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "agent pod gone", func() string {
			out, _ := n.Kubectl("-n", releaseNS, "get", "pods", "-l", "app.kubernetes.io/component=agent", "-o", "name")
			return strings.TrimSpace(out)
		})
		// The agent taints its node when it stops: the scheduler keeps a new
		// pod off the node. A pod bound to the node directly (as DaemonSet
		// and static pods are) gets there anyway: its sandbox's ADD fails
		// closed (cni.failPolicy) and kubelet retries it.
		apply(t, n, istioNamespace("shop"))
		apply(t, n, injectedPod(t, "sidecar-classic.yaml", "web-restart", true))
		apply(t, n, strings.Replace(injectedPod(t, "sidecar-classic.yaml", "web-bound", true), "\nspec:\n", "\nspec:\n  nodeName: "+n.Name+"\n", 1))
		waitFor(t, "the node tainted while the agent is away", func() string {
			out, _ := n.Kubectl("get", "node", n.Name, "-o", "jsonpath={.spec.taints}")
			if !strings.Contains(out, "sidelane.io/agent-not-ready") {
				return "taints: " + out
			}
			return ""
		})
		waitFor(t, "the sandbox of shop/web-bound refused", func() string {
			out, _ := n.Kubectl("get", "events", "-n", "shop", "--field-selector", "involvedObject.name=web-bound,reason=FailedCreatePodSandBox", "-o", "jsonpath={.items[*].message}")
			if !strings.Contains(out, "sidelane") {
				desc, _ := n.Kubectl("describe", "pod", "-n", "shop", "web-bound")
				return fmt.Sprintf("no FailedCreatePodSandBox naming sidelane yet: %q\n%s", out, desc)
			}
			t.Logf("web-bound sandbox refused while the agent is away: %.300s", out)
			return ""
		})
		for _, name := range []string{"web-restart", "web-bound"} {
			if out, _ := n.Kubectl("get", "pod", "-n", "shop", name, "-o", "jsonpath={.status.phase} {.status.initContainerStatuses[0].state}"); !strings.HasPrefix(out, "Pending") || strings.Contains(out, "running") || strings.Contains(out, "terminated") {
				t.Fatalf("pod %s started while no agent ran: %s", name, out)
			}
		}
		if _, err := n.Kubectl("-n", releaseNS, "patch", "daemonset", "sidelane", "--type=json", "-p", `[{"op":"remove","path":"/spec/template/spec/nodeSelector/sidelane.test~1away"}]`); err != nil {
			t.Fatal(err)
		}
		if out, err := n.Kubectl("-n", releaseNS, "rollout", "status", "daemonset/sidelane", "--timeout=180s"); err != nil {
			t.Fatalf("agent back: %v\n%s", err, out)
		}
		for _, name := range []string{"web-restart", "web-bound"} {
			if code := validationExit(t, n, "shop", name); code != "0" {
				t.Fatalf("istio-validation of %s, created while the agent was away, exited %s: it started uncaptured", name, code)
			}
			waitPodRunning(t, n, "shop", name)
		}
	})

	t.Run("helm uninstall, then install-cni --uninstall as the README says", func(t *testing.T) {
		helm(t, n, "uninstall", "sidelane", "--namespace", releaseNS, "--wait")
		// cni.cleanupOnExit false (the default) keeps the entry: pods fail closed until it is removed.
		out, err := n.Exec(filepath.Join(testenv.SidelaneBin(t), "sidelane"), "install-cni", "--uninstall",
			"--cni-conf-dir="+n.CNIConfDir, "--cni-bin-dir="+n.CNIBinDir, "--cni-cache-dir=/var/lib/cni").CombinedOutput()
		if err != nil {
			t.Fatalf("install-cni --uninstall: %v\n%s", err, out)
		}
		after, err := os.ReadFile(primaryConf)
		if err != nil {
			t.Fatal(err)
		}
		// Same config; install-cni rewrites a .conflist it chained into in
		// its own formatting (only a converted .conf/.json comes back byte
		// for byte, see README).
		var want, got any
		if err := json.Unmarshal(primaryBefore, &want); err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(after, &got); err != nil {
			t.Fatalf("conflist after uninstall: %v\n%s", err, after)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("conf dir not back to the primary's config:\n--- before\n%s\n--- after\n%s", primaryBefore, after)
		}
		if entries, _ := os.ReadDir(n.CNIConfDir); len(entries) != 1 {
			t.Errorf("conf dir holds %d files after uninstall, want the primary's only", len(entries))
		}
		apply(t, n, podManifest("after-uninstall", ""))
		ip := waitPodRunning(t, n, "default", "after-uninstall")
		if out := get(t, n, ip+":8080"); out != "after-uninstall" {
			t.Fatalf("GET the pod started after uninstall: %q", out)
		}

		// The plugin binary stays while libcni's cache holds pods whose
		// cached config chains sidelane-cni (their DEL still runs it).
		if _, err := os.Stat(filepath.Join(n.CNIBinDir, "sidelane-cni")); err != nil {
			t.Fatalf("plugin binary removed while pods made through it still run: %v", err)
		}
		for _, ns := range []string{"shop", "amb"} {
			if _, err := n.Kubectl("delete", "pods", "--all", "-n", ns, "--wait=true", "--timeout=120s"); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := n.Kubectl("delete", "pod", "plain", "-n", "default", "--wait=true", "--timeout=120s"); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "plugin binary removed once no cached attachment uses it", func() string {
			out, err := n.Exec(filepath.Join(testenv.SidelaneBin(t), "sidelane"), "install-cni", "--uninstall",
				"--cni-conf-dir="+n.CNIConfDir, "--cni-bin-dir="+n.CNIBinDir, "--cni-cache-dir=/var/lib/cni").CombinedOutput()
			if err != nil {
				return fmt.Sprintf("install-cni --uninstall: %v\n%s", err, out)
			}
			if _, err := os.Stat(filepath.Join(n.CNIBinDir, "sidelane-cni")); err == nil {
				return "sidelane-cni still in the bin dir: " + string(out)
			}
			return ""
		})
	})
}

func waitFor(t *testing.T, what string, cond func() string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		msg := cond()
		if msg == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still %s", what, msg)
		}
		time.Sleep(time.Second)
	}
}

func grepLines(s, substr string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
