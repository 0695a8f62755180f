package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/sidelane/sidelane/agent/cnirpc"
	"github.com/sidelane/sidelane/bpf"
	"github.com/sidelane/sidelane/internal/kubeharness"
	"github.com/sidelane/sidelane/internal/kubelet"
	"github.com/sidelane/sidelane/internal/testenv"
)

// AgentArgsEnv adds flags to every agent the e2e starts, e.g. to switch
// the datapath: SIDELANE_E2E_AGENT_ARGS="--datapath=ebpf".
const AgentArgsEnv = "SIDELANE_E2E_AGENT_ARGS"

// DatapathEnv=noop runs every agent with the no-op datapath (classification
// and the API only, for debugging); by default agents run the eBPF datapath
// attached to the test's own cgroup subtree.
const DatapathEnv = "SIDELANE_E2E_DATAPATH"

// testCgroup creates the test's own cgroup subtree; pods get children.
func testCgroup(t *testing.T) string {
	t.Helper()
	mnt, err := bpf.CgroupV2Mount()
	if err != nil {
		t.Fatal(err)
	}
	return testenv.Cgroup(t, mnt, "sidelane-e2e-")
}

// env is one e2e world: the API server, two simulated nodes, an agent per node.
type env struct {
	t       *testing.T
	cluster *kubeharness.Cluster
	cs      kubernetes.Interface
	nodes   []*kubelet.Node
	agents  map[string]*agentProc
	pinDirs map[string]string // node -> bpffs pin dir (eBPF datapath)
	bin     string
	cgroup  string
	dir     string
	// agentArgs adds flags for one node's agent (per-node mode tests).
	agentArgs func(*kubelet.Node) []string
}

// capturing reports whether the agents run a capture datapath (eBPF), so
// traffic really goes through the sidecars.
func (e *env) capturing() bool {
	return os.Getenv(DatapathEnv) != "noop" && !strings.Contains(os.Getenv(AgentArgsEnv), "--datapath")
}

func newEnv(t *testing.T, c *kubeharness.Cluster) *env {
	testenv.Privileged(t)
	bin := testenv.SidelaneBin(t)
	testenv.RequireTool(t, "bridge")
	testenv.RequireTool(t, "host-local")
	cs, err := kubernetes.NewForConfig(c.RESTConfig)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cg := testCgroup(t)
	nodes, err := kubelet.StartNodes(context.Background(), kubelet.Options{
		Client: cs, CNIBinDirs: []string{bin, testenv.ToolBin(t)}, CgroupParent: cg, Dir: dir,
	}, testenv.UniqueName("node-a-"), testenv.UniqueName("node-b-"))
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, cluster: c, cs: cs, nodes: nodes, agents: map[string]*agentProc{}, pinDirs: map[string]string{}, bin: bin, cgroup: cg, dir: dir}
	t.Cleanup(func() {
		for _, n := range nodes {
			n.Stop()
		}
		for _, a := range e.agents {
			a.stop(syscall.SIGTERM)
		}
		if t.Failed() {
			for _, n := range nodes {
				if b, err := os.ReadFile(filepath.Join(dir, n.Name, "agent.log")); err == nil {
					t.Logf("agent log of %s (tail):\n%s", n.Name, tail(string(b), 3000))
				}
				if b, err := os.ReadFile(n.PluginLog); err == nil {
					t.Logf("plugin log of %s (tail):\n%s", n.Name, tail(string(b), 2000))
				}
			}
		}
	})
	return e
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// agentProc is the real `sidelane agent` binary for one node.
type agentProc struct {
	node    *kubelet.Node
	cmd     *exec.Cmd
	done    chan struct{}
	metrics string
}

func freePort(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// startAgent starts node's agent and waits for /readyz.
func (e *env) startAgent(n *kubelet.Node) *agentProc {
	e.t.Helper()
	a := &agentProc{node: n, done: make(chan struct{}), metrics: freePort(e.t)}
	args := []string{"agent", "--socket", n.AgentSocket, "--state-dir", n.StateDir, "--kubeconfig", e.cluster.Kubeconfig,
		"--node-name", n.Name, "--metrics-addr", a.metrics, "--log-level", "debug"}
	extra := strings.Fields(os.Getenv(AgentArgsEnv))
	switch {
	case strings.Contains(os.Getenv(AgentArgsEnv), "--datapath"):
	case os.Getenv(DatapathEnv) == "noop":
		extra = append(extra, "--datapath", "noop")
	default:
		// The test's own cgroup subtree, never the machine's root, and
		// pins of this node's own that outlive agent restarts (as on a
		// real node) until the test ends.
		pin, ok := e.pinDirs[n.Name]
		if !ok {
			pin = filepath.Join("/sys/fs/bpf", testenv.UniqueName("sidelane-e2e-"))
			e.pinDirs[n.Name] = pin
			e.t.Cleanup(func() { _ = os.RemoveAll(pin) })
		}
		// Never the default "auto" without --cgroup-root: it would attach
		// to the machine's root cgroup.
		extra = append(extra, "--datapath", "ebpf", "--cgroup-root", e.cgroup, "--bpf-pin-dir", pin)
	}
	if e.agentArgs != nil {
		extra = append(extra, e.agentArgs(n)...)
	}
	args = append(args, extra...)
	a.cmd = exec.Command(filepath.Join(e.bin, "sidelane"), args...)
	logf, err := os.OpenFile(filepath.Join(filepath.Dir(n.StateDir), "agent.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		e.t.Fatal(err)
	}
	a.cmd.Stdout, a.cmd.Stderr = logf, logf
	a.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := a.cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	go func() { _ = a.cmd.Wait(); logf.Close(); close(a.done) }()
	e.agents[n.Name] = a
	e.eventually("agent on "+n.Name+" ready", func() bool { return a.httpOK("/readyz") })
	return a
}

func (a *agentProc) httpOK(path string) bool {
	c := &net.Dialer{Timeout: time.Second}
	conn, err := c.Dial("tcp", a.metrics)
	if err != nil {
		return false
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	fmt.Fprintf(conn, "GET %s HTTP/1.0\r\n\r\n", path)
	line, err := bufio.NewReader(conn).ReadString('\n')
	return err == nil && strings.Contains(line, " 200 ")
}

func (a *agentProc) metricsText(t *testing.T) string {
	conn, err := net.DialTimeout("tcp", a.metrics, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(conn, "GET /metrics HTTP/1.0\r\n\r\n")
	var b strings.Builder
	s := bufio.NewScanner(conn)
	s.Buffer(make([]byte, 1<<20), 1<<20)
	for s.Scan() {
		b.WriteString(s.Text() + "\n")
	}
	return b.String()
}

// stop ends the agent: SIGTERM is a graceful stop (taint re-added),
// SIGKILL a crash.
func (a *agentProc) stop(sig syscall.Signal) {
	select {
	case <-a.done:
		return
	default:
	}
	_ = a.cmd.Process.Signal(sig)
	select {
	case <-a.done:
	case <-time.After(15 * time.Second):
		_ = a.cmd.Process.Kill()
		<-a.done
	}
}

func (e *env) eventually(what string, cond func() bool) {
	e.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			e.t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (e *env) namespace(name string, labels map[string]string) {
	e.t.Helper()
	_, err := e.cs.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
}

// pod creates a pod bound to node; fixture pods (real injected specs)
// get a command so the simulated kubelet runs something.
func (e *env) pod(p *corev1.Pod, node *kubelet.Node) *corev1.Pod {
	e.t.Helper()
	p = p.DeepCopy()
	p.Spec.NodeName = node.Name
	p.ResourceVersion = ""
	// The ServiceAccount admission plugin is off in the harness; the
	// injected token volume needs the name it would have filled in.
	if p.Spec.ServiceAccountName == "" {
		p.Spec.ServiceAccountName = "default"
	}
	out, err := e.cs.CoreV1().Pods(p.Namespace).Create(context.Background(), p, metav1.CreateOptions{})
	if err != nil {
		e.t.Fatalf("create pod %s/%s: %v", p.Namespace, p.Name, err)
	}
	return out
}

func (e *env) running(p *corev1.Pod) *corev1.Pod {
	e.t.Helper()
	var got *corev1.Pod
	e.eventually("pod "+p.Namespace+"/"+p.Name+" running", func() bool {
		var err error
		got, err = e.cs.CoreV1().Pods(p.Namespace).Get(context.Background(), p.Name, metav1.GetOptions{})
		return err == nil && got.Status.Phase == corev1.PodRunning && got.Status.PodIP != ""
	})
	return got
}

// explain runs the real `sidelane explain` against node's agent.
func (e *env) explain(n *kubelet.Node, ns, name string) (*cnirpc.Explanation, string) {
	e.t.Helper()
	out, err := exec.Command(filepath.Join(e.bin, "sidelane"), "explain", "--socket", n.AgentSocket, "-o", "json", ns+"/"+name).CombinedOutput()
	if err != nil {
		e.t.Fatalf("sidelane explain %s/%s: %v\n%s", ns, name, err, out)
	}
	var ex cnirpc.Explanation
	if err := json.Unmarshal(out, &ex); err != nil {
		e.t.Fatalf("explain output: %v\n%s", err, out)
	}
	text, err := exec.Command(filepath.Join(e.bin, "sidelane"), "explain", "--socket", n.AgentSocket, ns+"/"+name).CombinedOutput()
	if err != nil {
		e.t.Fatalf("sidelane explain (text): %v\n%s", err, text)
	}
	return &ex, string(text)
}

func (e *env) mode(n *kubelet.Node, ns, name string) string {
	ex, _ := e.explain(n, ns, name)
	if len(ex.Attachments) != 1 {
		return fmt.Sprintf("<%d attachments>", len(ex.Attachments))
	}
	return ex.Attachments[0].Mode
}
