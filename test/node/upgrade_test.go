package node

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sidelane/sidelane/internal/nodeharness"
	"github.com/sidelane/sidelane/internal/testenv"
)

// upgradeArchive is the second image make node-e2e builds: the same code,
// another VERSION, so another image (tag and digest) for helm upgrade.
func upgradeArchive(t *testing.T) (archive, tag string) {
	t.Helper()
	p := filepath.Join(filepath.Dir(testenv.ToolBin(t)), "sidelane-image-upgrade.tar")
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("second image missing (make node-e2e builds it): %v", err)
	}
	_, tag, _ = strings.Cut(chartImage(t), ":")
	return p, tag + "-upgrade"
}

// podSh runs sh -c script (idempotent) in a pod's app container.
func podSh(t *testing.T, n *nodeharness.Node, pod, script string) string {
	t.Helper()
	out, err := kubectlRetry(t, n, "exec", "-n", "shop", pod, "-c", "app", "--", "sh", "-c", script)
	if err != nil {
		t.Fatalf("exec in %s: %s: %v\n%s", pod, script, err, out)
	}
	return strings.TrimSpace(out)
}

// kubectlRetry runs an idempotent kubectl command, again (twice at most,
// a second apart, each logged) when kubectl itself failed: the API
// server, kubelet or the runtime's streaming did not answer. A command
// that ran in the container and failed ("command terminated with exit
// code") is not retried.
func kubectlRetry(t *testing.T, n *nodeharness.Node, args ...string) (string, error) {
	t.Helper()
	for attempt := 1; ; attempt++ {
		out, err := n.Kubectl(args...)
		if err == nil || attempt == 3 || strings.Contains(err.Error(), "command terminated with exit code") {
			return out, err
		}
		t.Logf("kubectl failed (attempt %d of 3, retrying): %v", attempt, err)
		time.Sleep(time.Second)
	}
}

func podSize(t *testing.T, n *nodeharness.Node, pod, file string) int {
	t.Helper()
	v, err := strconv.Atoi(podSh(t, n, pod, "wc -c < "+file))
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// streamPods starts shop/stream-server (receives one TCP stream on 9000
// into /tmp/recv) and shop/stream-client: on /tmp/go it streams random
// chunks to the server through both sidecars, keeping a copy in
// /tmp/sent, and in parallel opens a new connection to web every 0.3 s
// (one line per attempt, ok or fail, in /tmp/loop.log), both until
// /tmp/stop. (busybox nc stops reading the socket at EOF on its stdin:
// the server's stdin is a pipe that never ends.)
func streamPods(t *testing.T, n *nodeharness.Node, webIP string) (serverIP string) {
	t.Helper()
	apply(t, n, injectedPodCmd(t, "sidecar-classic.yaml", "stream-server", true,
		`mkdir -p /tmp; sleep 2147483647 | nc -l -p 9000 > /tmp/recv; echo "nc exit $?" > /tmp/recv.done; exec sleep 2147483647`))
	serverIP = waitPodRunning(t, n, "shop", "stream-server")
	apply(t, n, injectedPodCmd(t, "sidecar-classic.yaml", "stream-client", true, `mkdir -p /tmp
head -c 16384 /dev/urandom > /tmp/chunk
until [ -e /tmp/go ]; do sleep 0.2; done
(i=0; while [ ! -e /tmp/stop ]; do i=$((i+1))
  if printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 `+webIP+` 8080 | grep -q '^web$'; then echo "ok $i"; else echo "fail $i"; fi
  sleep 0.3; done > /tmp/loop.log) &
(while [ ! -e /tmp/stop ]; do cat /tmp/chunk; sleep 0.02; done) | tee /tmp/sent | nc `+serverIP+` 9000
echo "nc exit $?" > /tmp/sent.done
exec sleep 2147483647`))
	waitPodRunning(t, n, "shop", "stream-client")
	return serverIP
}

// testUpgradeUnderStream: helm upgrade to a second image (same code,
// another build) while a long TCP stream runs between two injected pods
// through both sidecars: the DaemonSet and the controller Deployment
// roll; the stream loses no byte (size and MD5 end to end) and never
// breaks; every connection opened during the roll is either carried by
// both sidecars or refused (fail closed) and succeeds on retry.
func testUpgradeUnderStream(t *testing.T, n *nodeharness.Node, chart string) {
	archive, tag := upgradeArchive(t)
	if err := n.ImportImage(archive); err != nil {
		t.Fatal(err)
	}
	upgradeUnderStream(t, n, chart, tag)
}

// upgradeUnderStream is testUpgradeUnderStream's roll to the imported
// image tag.
func upgradeUnderStream(t *testing.T, n *nodeharness.Node, chart, tag string) {
	webIP, err := n.Kubectl("get", "pod", "-n", "shop", "web", "-o", "jsonpath={.status.podIP}")
	if err != nil || webIP == "" {
		t.Fatalf("web's IP: %q %v", webIP, err)
	}
	serverIP := streamPods(t, n, webIP)
	// On failure, once, while the stream pods are still there (a Fatal
	// skips their deletion below; an Error checks before it).
	diagnosed := false
	diagnose := func() {
		if t.Failed() && !diagnosed {
			diagnosed = true
			upgradeDiagnostics(t, n)
		}
	}
	t.Cleanup(diagnose)
	web := webIP + ":8080"
	before := sidecarConnCounts(t, n, "stream-client", web)
	podSh(t, n, "stream-client", "touch /tmp/go")
	waitFor(t, "the stream flowing", func() string {
		if s := podSize(t, n, "stream-server", "/tmp/recv"); s == 0 {
			return "nothing received yet"
		}
		return ""
	})
	// While it flows: the client pod's sockets to the server are its
	// sidecar's (uid 1337), none the app's (haproxy logs a connection
	// only once it ends, so this is the bypass check for the stream
	// itself, taken before the roll).
	if uids, table := tcpOwners(t, n, "stream-client", serverIP+":9000"); len(uids) == 0 || slices.ContainsFunc(uids, func(u int) bool { return u != 1337 }) {
		t.Errorf("the stream before the roll: stream-client's established sockets to %s:9000 belong to uids %v, want only the sidecar's 1337 (an app socket there went around the sidecar)\n%s", serverIP, uids, table)
	}
	oldAgent := podImages(t, n, "app.kubernetes.io/component=agent")
	oldCtrl := podImages(t, n, "app.kubernetes.io/component=controller")
	atStart := podSize(t, n, "stream-server", "/tmp/recv")

	// The old agent's log, to its end (its pod and log go with the roll).
	var oldLog bytes.Buffer
	follow := n.Exec(filepath.Join(tools(t).KubeDir, "kubectl"), "-n", releaseNS, "logs", "-f", "daemonset/sidelane", "-c", "agent")
	follow.Stdout, follow.Stderr = &oldLog, &oldLog
	if err := follow.Start(); err != nil {
		t.Fatal(err)
	}
	followed := make(chan error, 1)
	go func() { followed <- follow.Wait() }()
	t.Cleanup(func() {
		_ = follow.Process.Kill()
		<-followed
		if t.Failed() {
			t.Logf("--- the old agent's log\n%s", testenv.LastLines(oldLog.String(), 60))
		}
	})
	addsBefore := taintAdditions(t, n)
	helm(t, n, append([]string{"upgrade", "sidelane", chart, "--wait", "--timeout", "5m", "--set", "image.tag=" + tag}, helmInstallArgs(n)...)...)
	for _, w := range []string{"daemonset/sidelane", "deployment/sidelane-controller"} {
		if out, err := n.Kubectl("-n", releaseNS, "rollout", "status", w, "--timeout=180s"); err != nil {
			t.Fatalf("%s after the upgrade: %v\n%s", w, err, out)
		}
	}
	// A graceful roll: the old agent taints the node as it stops, the new
	// one removes the taint once its pod is Ready; the controller's taint
	// loop has nothing to add.
	time.Sleep(3 * time.Second)
	if got := taintAdditions(t, n) - addsBefore; got != 0 {
		t.Errorf("the controller tainted the node %d times during a helm upgrade, want 0", got)
	}
	for sel, old := range map[string]string{"app.kubernetes.io/component=agent": oldAgent, "app.kubernetes.io/component=controller": oldCtrl} {
		now := podImages(t, n, sel)
		if now == old || strings.Contains(now, ":"+tag+" ") == false {
			t.Errorf("pods %s did not roll to the %s image: before %q, after %q", sel, tag, old, now)
		}
	}
	atEnd := podSize(t, n, "stream-server", "/tmp/recv")
	if atEnd <= atStart {
		t.Errorf("the stream did not flow across the roll: %d bytes received before, %d after", atStart, atEnd)
	}
	// A few more connections with the new agent, then stop.
	time.Sleep(2 * time.Second)
	podSh(t, n, "stream-client", "touch /tmp/stop")
	if done := podSh(t, n, "stream-client", "cat /tmp/sent.done 2>/dev/null || true"); done != "" && !strings.Contains(done, "exit 0") {
		t.Errorf("the streaming nc ended early: %s", done)
	}
	waitFor(t, "every byte sent received", func() string {
		sent, recv := podSize(t, n, "stream-client", "/tmp/sent"), podSize(t, n, "stream-server", "/tmp/recv")
		if sent != recv {
			return fmt.Sprintf("sent %d bytes, received %d", sent, recv)
		}
		return ""
	})
	sum := func(pod, f string) string { return strings.Fields(podSh(t, n, pod, "md5sum "+f))[0] }
	if s, r := sum("stream-client", "/tmp/sent"), sum("stream-server", "/tmp/recv"); s != r {
		t.Fatalf("stream corrupted: sent MD5 %s, received %s", s, r)
	}
	size := podSize(t, n, "stream-server", "/tmp/recv")
	// A long stream's session can end later than a short connection's
	// (haproxy's 30 s client/server timeouts bound a half-closed one);
	// tcpOwners above already checked it went through the sidecar.
	if err := carriedWithin(t, n, "stream-client", serverIP+":9000", sidecarCounts{}, 1, 40); err != nil {
		t.Errorf("the stream: %v", err)
	}

	loop := podSh(t, n, "stream-client", "cat /tmp/loop.log")
	var ok, failed int
	var last string
	for _, l := range strings.Split(loop, "\n") {
		switch {
		case strings.HasPrefix(l, "ok "):
			ok++
		case strings.HasPrefix(l, "fail "):
			failed++
		default:
			continue
		}
		last = l
	}
	if ok == 0 || !strings.HasPrefix(last, "ok ") {
		t.Fatalf("connections during the roll: %d ok, %d refused, last %q: a refused one never succeeded on retry", ok, failed, last)
	}
	if err := carried(t, n, "stream-client", web, before, ok); err != nil {
		t.Errorf("connections opened during the roll: %v", err)
	}
	t.Logf("helm upgrade to %s under a stream: %d bytes streamed intact through the roll; %d new connections carried by both sidecars, %d refused (fail closed) and retried",
		tag, size, ok, failed)
	diagnose()
	for _, p := range []string{"stream-client", "stream-server"} {
		if _, err := n.Kubectl("delete", "pod", "-n", "shop", p, "--wait=true", "--timeout=120s"); err != nil {
			t.Fatal(err)
		}
	}
}

// upgradeDiagnostics logs what a failed roll leaves to read: the stream
// pods' files and sidecar logs, the agent's logs (the rolled-out one's
// too), the pods and the recent events.
func upgradeDiagnostics(t *testing.T, n *nodeharness.Node) {
	t.Helper()
	show := func(what string, args ...string) {
		out, err := n.Kubectl(args...)
		t.Logf("--- %s (err %v)\n%s", what, err, testenv.LastLines(out, 40))
	}
	for _, p := range []string{"stream-client", "stream-server"} {
		show(p+" files", "exec", "-n", "shop", p, "-c", "app", "--", "sh", "-c",
			"ls -l /tmp; cat /tmp/sent.done /tmp/recv.done 2>&1; grep -c ok /tmp/loop.log; grep fail /tmp/loop.log; tail -3 /tmp/loop.log; true")
		show(p+" sidecar", "logs", "-n", "shop", p, "-c", "istio-proxy")
		show(p+" sidecar, previous container", "logs", "-n", "shop", p, "-c", "istio-proxy", "--previous")
	}
	show("web sidecar", "logs", "-n", "shop", "web", "-c", "istio-proxy")
	show("agent", "-n", releaseNS, "logs", "daemonset/sidelane", "-c", "agent")
	show("agent, previous container", "-n", releaseNS, "logs", "daemonset/sidelane", "-c", "agent", "--previous")
	show("pods", "get", "pods", "-A", "-o", "wide")
	show("events", "get", "events", "-A", "--sort-by=.lastTimestamp")
}

// podImages is "name=image " of each release pod matching sel, with its
// image ID.
func podImages(t *testing.T, n *nodeharness.Node, sel string) string {
	t.Helper()
	out, err := n.Kubectl("-n", releaseNS, "get", "pods", "-l", sel, "-o",
		`jsonpath={range .items[*]}{.metadata.name}={.spec.containers[0].image} {.status.containerStatuses[0].imageID} {end}`)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// testCrashedAgentRetaints: the agent's process SIGKILLed (no graceful
// stop, which would taint the node itself): the controller sees the pod
// not Ready and taints the node, with a Warning Event on the node and a
// count in sidelane_node_taint_changes_total; once the restarted agent is
// Ready the taint is gone again.
func testCrashedAgentRetaints(t *testing.T, n *nodeharness.Node) {
	agent := func(f string) string {
		out, err := n.Kubectl("-n", releaseNS, "get", "pods", "-l", "app.kubernetes.io/component=agent", "-o", "jsonpath={.items[0]."+f+"}")
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	restarts := agent(`status.containerStatuses[?(@.name=="agent")].restartCount`)
	id := strings.TrimPrefix(agent(`status.containerStatuses[?(@.name=="agent")].containerID`), "containerd://")
	if id == "" {
		t.Fatal("no agent container ID")
	}
	events := func() string {
		out, _ := notReadyEvents(n)
		return out
	}
	eventsBefore := events()
	addsBefore := taintAdditions(t, n)
	if out, err := n.Ctr("tasks", "kill", "--signal", "SIGKILL", id); err != nil {
		t.Fatalf("SIGKILL the agent: %v\n%s", err, out)
	}
	waitFor(t, "the controller's SidelaneAgentNotReady event on the node", func() string {
		if ev := events(); ev == eventsBefore {
			return fmt.Sprintf("events %q", ev)
		}
		return ""
	})
	t.Logf("after SIGKILL of the agent: %s", strings.TrimSpace(events()))
	if out, err := n.Kubectl("-n", releaseNS, "wait", "pod", "-l", "app.kubernetes.io/component=agent", "--for=condition=Ready", "--timeout=120s"); err != nil {
		t.Fatalf("agent not Ready again: %v\n%s", err, out)
	}
	if now := agent(`status.containerStatuses[?(@.name=="agent")].restartCount`); now == restarts {
		t.Errorf("the agent container did not restart (restartCount %s): the SIGKILL missed", now)
	}
	waitFor(t, "taint removed once the agent is Ready", func() string {
		out, _ := n.Kubectl("get", "node", n.Name, "-o", "jsonpath={.spec.taints}")
		if strings.Contains(out, "sidelane.io/agent-not-ready") {
			return "taints: " + out
		}
		return ""
	})
	// One addition for one crash: the restarted agent leaves the taint
	// until kubelet reports its pod Ready, so the controller never sees a
	// not-Ready agent pod on an untainted node again (before, it did, for
	// up to one readiness period, and tainted the node a second time).
	// The second addition, if any, precedes the Ready seen above; its
	// Event is posted asynchronously, hence the pause.
	time.Sleep(3 * time.Second)
	if got := taintAdditions(t, n) - addsBefore; got != 1 {
		t.Errorf("the controller tainted the node %d times for one agent crash, want 1 (a flap once the restarted agent was ready): %s", got, strings.TrimSpace(events()))
	}
	waitFor(t, "sidelane_node_taint_changes_total{action=\"added\"} on the leading controller", func() string {
		pods, err := n.Kubectl("-n", releaseNS, "get", "pods", "-l", "app.kubernetes.io/component=controller", "-o", "jsonpath={.items[*].metadata.name}")
		if err != nil {
			return err.Error()
		}
		var seen []string
		for _, p := range strings.Fields(pods) {
			m, err := n.Kubectl("get", "--raw", "/api/v1/namespaces/"+releaseNS+"/pods/"+p+":15096/proxy/metrics")
			if err != nil {
				seen = append(seen, p+": "+err.Error())
				continue
			}
			if l := grepLines(m, `sidelane_node_taint_changes_total{action="added"}`); l != "" && !strings.HasSuffix(l, " 0") {
				return ""
			}
			seen = append(seen, p+": "+grepLines(m, "sidelane_node_taint_changes_total"))
		}
		return strings.Join(seen, "; ")
	})
}

// testReboot: the node power-cycled (nodeharness.Reboot: every process of
// the runtime and its pods SIGKILLed, the bpffs and /run wiped, containerd
// and kubelet started again). kubelet recreates every sandbox, the agent's
// among them; sidelane-cni refuses the others until the agent is ready
// (fail closed, kubelet retries), so no pod's app runs uncaptured: every
// injected pod's istio-validation, which runs before the app in each new
// sandbox, passes the first time, including a pod created during the
// reboot; traffic goes through both sidecars again; the pins are back.
func testReboot(t *testing.T, n *nodeharness.Node) {
	pods := []string{"web", "web-client"}
	oldInit := map[string]string{}
	for _, p := range pods {
		out, _ := n.Kubectl("get", "pod", "-n", "shop", p, "-o", "jsonpath={.status.initContainerStatuses[0].containerID}")
		oldInit[p] = out
	}
	// The agent comes back last: its image is gone when kubelet starts
	// (ErrImageNeverPull) and returns once the other sandboxes have been
	// refused. (Left alone, the agent here usually wins the race.)
	agentImage, err := n.Kubectl("-n", releaseNS, "get", "daemonset", "sidelane", "-o", "jsonpath={.spec.template.spec.containers[0].image}")
	if err != nil || agentImage == "" {
		t.Fatalf("agent image: %q %v", agentImage, err)
	}
	archive := imageArchive(t)
	if strings.HasSuffix(agentImage, "-upgrade") {
		archive, _ = upgradeArchive(t)
	}
	if err := n.Reboot(func() error {
		_, err := n.Ctr("images", "rm", agentImage)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	apply(t, n, injectedPod(t, "sidecar-classic.yaml", "web-reboot", true))
	pods = append(pods, "web-reboot")
	waitFor(t, "sandboxes refused while the agent is not back", func() string {
		out, _ := n.Kubectl("get", "events", "-n", "shop", "--field-selector", "involvedObject.name=web,reason=FailedCreatePodSandBox", "-o", "jsonpath={.items[*].message}")
		if !strings.Contains(out, "sidelane") {
			return fmt.Sprintf("no FailedCreatePodSandBox naming sidelane for shop/web yet: %.300q", out)
		}
		t.Logf("after the reboot, with the agent not back, shop/web's sandbox is refused: %.400s", out)
		return ""
	})
	for _, p := range pods {
		if out, _ := n.Kubectl("get", "pod", "-n", "shop", p, "-o", "jsonpath={.status.initContainerStatuses[0].containerID}"); out != oldInit[p] && out != "" {
			t.Fatalf("%s's istio-validation ran again (%s) before the agent was back", p, out)
		}
	}
	if err := n.ImportImage(archive); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the agent pod recreated and Ready", func() string {
		out, err := n.Kubectl("-n", releaseNS, "wait", "pod", "-l", "app.kubernetes.io/component=agent", "--for=condition=Ready", "--timeout=5s")
		if err != nil {
			return fmt.Sprintf("%v %s", err, out)
		}
		return ""
	})
	for _, p := range pods {
		waitFor(t, p+"'s istio-validation run in a new sandbox", func() string {
			out, _ := n.Kubectl("get", "pod", "-n", "shop", p, "-o", `jsonpath={.status.initContainerStatuses[0].containerID} {.status.initContainerStatuses[0].state.terminated.exitCode} {.status.initContainerStatuses[0].lastState.terminated.exitCode}`)
			f := strings.Fields(out)
			if len(f) < 2 || f[0] == oldInit[p] {
				return "not yet: " + out
			}
			for _, code := range f[1:] {
				if code != "0" {
					logs, _ := n.Kubectl("logs", "-n", "shop", p, "-c", "istio-validation", "--previous")
					t.Fatalf("%s's istio-validation exited %s after the reboot: its sandbox ran uncaptured\n%s", p, code, logs)
				}
			}
			return ""
		})
		waitPodRunning(t, n, "shop", p)
	}
	webIP := waitPodRunning(t, n, "shop", "web")
	before := sidecarConnCounts(t, n, "web-client", webIP+":8080")
	out, err := n.Kubectl("exec", "-n", "shop", "web-client", "-c", "app", "--", "sh", "-c", `printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 5 `+webIP+` 8080`)
	if err != nil || !strings.Contains(out, "\nweb\n") {
		t.Fatalf("web-client app -> web after the reboot: %v\n%q", err, out)
	}
	if err := carried(t, n, "web-client", webIP+":8080", before, 1); err != nil {
		t.Error(err)
	}
	if out, err := n.Exec("sh", "-c", "ls "+n.BPFFS+"/sidelane").CombinedOutput(); err != nil || len(strings.Fields(string(out))) == 0 {
		t.Errorf("the agent's pins are not back after the reboot: %v\n%s", err, out)
	}
}

// notReadyEvents lists the node's SidelaneAgentNotReady Events (the
// controller's taint additions), one "<count> <message>" line each.
func notReadyEvents(n *nodeharness.Node) (string, error) {
	return n.Kubectl("get", "events", "-n", "default", "--field-selector", "involvedObject.kind=Node,involvedObject.name="+n.Name+",reason=SidelaneAgentNotReady", "-o", "jsonpath={range .items[*]}{.count} {.message}{\"\\n\"}{end}")
}

// taintAdditions is how many times the controller's taint loop has tainted
// the node: the summed counts of notReadyEvents (one per addition; Events
// outlive the controller pods a roll replaces, which the
// sidelane_node_taint_changes_total counter does not).
func taintAdditions(t *testing.T, n *nodeharness.Node) int {
	t.Helper()
	out, err := notReadyEvents(n)
	if err != nil {
		t.Fatalf("node events: %v\n%s", err, out)
	}
	sum := 0
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if l == "" {
			continue
		}
		f, _, _ := strings.Cut(l, " ")
		c, err := strconv.Atoi(f)
		if err != nil {
			t.Fatalf("event count in %q: %v", l, err)
		}
		sum += c
	}
	return sum
}

// tcpOwners reads /proc/net/tcp in pod's netns (through its app
// container) and returns the uids owning its established sockets whose
// remote end is dst (IPv4 ip:port), and the table for the failure text.
// The kernel's view, not the app's: connect4 makes an app's socket
// connect to the sidecar, so an app-owned socket to dst went around it.
func tcpOwners(t *testing.T, n *nodeharness.Node, pod, dst string) ([]int, string) {
	t.Helper()
	ap, err := netip.ParseAddrPort(dst)
	if err != nil || !ap.Addr().Is4() {
		t.Fatalf("tcpOwners: %q is not an IPv4 ip:port", dst)
	}
	b := ap.Addr().As4()
	// /proc/net/tcp prints the address as a host-order u32 (little-endian here).
	want := fmt.Sprintf("%02X%02X%02X%02X:%04X", b[3], b[2], b[1], b[0], ap.Port())
	table := podSh(t, n, pod, "cat /proc/net/tcp")
	var uids []int
	for _, l := range strings.Split(table, "\n") {
		f := strings.Fields(l)
		// sl local rem st queues timer retrnsmt uid ...
		if len(f) < 8 || f[2] != want || f[3] != "01" {
			continue
		}
		uid, err := strconv.Atoi(f[7])
		if err != nil {
			t.Fatalf("uid in /proc/net/tcp line %q: %v", l, err)
		}
		uids = append(uids, uid)
	}
	return uids, table
}
