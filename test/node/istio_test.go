package node

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/sidelane/sidelane/internal/nodeharness"
	"github.com/sidelane/sidelane/internal/podnet"
	"github.com/sidelane/sidelane/internal/testenv"
)

// injectedPod is a fixture of istio/classify/testdata/pods (real
// istioctl kube-inject output) with its images swapped for local ones:
// the app serves its name with busybox httpd on its port; istio-validation
// keeps its real args and runs Istio's real pilot-agent; istio-proxy is a
// haproxy standing in for Envoy (none exists here).
// name renames the pod; keepStatus false drops the sidecar.istio.io/status
// annotation, which makes the pod uninjected to sidelane: the control whose
// capture is missing.
func injectedPod(t *testing.T, fixture, name string, keepStatus bool) string {
	t.Helper()
	return injectedPodCmd(t, fixture, name, keepStatus, "")
}

// injectedPodCmd is injectedPod with appCmd (sh -c) as the app
// container's command instead of the httpd.
func injectedPodCmd(t *testing.T, fixture, name string, keepStatus bool, appCmd string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(testenv.RepoRoot(t), "istio", "classify", "testdata", "pods", fixture))
	if err != nil {
		t.Fatal(err)
	}
	var pod corev1.Pod
	if err := yaml.Unmarshal(b, &pod); err != nil {
		t.Fatalf("%s: %v", fixture, err)
	}
	pod.Name = name
	if !keepStatus {
		delete(pod.Annotations, "sidecar.istio.io/status")
	}
	one := int64(1)
	pod.Spec.TerminationGracePeriodSeconds = &one
	for i := range pod.Spec.InitContainers {
		c := &pod.Spec.InitContainers[i]
		if c.Name == "istio-validation" {
			c.Image, c.ImagePullPolicy = nodeharness.ProxyImage, corev1.PullNever
		}
	}
	for i := range pod.Spec.Containers {
		c := &pod.Spec.Containers[i]
		c.ImagePullPolicy = corev1.PullNever
		switch c.Name {
		case "istio-proxy":
			// haproxy as Envoy: 15001 outbound, 15006 inbound, each
			// upstream to the original destination (SO_ORIGINAL_DST, which
			// sidelane's getsockopt hook answers), every connection logged.
			cfg := podnet.HAProxyConfig(podnet.Sidecar{UID: 1337, GID: 1337, OutPort: 15001, InPort: 15006, LogConnections: true})
			cfg = strings.Replace(cfg, "  uid 1337\n  gid 1337\n", "", 1) // the container already runs as 1337
			cfg += "frontend health\n  mode http\n  bind 0.0.0.0:15021\n  monitor-uri /healthz/ready\n"
			c.Image = nodeharness.ProxyImage
			c.Command = []string{"sh", "-c", `printf '%s' "$HAPROXY_CFG" > /var/lib/istio/data/haproxy.cfg && exec haproxy -db -f /var/lib/istio/data/haproxy.cfg`}
			c.Args = nil
			c.Env = append(c.Env, corev1.EnvVar{Name: "HAPROXY_CFG", Value: cfg})
		default:
			c.Image = nodeharness.BusyboxImage
			c.Command = []string{"sh", "-c", "mkdir -p /www && echo " + name + " > /www/index.html && exec httpd -f -p 8080 -h /www"}
			if appCmd != "" {
				c.Command = []string{"sh", "-c", appCmd}
			}
		}
	}
	out, err := yaml.Marshal(&pod)
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

// istioNamespace creates ns with the ConfigMap injected pods mount
// (istiod would publish it).
func istioNamespace(ns string) string {
	return `apiVersion: v1
kind: Namespace
metadata:
  name: ` + ns + `
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: istio-ca-root-cert
  namespace: ` + ns + `
data:
  root-cert.pem: ""
`
}

// validationExit waits until the pod's istio-validation init container
// has finished once and returns its exit code.
func validationExit(t *testing.T, n *nodeharness.Node, ns, name string) string {
	t.Helper()
	// The check is only as good as the init container being there and
	// first: a pod without it would start whatever its capture.
	if out, err := n.Kubectl("get", "pod", "-n", ns, name, "-o", "jsonpath={.spec.initContainers[0].name}"); err != nil || out != "istio-validation" {
		t.Fatalf("pod %s/%s does not run istio-validation as its first init container (%q %v): nothing checks its capture", ns, name, out, err)
	}
	deadline := time.Now().Add(3 * time.Minute)
	for {
		out, _ := n.Kubectl("get", "pod", "-n", ns, name, "-o",
			`jsonpath={.status.initContainerStatuses[0].state.terminated.exitCode}{" "}{.status.initContainerStatuses[0].lastState.terminated.exitCode}`)
		for _, f := range strings.Fields(out) {
			return f
		}
		if time.Now().After(deadline) {
			desc, _ := n.Kubectl("describe", "pod", "-n", ns, name)
			t.Fatalf("istio-validation of %s/%s never finished:\n%s", ns, name, desc)
		}
		time.Sleep(time.Second)
	}
}

// testInjectedPods: on a node where the chart runs, an injected pod's
// istio-validation init container (Istio's real check that its traffic
// is redirected to 15001/15006) passes under sidelane's eBPF capture and
// the pod runs; the same pod without its injection status, which sidelane
// does not capture, fails that check (exit 126 as Istio's validation does
// when no redirect is there).
func testInjectedPods(t *testing.T, n *nodeharness.Node) {
	apply(t, n, istioNamespace("shop"))
	apply(t, n, injectedPod(t, "sidecar-classic.yaml", "web", true))
	apply(t, n, injectedPod(t, "sidecar-classic.yaml", "web-uncaptured", false))

	if code := validationExit(t, n, "shop", "web"); code != "0" {
		logs, _ := n.Kubectl("logs", "-n", "shop", "web", "-c", "istio-validation")
		t.Fatalf("istio-validation in the captured pod exited %s:\n%s", code, logs)
	}
	ip := waitPodRunning(t, n, "shop", "web")
	if ip == "" {
		t.Fatal("no pod IP")
	}
	// app -> app across two injected pods: through web-client's sidecar
	// (outbound) and web's (inbound), the original destination intact.
	apply(t, n, injectedPod(t, "sidecar-classic.yaml", "web-client", true))
	waitPodRunning(t, n, "shop", "web-client")
	out, err := n.Kubectl("exec", "-n", "shop", "web-client", "-c", "app", "--", "sh", "-c", `printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 5 `+ip+` 8080`)
	if err != nil || !strings.Contains(out, "\nweb\n") {
		t.Fatalf("web-client app -> web %s:8080: %v\n%q", ip, err, out)
	}
	if err := carried(t, n, "web-client", ip+":8080", sidecarCounts{}, 1); err != nil {
		t.Error(err)
	}
	code := validationExit(t, n, "shop", "web-uncaptured")
	if code == "0" {
		t.Fatal("istio-validation passed in a pod sidelane does not capture: the check proves nothing")
	}
	t.Logf("istio-validation: captured pod exit 0, uncaptured control exit %s", code)

	// Negative control of the bypass detector: an app whose connections
	// go around its sidecar (shop/web-bypass: injected, but without the
	// status annotation sidelane enrolls by, so nothing redirects them;
	// its init container is dropped, since the validation would fail)
	// reaches web directly; carried must flag it.
	bypass := injectedPodCmd(t, "sidecar-classic.yaml", "web-bypass", false, "exec sleep 2147483647")
	bypass = dropInitContainers(t, bypass)
	apply(t, n, bypass)
	waitPodRunning(t, n, "shop", "web-bypass")
	before := sidecarConnCounts(t, n, "web-bypass", ip+":8080")
	out, err = n.Kubectl("exec", "-n", "shop", "web-bypass", "-c", "app", "--", "sh", "-c", `printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 5 `+ip+` 8080`)
	if err != nil || !strings.Contains(out, "\nweb\n") {
		t.Fatalf("web-bypass app -> web %s:8080 (uncaptured, must still connect): %v\n%q", ip, err, out)
	}
	err = carried(t, n, "web-bypass", ip+":8080", before, 1)
	if err == nil {
		t.Fatal("the bypass detector did not flag web-bypass's connection around its sidecar")
	}
	t.Logf("bypass detector on the negative control: %v", err)
	if _, err := n.Kubectl("delete", "pod", "-n", "shop", "web-bypass", "--wait=true"); err != nil {
		t.Fatal(err)
	}
}

// sidecarCounts are connections a pod's sidecar logged to one destination.
type sidecarCounts struct{ outbound, inbound int }

// sidecarConnCounts counts the connections to dst (ip:port) that pod's
// sidecar carried outbound, and dst's pod's sidecar carried inbound
// (haproxy logs "conn <frontend> <client> <server ip:port>" per connection).
func sidecarConnCounts(t *testing.T, n *nodeharness.Node, pod, dst string) sidecarCounts {
	t.Helper()
	var c sidecarCounts
	count := func(p, dir string) int {
		logs, err := kubectlRetry(t, n, "logs", "-n", "shop", p, "-c", "istio-proxy")
		if err != nil {
			t.Fatalf("logs of %s's sidecar: %v", p, err)
		}
		k := 0
		for _, l := range strings.Split(logs, "\n") {
			if strings.HasPrefix(l, "conn "+dir+" ") && strings.HasSuffix(strings.TrimSpace(l), " "+dst) {
				k++
			}
		}
		return k
	}
	c.outbound = count(pod, "outbound")
	dstPod, err := kubectlRetry(t, n, "get", "pods", "-n", "shop", "--field-selector", "status.podIP="+strings.Split(dst, ":")[0], "-o", "jsonpath={.items[0].metadata.name}")
	if err != nil || dstPod == "" {
		t.Fatalf("the pod of %s: %q %v", dst, dstPod, err)
	}
	c.inbound = count(dstPod, "inbound")
	return c
}

// carried is the bypass detector: an error unless pod's sidecar carried
// at least want more connections to dst outbound than in before, and the
// destination's sidecar as many inbound. An app connection that goes
// around a sidecar reaches the server without a log line there.
func carried(t *testing.T, n *nodeharness.Node, pod, dst string, before sidecarCounts, want int) error {
	t.Helper()
	return carriedWithin(t, n, pod, dst, before, want, 10)
}

// carriedWithin is carried, waiting up to seconds for the log lines.
func carriedWithin(t *testing.T, n *nodeharness.Node, pod, dst string, before sidecarCounts, want, seconds int) error {
	t.Helper()
	var now sidecarCounts
	// haproxy logs when a connection ends; give the logs a moment.
	for range seconds {
		now = sidecarConnCounts(t, n, pod, dst)
		if now.outbound-before.outbound >= want && now.inbound-before.inbound >= want {
			return nil
		}
		time.Sleep(time.Second)
	}
	return fmt.Errorf("connections to %s bypassed a sidecar: %d made, %s's sidecar carried %d outbound, the destination's %d inbound",
		dst, want, pod, now.outbound-before.outbound, now.inbound-before.inbound)
}

func dropInitContainers(t *testing.T, manifest string) string {
	t.Helper()
	var pod corev1.Pod
	if err := yaml.Unmarshal([]byte(manifest), &pod); err != nil {
		t.Fatal(err)
	}
	pod.Spec.InitContainers = nil
	out, err := yaml.Marshal(&pod)
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}
