//go:build linux

package bpf

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/sidelane/sidelane/internal/podnet"
	"github.com/sidelane/sidelane/internal/testenv"
)

// The per-node topology: a netns the test creates plays the node's root
// netns ("host"), so nothing is bound or routed in the machine's own. It
// holds a bridge (gateway nodeGW, the node proxy's address) with four pods:
// A and B in per-node mode, P plain (not in the mesh), S with a sidecar
// (haproxy as uid 1337). A "remote" netns on an uplink plays another node
// (its sockets are outside the test cgroup, so only tc sees them). The node
// proxy is haproxy in the host netns and the test cgroup: outbound listener
// nodeGW:15001, one inbound listener per per-node pod on 15006 inside that
// pod's netns (created by the test and handed over as fd@N, as Envoy does
// with network_namespace_filepath), upstream connections from nodeGW. It
// logs "<frontend> <client> <original dst>" per connection.
var (
	nodeGW     = netip.MustParseAddr("10.210.0.1")
	nodeA      = netip.MustParseAddr("10.210.0.10")
	nodeB      = netip.MustParseAddr("10.210.0.11")
	plainP     = netip.MustParseAddr("10.210.0.12")
	sidecarS   = netip.MustParseAddr("10.210.0.13")
	uplinkHost = netip.MustParseAddr("10.211.0.1")
	remoteNode = netip.MustParseAddr("10.211.0.2")
)

const nodeInboundPort = 15006

// nodeGW6 is the bridge's IPv6 address; pods get fd10::<last byte of IPv4>.
var nodeGW6 = netip.MustParseAddr("fd10::1")

func v6Of(a netip.Addr) netip.Addr {
	b := nodeGW6.As16()
	b[15] = a.As4()[3]
	return netip.AddrFrom16(b)
}

type nodeEnv struct {
	t        *testing.T
	cgroup   string
	cgfd     int
	cap      *Capture
	host     string // netns names
	remote   string
	pods     map[string]string // pod name -> netns name
	ips      map[string]netip.Addr
	cookies  map[string]uint64
	hostCk   uint64
	proxy    *exec.Cmd
	proxyLog *podnet.Buffer
	sidecar  *exec.Cmd
}

func newNodeEnv(t *testing.T) *nodeEnv {
	testenv.Privileged(t)
	testenv.RequireTool(t, "haproxy")
	e := &nodeEnv{t: t, pods: map[string]string{}, cookies: map[string]uint64{},
		ips: map[string]netip.Addr{"A": nodeA, "B": nodeB, "P": plainP, "S": sidecarS}}
	mnt, err := CgroupV2Mount()
	if err != nil {
		t.Fatal(err)
	}
	e.cgroup = testenv.Cgroup(t, mnt, "sidelane-test-")
	e.cgfd, err = unix.Open(e.cgroup, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(e.cgfd) })
	var st unix.Statfs_t
	if err := unix.Statfs("/sys/fs/bpf", &st); err != nil || st.Type != unix.BPF_FS_MAGIC {
		testenv.SkipOrFail(t, "/sys/fs/bpf is not a bpffs mount")
	}
	pinDir := filepath.Join("/sys/fs/bpf", testenv.UniqueName("sidelane-test-"))

	e.host, e.remote = testenv.UniqueName("slhost"), testenv.UniqueName("slrnode")
	names := []string{e.host, e.remote}
	for _, p := range []string{"A", "B", "P", "S"} {
		e.pods[p] = testenv.UniqueName("slp" + strings.ToLower(p))
		names = append(names, e.pods[p])
	}
	for _, n := range names {
		run(t, "ip", "netns", "add", n)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", n).Run() })
	}
	h := e.host
	cmds := [][]string{
		{"ip", "-n", h, "link", "set", "lo", "up"},
		{"ip", "-n", h, "link", "add", "br0", "type", "bridge"},
		{"ip", "-n", h, "addr", "add", nodeGW.String() + "/24", "dev", "br0"},
		{"ip", "-n", h, "addr", "add", nodeGW6.String() + "/64", "dev", "br0", "nodad"},
		{"ip", "-n", h, "link", "set", "br0", "up"},
		{"ip", "netns", "exec", h, "sysctl", "-qw", "net.ipv4.ip_forward=1"},
		{"ip", "-n", h, "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", e.remote},
		{"ip", "-n", h, "addr", "add", uplinkHost.String() + "/24", "dev", "up0"},
		{"ip", "-n", h, "link", "set", "up0", "up"},
		{"ip", "-n", e.remote, "link", "set", "lo", "up"},
		{"ip", "-n", e.remote, "addr", "add", remoteNode.String() + "/24", "dev", "eth0"},
		{"ip", "-n", e.remote, "link", "set", "eth0", "up"},
		{"ip", "-n", e.remote, "route", "add", "10.210.0.0/24", "via", uplinkHost.String()},
	}
	for _, p := range []string{"A", "B", "P", "S"} {
		pn, veth := e.pods[p], "v"+strings.ToLower(p)
		cmds = append(cmds,
			[]string{"ip", "-n", h, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pn},
			[]string{"ip", "-n", h, "link", "set", veth, "master", "br0", "up"},
			[]string{"ip", "-n", pn, "link", "set", "lo", "up"},
			[]string{"ip", "-n", pn, "addr", "add", e.ips[p].String() + "/24", "dev", "eth0"},
			[]string{"ip", "-n", pn, "link", "set", "eth0", "up"},
			[]string{"ip", "-n", pn, "route", "add", "default", "via", nodeGW.String()},
			[]string{"ip", "-n", pn, "addr", "add", v6Of(e.ips[p]).String() + "/64", "dev", "eth0", "nodad"},
			[]string{"ip", "-n", pn, "-6", "route", "add", "default", "via", nodeGW6.String()},
		)
	}
	for _, c := range cmds {
		run(t, c...)
	}
	for p, n := range e.pods {
		if e.cookies[p], err = NetnsCookie("/var/run/netns/" + n); err != nil {
			t.Fatal(err)
		}
		e.serve(n, 8080)
	}
	if e.hostCk, err = NetnsCookie("/var/run/netns/" + h); err != nil {
		t.Fatal(err)
	}
	e.cap, err = Load(Config{Cgroup: e.cgroup, PinDir: pinDir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.cap.Uninstall(); err != nil {
			t.Errorf("uninstall: %v", err)
		}
		if _, err := os.Stat(pinDir); err == nil {
			t.Errorf("pin dir %s left behind", pinDir)
			os.RemoveAll(pinDir)
		}
	})
	if err := e.cap.SetNodeProxy(e.nodeProxy()); err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *nodeEnv) nodeProxy() NodeProxy {
	return NodeProxy{Netns: e.hostCk, IPv4: nodeGW, Port: 15001}
}

func (e *nodeEnv) serve(nsName string, port int) {
	e.t.Helper()
	l := e.listenIn(nsName, port)
	e.t.Cleanup(func() { l.Close() })
	go serveListener(l)
}

func (e *nodeEnv) listenIn(nsName string, port int) net.Listener {
	e.t.Helper()
	netns, err := ns.GetNS("/var/run/netns/" + nsName)
	if err != nil {
		e.t.Fatal(err)
	}
	defer netns.Close()
	var l net.Listener
	if err := netns.Do(func(ns.NetNS) error {
		var err error
		l, err = net.Listen("tcp4", fmt.Sprintf("0.0.0.0:%d", port))
		return err
	}); err != nil {
		e.t.Fatal(err)
	}
	return l
}

func (e *nodeEnv) enrollNode(p string) {
	e.t.Helper()
	pod, err := PlanNodePod([]netip.Prefix{netip.PrefixFrom(e.ips[p], 24), netip.PrefixFrom(v6Of(e.ips[p]), 64)},
		NodePodSettings{InboundPort: nodeInboundPort})
	if err != nil {
		e.t.Fatal(err)
	}
	e.put(p, pod)
}

func (e *nodeEnv) enrollSidecar(p string) {
	e.t.Helper()
	pod, err := PlanPod([]netip.Prefix{netip.PrefixFrom(e.ips[p], 24)}, defaultSettings())
	if err != nil {
		e.t.Fatal(err)
	}
	e.put(p, pod)
}

// put enrolls pod p as planned and attaches its inbound capture.
func (e *nodeEnv) put(p string, pod Pod) {
	e.t.Helper()
	if err := e.cap.Put(e.cookies[p], pod); err != nil {
		e.t.Fatal(err)
	}
	if err := e.cap.AttachInbound("/var/run/netns/"+e.pods[p], e.cookies[p], "eth0"); err != nil {
		e.t.Fatal(err)
	}
}

// startNodeProxy runs haproxy in the host netns and the test cgroup, with
// the inbound listeners of A and B created inside their netns.
func (e *nodeEnv) startNodeProxy() {
	e.t.Helper()
	var files []*os.File
	for _, p := range []string{"A", "B"} {
		l := e.listenIn(e.pods[p], nodeInboundPort)
		f, err := l.(*net.TCPListener).File()
		if err != nil {
			e.t.Fatal(err)
		}
		l.Close()
		files = append(files, f)
	}
	cfg := fmt.Sprintf(`global
  maxconn 200
  log stdout format raw local0
defaults
  mode tcp
  log global
  log-format "conn %%ft %%ci %%si:%%sp"
  timeout connect 3s
  timeout client 60s
  timeout server 60s
frontend outbound
  bind %s:15001
  default_backend orig
backend orig
  server orig 0.0.0.0 source %s
frontend inbound_A
  bind fd@3
  default_backend inorig
frontend inbound_B
  bind fd@4
  default_backend inorig
backend inorig
  server orig 0.0.0.0 source %s
`, nodeGW, nodeGW, nodeGW)
	path := filepath.Join(e.t.TempDir(), "node-proxy.cfg")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		e.t.Fatal(err)
	}
	cmd := exec.Command("ip", "netns", "exec", e.host, testenv.RequireTool(e.t, "haproxy"), "-db", "-f", path)
	cmd.ExtraFiles = files
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: e.cgfd}
	e.proxyLog = &podnet.Buffer{}
	cmd.Stdout, cmd.Stderr = e.proxyLog, e.proxyLog
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	// Only haproxy holds the inbound listeners now: when it dies they go.
	for _, f := range files {
		f.Close()
	}
	e.proxy = cmd
	e.t.Cleanup(func() { e.stopNodeProxy() })
	if !waitListenIn(e.host, 15001, true) {
		e.t.Fatalf("node proxy did not listen: %s", e.proxyLog.String())
	}
}

func (e *nodeEnv) stopNodeProxy() {
	if e.proxy == nil {
		return
	}
	e.proxy.Process.Kill()
	e.proxy.Wait()
	e.proxy = nil
	if !waitListenIn(e.host, 15001, false) || !waitListenIn(e.pods["A"], nodeInboundPort, false) {
		e.t.Error("node proxy still listening after being killed")
	}
}

// startSidecar runs haproxy as uid/gid 1337 in pod S, as Istio's sidecar.
func (e *nodeEnv) startSidecar() {
	e.t.Helper()
	cfg := `global
  uid 1337
  gid 1337
  maxconn 200
defaults
  mode tcp
  timeout connect 3s
  timeout client 60s
  timeout server 60s
frontend outbound
  bind 0.0.0.0:15001
  default_backend orig
backend orig
  server orig 0.0.0.0
frontend inbound
  bind 0.0.0.0:15006
  default_backend inorig
backend inorig
  server orig 0.0.0.0 source 127.0.0.6
`
	path := filepath.Join(e.t.TempDir(), "sidecar.cfg")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		e.t.Fatal(err)
	}
	cmd := exec.Command("ip", "netns", "exec", e.pods["S"], testenv.RequireTool(e.t, "haproxy"), "-db", "-f", path)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: e.cgfd}
	var logs podnet.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	if !waitListenIn(e.pods["S"], 15006, true) {
		e.t.Fatalf("sidecar did not listen: %s", logs.String())
	}
	e.sidecar = cmd
}

func waitListenIn(nsName string, port int, listening bool) bool {
	for i := 0; i < 100; i++ {
		out, _ := exec.Command("ip", "netns", "exec", nsName, "ss", "-Hltn", fmt.Sprintf("sport = :%d", port)).Output()
		if (len(strings.TrimSpace(string(out))) > 0) == listening {
			return true
		}
		time.Sleep(50 * time.Millisecond)
	}
	return false
}

// app runs the dial helper in pod p's netns and the test cgroup (as root,
// like an application: not the sidecar's uid).
func (e *nodeEnv) app(p, mode string, dst netip.AddrPort) *exec.Cmd {
	cmd := exec.Command("ip", "netns", "exec", e.pods[p], os.Args[0], "-test.run=^$", dst.String())
	cmd.Env = append(os.Environ(), helperEnv+"="+mode)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: e.cgfd}
	return cmd
}

func (e *nodeEnv) dial(p string, dst netip.AddrPort) (reply, error) {
	e.t.Helper()
	out, err := e.app(p, "dial", dst).CombinedOutput()
	if err != nil {
		return reply{}, fmt.Errorf("%w: %s", err, out)
	}
	return parseReply(e.t, string(out)), nil
}

// dialFrom connects from netns nsName with the test process's own socket,
// outside the test cgroup: another node, or the host itself (kubelet).
func (e *nodeEnv) dialFrom(nsName string, dst netip.AddrPort) (reply, error) {
	return dialFromNetns(e.t, "/var/run/netns/"+nsName, dst)
}

// proxyLines waits until the node proxy has logged n connections since
// mark (haproxy logs a TCP session when it ends, just after the client saw
// its reply), then a little longer so an unexpected extra line (a double
// capture) shows up too, and returns them.
func (e *nodeEnv) proxyLines(mark, n int) []string {
	e.t.Helper()
	for i := 0; i < 100 && len(e.loggedLines())-mark < n; i++ {
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond)
	lines := e.loggedLines()
	if len(lines) < mark {
		return nil
	}
	return lines[mark:]
}

func (e *nodeEnv) loggedLines() []string {
	var lines []string
	for _, l := range strings.Split(e.proxyLog.String(), "\n") {
		if strings.HasPrefix(l, "conn ") {
			lines = append(lines, strings.TrimPrefix(l, "conn "))
		}
	}
	return lines
}

func (e *nodeEnv) proxyMark() int { return len(e.loggedLines()) }

func TestPerNodeMode(t *testing.T) {
	e := newNodeEnv(t)
	e.startNodeProxy()
	e.startSidecar()
	e.enrollNode("A")
	e.enrollNode("B")
	e.enrollSidecar("S")

	at := func(a netip.Addr) netip.AddrPort { return ap(a, 8080) }
	// Each cell: who connects to whom, what the destination's server sees
	// as its peer (nodeGW: the node proxy's upstream; 127.0.0.6: S's
	// sidecar; else the client itself), and what the node proxy logged:
	// "<frontend> <client address> <original destination>", in order.
	tests := []struct {
		name     string
		from     string // pod name, or "remote" / "host" (outside the cgroup)
		to       netip.Addr
		wantPeer netip.Addr
		wantLog  []string
	}{
		{"per-node -> plain, same node", "A", plainP, nodeGW,
			[]string{fmt.Sprintf("outbound %s %s", nodeA, at(plainP))}},
		{"per-node -> per-node: the proxy once, not again inbound", "A", nodeB, nodeGW,
			[]string{fmt.Sprintf("outbound %s %s", nodeA, at(nodeB))}},
		{"per-node -> sidecar: node proxy, then the destination's sidecar", "A", sidecarS, netip.MustParseAddr("127.0.0.6"),
			[]string{fmt.Sprintf("outbound %s %s", nodeA, at(sidecarS))}},
		{"sidecar -> per-node: the sidecar, then the destination's node proxy", "S", nodeA, nodeGW,
			[]string{fmt.Sprintf("inbound_A %s %s", sidecarS, at(nodeA))}},
		{"plain pod -> per-node: the node proxy", "P", nodeA, nodeGW,
			[]string{fmt.Sprintf("inbound_A %s %s", plainP, at(nodeA))}},
		{"another node -> per-node: the destination node's proxy", "remote", nodeA, nodeGW,
			[]string{fmt.Sprintf("inbound_A %s %s", remoteNode, at(nodeA))}},
		{"host netns (kubelet probe) -> per-node: not captured", "host", nodeB, nodeGW, nil},
		{"plain pod -> plain pod: untouched", "P", sidecarS, netip.MustParseAddr("127.0.0.6"), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mark := e.proxyMark()
			var r reply
			var err error
			switch tt.from {
			case "remote":
				r, err = e.dialFrom(e.remote, at(tt.to))
			case "host":
				r, err = e.dialFrom(e.host, at(tt.to))
			default:
				r, err = e.dial(tt.from, at(tt.to))
			}
			if err != nil {
				t.Fatal(err)
			}
			if r.peer.Addr() != tt.wantPeer {
				t.Errorf("destination saw peer %s, want %s", r.peer.Addr(), tt.wantPeer)
			}
			if r.local != at(tt.to) {
				t.Errorf("destination reached at %s, want %s", r.local, at(tt.to))
			}
			if r.appPeer.IsValid() && r.appPeer != at(tt.to) {
				t.Errorf("client's getpeername %s, want the original destination %s", r.appPeer, at(tt.to))
			}
			got := e.proxyLines(mark, len(tt.wantLog))
			if strings.Join(got, "\n") != strings.Join(tt.wantLog, "\n") {
				t.Errorf("node proxy logged %q, want %q", got, tt.wantLog)
			}
		})
	}
	if c, err := e.cap.Counters(e.cookies["A"]); err != nil || c.RedirectedOutbound != 3 || c.RedirectedInbound != 3 {
		t.Errorf("pod A counters %+v (%v), want 3 outbound and 3 inbound redirects", c, err)
	}

	t.Run("node proxy down: fail closed, counted, back without agent action", func(t *testing.T) {
		before, err := e.cap.NodeCounters()
		if err != nil {
			t.Fatal(err)
		}
		e.stopNodeProxy()
		if _, err := e.dial("A", at(plainP)); err == nil || !strings.Contains(err.Error(), "connection refused") {
			t.Errorf("per-node pod with the node proxy down: %v, want connection refused", err)
		}
		if _, err := e.dialFrom(e.remote, at(nodeA)); err == nil {
			t.Error("another node reached a per-node pod with its node proxy down")
		}
		after, err := e.cap.NodeCounters()
		if err != nil {
			t.Fatal(err)
		}
		if after.Refused != before.Refused+1 {
			t.Errorf("refused counter %d -> %d, want +1", before.Refused, after.Refused)
		}
		e.startNodeProxy()
		if r, err := e.dial("A", at(plainP)); err != nil || r.peer.Addr() != nodeGW {
			t.Errorf("after the node proxy came back: %v, peer %v", err, r.peer)
		}
		if r, err := e.dialFrom(e.remote, at(nodeA)); err != nil || r.peer.Addr() != nodeGW {
			t.Errorf("inbound after the node proxy came back: %v, peer %v", err, r.peer)
		}
	})

	t.Run("no node proxy configured: refused", func(t *testing.T) {
		if err := e.cap.ClearNodeProxy(); err != nil {
			t.Fatal(err)
		}
		_, err := e.dial("A", at(plainP))
		if err == nil || !strings.Contains(err.Error(), "operation not permitted") {
			t.Errorf("per-node pod without a node proxy: %v, want operation not permitted", err)
		}
		if c, _ := e.cap.NodeCounters(); c.Unconfigured != 1 {
			t.Errorf("unconfigured counter %d, want 1", c.Unconfigured)
		}
		if err := e.cap.SetNodeProxy(e.nodeProxy()); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("mode toggles: new connections follow, established ones survive", func(t *testing.T) {
		// A stream opened in per-node mode, through the node proxy...
		stream := e.app("A", "stream", at(plainP))
		var out podnet.Buffer
		stream.Stdout, stream.Stderr = &out, &out
		mark := e.proxyMark()
		if err := stream.Start(); err != nil {
			t.Fatal(err)
		}
		// Wait until it is established to the node proxy.
		for i := 0; i < 100; i++ {
			o, _ := exec.Command("ip", "netns", "exec", e.pods["A"], "ss", "-Htn", "state", "established",
				fmt.Sprintf("dst %s:15001", nodeGW)).Output()
			if len(strings.TrimSpace(string(o))) > 0 {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		// ...survives A leaving the mesh (node -> none).
		if err := e.cap.Delete(e.cookies["A"]); err != nil {
			t.Fatal(err)
		}
		if r, err := e.dial("A", at(plainP)); err != nil || r.peer.Addr() != nodeA {
			t.Errorf("mode none: %v, peer %v; want direct from %s", err, r.peer, nodeA)
		}
		if r, err := e.dialFrom(e.remote, at(nodeA)); err != nil || r.peer.Addr() != remoteNode {
			t.Errorf("mode none, inbound: %v, peer %v; want direct from %s", err, r.peer, remoteNode)
		}
		if err := stream.Wait(); err != nil {
			t.Fatalf("stream across the toggle: %v: %s", err, out.String())
		}
		r := parseReply(t, out.String())
		if r.bytes != streamChunks*16<<10 || r.peer.Addr() != nodeGW {
			t.Errorf("stream across the toggle: %d bytes via %s, want %d via the node proxy", r.bytes, r.peer.Addr(), streamChunks*16<<10)
		}
		if got := e.proxyLines(mark, 1); len(got) != 1 || got[0] != fmt.Sprintf("outbound %s %s", nodeA, at(plainP)) {
			t.Errorf("node proxy logged %q for the stream", got)
		}
		// none -> node again, and sidecar -> node for S (its sidecar stays
		// up but is no longer used).
		e.enrollNode("A")
		if r, err := e.dial("A", at(plainP)); err != nil || r.peer.Addr() != nodeGW {
			t.Errorf("back to per-node: %v, peer %v", err, r.peer)
		}
		pod, err := PlanNodePod([]netip.Prefix{netip.PrefixFrom(sidecarS, 24)}, NodePodSettings{InboundPort: nodeInboundPort})
		if err != nil {
			t.Fatal(err)
		}
		if err := e.cap.Put(e.cookies["S"], pod); err != nil {
			t.Fatal(err)
		}
		mark = e.proxyMark()
		if r, err := e.dial("S", at(plainP)); err != nil || r.peer.Addr() != nodeGW {
			t.Errorf("sidecar -> per-node: %v, peer %v", err, r.peer)
		}
		if got := e.proxyLines(mark, 1); len(got) != 1 || got[0] != fmt.Sprintf("outbound %s %s", sidecarS, at(plainP)) {
			t.Errorf("node proxy logged %q for S after its switch to per-node", got)
		}
		// node -> sidecar for S: its own sidecar again.
		e.enrollSidecar("S")
		mark = e.proxyMark()
		if r, err := e.dial("S", at(plainP)); err != nil || r.peer.Addr() != sidecarS {
			t.Errorf("per-node -> sidecar: %v, peer %v; want %s (its sidecar)", err, r.peer, sidecarS)
		}
		if got := e.proxyLines(mark, 0); len(got) != 0 {
			t.Errorf("node proxy saw %q after S went back to its sidecar", got)
		}
	})

	t.Run("nothing left behind", func(t *testing.T) {
		for p, ck := range e.cookies {
			if err := e.cap.Delete(ck); err != nil {
				t.Fatalf("delete %s: %v", p, err)
			}
		}
		objs := e.cap.objs
		for name, n := range map[string]int{
			"pods": countEntries(t, objs.Pods), "cidrs": countEntries(t, objs.Cidrs), "ports": countEntries(t, objs.Ports),
			"pod_ips": countEntries(t, objs.PodIps), "pod_counters": countEntries(t, objs.PodCounters),
			"orig_by_tuple": drained(t, objs.OrigByTuple), "orig_by_cookie": drained(t, objs.OrigByCookie),
		} {
			if n != 0 {
				t.Errorf("%s: %d entries left", name, n)
			}
		}
		if pins, _ := e.cap.inboundPins(0); len(pins) != 0 {
			t.Errorf("inbound links left: %v", pins)
		}
	})
}

func TestNodeProxyCheck(t *testing.T) {
	good := NodeProxy{Netns: 1, IPv4: netip.MustParseAddr("10.0.0.1"), Port: 15001}
	tests := []struct {
		name    string
		mut     func(*NodeProxy)
		wantErr string
	}{
		{"valid", func(*NodeProxy) {}, ""},
		{"IPv6 only", func(n *NodeProxy) { n.IPv4 = netip.Addr{}; n.IPv6 = netip.MustParseAddr("fd00::1") }, ""},
		{"no netns", func(n *NodeProxy) { n.Netns = 0 }, "netns"},
		{"no port", func(n *NodeProxy) { n.Port = 0 }, "port"},
		{"no address", func(n *NodeProxy) { n.IPv4 = netip.Addr{} }, "at least one address"},
		{"IPv6 in the IPv4 field", func(n *NodeProxy) { n.IPv4 = netip.MustParseAddr("fd00::1") }, "ipv4"},
		{"unspecified", func(n *NodeProxy) { n.IPv4 = netip.IPv4Unspecified() }, "ipv4"},
		{"v4-mapped in the IPv6 field", func(n *NodeProxy) { n.IPv6 = netip.MustParseAddr("::ffff:10.0.0.1") }, "ipv6"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := good
			tt.mut(&n)
			err := n.Validate()
			if (err == nil) != (tt.wantErr == "") || (err != nil && !strings.Contains(err.Error(), tt.wantErr)) {
				t.Errorf("Validate() = %v, want error containing %q", err, tt.wantErr)
			}
		})
	}
}

// IPv6: the node proxy (a helper printing what SO_ORIGINAL_DST answers; haproxy
// reads it for IPv4 only) listens on the bridge's IPv6 address in the host
// netns. Without an IPv6 node proxy address, a per-node pod's IPv6 connect
// is refused.
func TestPerNodeModeIPv6(t *testing.T) {
	e := newNodeEnv(t)
	e.enrollNode("A")
	dst := netip.AddrPortFrom(v6Of(plainP), 8080)
	if _, err := e.dial("A", dst); err == nil || !strings.Contains(err.Error(), "operation not permitted") {
		t.Fatalf("IPv6 connect with an IPv4-only node proxy: %v, want operation not permitted", err)
	}
	np := e.nodeProxy()
	np.IPv6 = nodeGW6
	if err := e.cap.SetNodeProxy(np); err != nil {
		t.Fatal(err)
	}
	l := exec.Command("ip", "netns", "exec", e.host, os.Args[0], "-test.run=^$", netip.AddrPortFrom(nodeGW6, 15001).String())
	l.Env = append(os.Environ(), helperEnv+"=origdst")
	l.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: e.cgfd}
	var out podnet.Buffer
	l.Stdout, l.Stderr = &out, &out
	if err := l.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { l.Process.Kill(); l.Wait() }()
	if !waitListenIn(e.host, 15001, true) {
		t.Fatalf("helper did not listen: %s", out.String())
	}
	if _, err := e.dial("A", dst); err != nil {
		t.Fatal(err)
	}
	if err := l.Wait(); err != nil {
		t.Fatalf("node proxy helper: %v: %s", err, out.String())
	}
	if got, want := strings.TrimSpace(out.String()), "v4=error v6="+dst.String(); got != want {
		t.Errorf("SO_ORIGINAL_DST in the host netns: %q, want %q", got, want)
	}
	if n := drained(t, e.cap.objs.OrigByTuple); n != 0 {
		t.Errorf("orig_by_tuple: %d entries left", n)
	}
}
