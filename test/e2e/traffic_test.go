package e2e

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	corev1 "k8s.io/api/core/v1"

	"github.com/sidelane/sidelane/internal/kubelet"
	"github.com/sidelane/sidelane/internal/podnet"
)

// podRef is a running pod: where it runs and how to act as one of its
// processes.
type podRef struct {
	node   *kubelet.Node
	pod    *corev1.Pod
	netns  string
	cgroup string
	stats  string // sidecar stand-in's haproxy stats socket ("" without)
}

func (p *podRef) String() string { return p.pod.Namespace + "/" + p.pod.Name }

func (p *podRef) addr() string { return p.pod.Status.PodIP + ":8080" }

// run creates p on node with the stand-in containers (kubelet.WithStandIns)
// and waits until it runs and its listeners are up.
func (e *env) run(p *corev1.Pod, node *kubelet.Node) *podRef {
	e.t.Helper()
	p = p.DeepCopy()
	s, err := kubelet.WithStandIns(p, e.dir)
	if err != nil {
		e.t.Fatal(err)
	}
	return e.ref(e.running(e.pod(p, node)), node, s)
}

func (e *env) ref(p *corev1.Pod, node *kubelet.Node, s kubelet.StandIn) *podRef {
	e.t.Helper()
	r := &podRef{node: node, pod: p, stats: s.Stats}
	var ok bool
	if r.netns, ok = node.PodNetns(string(p.UID)); !ok {
		e.t.Fatalf("pod %s/%s has no sandbox on %s", p.Namespace, p.Name, node.Name)
	}
	if r.cgroup, ok = node.PodCgroup(string(p.UID)); !ok {
		e.t.Fatalf("pod %s/%s has no cgroup on %s", p.Namespace, p.Name, node.Name)
	}
	ports := []string{":8080"}
	if r.stats != "" {
		ports = append(ports, ":15001", ":15006")
	}
	e.eventually(fmt.Sprintf("%s listening on %v", r, ports), func() bool {
		ss, _ := exec.Command("ip", "netns", "exec", r.netns, "ss", "-Hltn").Output()
		for _, port := range ports {
			if !strings.Contains(string(ss), port+" ") {
				return false
			}
		}
		return true
	})
	return r
}

// clientCmd runs argv as one of from's processes: in its netns and born
// in its cgroup, so the pod's capture applies as to its app.
func clientCmd(t *testing.T, from *podRef, argv ...string) (*exec.Cmd, func()) {
	t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", from.netns}, argv...)...)
	closeCg, err := podnet.InCgroup(cmd, from.cgroup)
	if err != nil {
		t.Fatal(err)
	}
	return cmd, closeCg
}

// reply is what the echo app (kubelet.EchoCommand) answered.
type reply struct {
	peer string // the connection's source as the destination app saw it
	echo string
}

// send opens one connection from from's app to addr, sends line and
// returns the reply; err carries socat's output (e.g. "Operation not
// permitted" when capture fails closed).
func send(t *testing.T, from *podRef, addr, line string) (reply, error) {
	t.Helper()
	cmd, closeCg := clientCmd(t, from, "socat", "-T5", "-", "TCP:"+addr+",connect-timeout=5")
	defer closeCg()
	cmd.Stdin = strings.NewReader(line + "\n")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return reply{}, fmt.Errorf("%s -> %s: %w: %s", from, addr, err, strings.TrimSpace(string(out)))
	}
	peer, echo, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return reply{peer: strings.TrimPrefix(peer, "peer="), echo: strings.TrimSpace(echo)}, nil
}

// mustEcho is send that fails the test unless the line comes back.
func mustEcho(t *testing.T, from *podRef, addr, line string) reply {
	t.Helper()
	r, err := send(t, from, addr, line)
	if err != nil {
		t.Fatal(err)
	}
	if r.echo != line {
		t.Fatalf("%s -> %s: echoed %q, want %q", from, addr, r.echo, line)
	}
	return r
}

// conn is one long-lived connection from a pod's app.
type conn struct {
	t    *testing.T
	cmd  *exec.Cmd
	in   io.WriteCloser
	out  *bufio.Reader
	peer string
}

func dial(t *testing.T, from *podRef, addr string) *conn {
	t.Helper()
	cmd, closeCg := clientCmd(t, from, "socat", "-", "TCP:"+addr+",connect-timeout=5")
	defer closeCg()
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	outPipe, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &conn{t: t, cmd: cmd, in: in, out: bufio.NewReader(outPipe)}
	t.Cleanup(c.close)
	line, err := c.readLine()
	if err != nil || !strings.HasPrefix(line, "peer=") {
		t.Fatalf("%s -> %s: first line %q, %v", from, addr, line, err)
	}
	c.peer = strings.TrimPrefix(line, "peer=")
	return c
}

func (c *conn) readLine() (string, error) {
	type res struct {
		s   string
		err error
	}
	ch := make(chan res, 1)
	go func() {
		s, err := c.out.ReadString('\n')
		ch <- res{strings.TrimSpace(s), err}
	}()
	select {
	case r := <-ch:
		return r.s, r.err
	case <-time.After(10 * time.Second):
		return "", errors.New("no reply within 10s")
	}
}

// roundTrip checks the connection still carries data both ways.
func (c *conn) roundTrip(msg string) {
	c.t.Helper()
	if _, err := io.WriteString(c.in, msg+"\n"); err != nil {
		c.t.Fatalf("established connection: write %q: %v", msg, err)
	}
	if got, err := c.readLine(); err != nil || got != msg {
		c.t.Fatalf("established connection: got %q, %v; want %q", got, err, msg)
	}
}

func (c *conn) close() {
	if c.cmd.Process == nil || c.cmd.ProcessState != nil {
		return
	}
	c.in.Close()
	done := make(chan struct{})
	go func() { _ = c.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = c.cmd.Process.Kill()
		<-done
	}
}

// sessions reads a sidecar stand-in's accepted sessions per frontend.
func sessions(t *testing.T, p *podRef) map[string]int {
	t.Helper()
	m, err := podnet.FrontendSessions(p.stats)
	if err != nil {
		t.Fatalf("%s: %v", p, err)
	}
	return m
}

// bpfState is what an agent's eBPF datapath holds: the files pinned in its
// bpffs directory and, per pinned map, its number of entries.
type bpfState struct {
	pins    []string
	entries map[string]int
}

func (s bpfState) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "pins %v; entries", s.pins)
	keys := make([]string, 0, len(s.entries))
	for k := range s.entries {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		fmt.Fprintf(&b, " %s=%d", k, s.entries[k])
	}
	return b.String()
}

// readBPFState reads dir's pins with cilium/ebpf, independently of the
// agent: every pin's name, and every pinned map's key count.
func readBPFState(t *testing.T, dir string) bpfState {
	t.Helper()
	s := bpfState{entries: map[string]int{}}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		s.pins = append(s.pins, rel)
		m, err := ebpf.LoadPinnedMap(path, &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			return nil // a pinned link or program
		}
		defer m.Close()
		switch m.Type() {
		case ebpf.SkStorage:
			return nil // per-socket storage: freed with its sockets, not iterable
		case ebpf.RingBuf:
			return nil // the shortcut's join requests: a queue, not iterable
		}
		n := 0
		var key any
		for {
			next, err := m.NextKeyBytes(key)
			if err != nil {
				return fmt.Errorf("map %s: %w", rel, err)
			}
			if next == nil {
				break
			}
			n++
			key = next
			if n > 1<<20 {
				return fmt.Errorf("map %s: more than 2^20 keys", rel)
			}
		}
		s.entries[rel] = n
		return nil
	})
	if err != nil {
		t.Fatalf("read BPF pins in %s: %v", dir, err)
	}
	slices.Sort(s.pins)
	return s
}

// sameBPFState compares two states; arrays keep their size, so any
// difference is a leftover (or a missing) entry or pin.
func sameBPFState(a, b bpfState) bool {
	if !slices.Equal(a.pins, b.pins) || len(a.entries) != len(b.entries) {
		return false
	}
	for k, v := range a.entries {
		if b.entries[k] != v {
			return false
		}
	}
	return true
}

// checkBPFBackTo waits (sockets close asynchronously) until every node's
// BPF state equals start, and fails the test if it does not in 10s.
func (e *env) checkBPFBackTo(t *testing.T, start map[string]bpfState) {
	t.Helper()
	for _, n := range e.nodes {
		var now bpfState
		deadline := time.Now().Add(10 * time.Second)
		for {
			now = readBPFState(t, e.pinDirs[n.Name])
			if sameBPFState(start[n.Name], now) || time.Now().After(deadline) {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if !sameBPFState(start[n.Name], now) {
			t.Errorf("BPF state of %s not back to its start:\nstart %s\nnow   %s", n.Name, start[n.Name], now)
		} else {
			t.Logf("BPF state of %s back to its start: %s", n.Name, now)
		}
	}
}

func fileContains(path, substr string) bool {
	b, err := os.ReadFile(path)
	return err == nil && strings.Contains(string(b), substr)
}
