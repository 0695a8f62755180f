// Package node runs sidelane on a real Kubernetes node (internal/nodeharness:
// kubelet, containerd, runc, the control plane) and checks what issue 14
// lists. `make node-e2e` runs it (root).
package node

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sidelane/sidelane/internal/nodeharness"
	"github.com/sidelane/sidelane/internal/testenv"
)

func tools(t *testing.T) nodeharness.Tools {
	t.Helper()
	cache := filepath.Dir(testenv.ToolBin(t))
	tl := nodeharness.Tools{
		KubeDir:  filepath.Join(cache, "k8s-v1.33.13"),
		CNIBin:   testenv.ToolBin(t),
		ImageDir: filepath.Join(cache, "node-images"),
	}
	for _, p := range []string{
		filepath.Join(tl.KubeDir, "kubelet"), filepath.Join(tl.KubeDir, "kube-scheduler"),
		filepath.Join(tl.KubeDir, "kube-controller-manager"), filepath.Join(tl.ImageDir, "sidelane.local_pause_2.tar"),
	} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("%v (make node-e2e builds it: hack/build-kube-apiserver.sh node, hack/build-node-images.sh)", err)
		}
	}
	return tl
}

// podManifest is a busybox pod that serves its name on port 8080.
func podManifest(name string, extra string) string {
	return `apiVersion: v1
kind: Pod
metadata:
  name: ` + name + `
  namespace: default
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: ` + nodeharness.BusyboxImage + `
    imagePullPolicy: Never
    command: ["sh", "-c", "mkdir -p /www && echo ` + name + ` > /www/index.html && exec httpd -f -p 8080 -h /www"]
` + extra
}

func apply(t *testing.T, n *nodeharness.Node, manifest string) {
	t.Helper()
	cmd := n.Exec(filepath.Join(n.KubeDir(), "kubectl"), "apply", "-f", "-")
	cmd.Stdin = strings.NewReader(manifest)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("kubectl apply: %v\n%s\n%s", err, out, manifest)
	}
}

func waitPodRunning(t *testing.T, n *nodeharness.Node, ns, name string) string {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		out, err := n.Kubectl("get", "pod", "-n", ns, name, "-o", "jsonpath={.status.phase} {.status.podIP}")
		f := strings.Fields(out)
		if err == nil && len(f) == 2 && f[0] == "Running" {
			return f[1]
		}
		if time.Now().After(deadline) {
			desc, _ := n.Kubectl("describe", "pod", "-n", ns, name)
			t.Fatalf("pod %s/%s not running: %q %v\n%s", ns, name, out, err, desc)
		}
		time.Sleep(time.Second)
	}
}

// TestRealNode: a real node comes up Ready and runs a pod whose sandbox
// containerd wired through the primary CNI (bridge + host-local) from the
// node's real conf dir.
func TestRealNode(t *testing.T) {
	testenv.Privileged(t)
	n := nodeharness.Start(t, tools(t), nil)

	t.Run("plain pod", func(t *testing.T) {
		apply(t, n, podManifest("plain", ""))
		ip := waitPodRunning(t, n, "default", "plain")
		if !strings.HasPrefix(ip, "10.202.0.") {
			t.Fatalf("pod IP %s is not from the primary's host-local range %s", ip, n.PodCIDR)
		}
		if out := get(t, n, ip+":8080"); out != "plain" {
			t.Fatalf("GET the pod from the node: %q", out)
		}
	})
}

// get fetches http://addr/ from the node, retrying while the server starts.
func get(t *testing.T, n *nodeharness.Node, addr string) string {
	t.Helper()
	var out string
	var err error
	for range 30 {
		out, err = n.HTTPGet(t.Context(), "http://"+addr+"/")
		if err == nil {
			return strings.TrimSpace(out)
		}
		time.Sleep(time.Second)
	}
	t.Fatalf("GET http://%s/ from the node: %v: %s", addr, err, out)
	return ""
}

// TestRealNodeReboot: the harness's power cycle (nodeharness.Reboot) on a
// node without sidelane: kubelet brings the pod back in a new sandbox.
func TestRealNodeReboot(t *testing.T) {
	testenv.Privileged(t)
	n := nodeharness.Start(t, tools(t), nil)
	apply(t, n, podManifest("plain", ""))
	waitPodRunning(t, n, "default", "plain")
	before, _ := n.Kubectl("get", "pod", "plain", "-o", "jsonpath={.status.containerStatuses[0].containerID}")
	if err := n.Reboot(nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "plain running again in a new container", func() string {
		out, _ := n.Kubectl("get", "pod", "plain", "-o", "jsonpath={.status.phase} {.status.containerStatuses[0].containerID} {.status.containerStatuses[0].ready}")
		f := strings.Fields(out)
		if len(f) != 3 || f[0] != "Running" || f[1] == before || f[2] != "true" {
			return out
		}
		return ""
	})
	ip := waitPodRunning(t, n, "default", "plain")
	if out := get(t, n, ip+":8080"); out != "plain" {
		t.Fatalf("GET the pod after the reboot: %q", out)
	}
}
