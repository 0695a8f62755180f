//go:build linux

package run

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/sidelane/sidelane/agent/datapath/ebpf"
	"github.com/sidelane/sidelane/agent/datapath/iptables"
	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/bench/report"
	"github.com/sidelane/sidelane/bpf"
	"github.com/sidelane/sidelane/internal/istioref"
	"github.com/sidelane/sidelane/internal/podnet"
	"github.com/sidelane/sidelane/istio/capture"
)

// Sidecar ports and identity, as Istio's.
const (
	proxyUID   = 1337
	serverPort = 8080
)

// Contender is one way of carrying pod-to-pod traffic.
type Contender struct {
	Name string
	// Sidecar says whether its pods run the haproxy sidecar.
	Sidecar bool
	// explicit: the sidecars proxy to fixed upstreams and apps dial their
	// own sidecar (no capture at all): the floor of any capture.
	explicit bool
	// unix: explicit, and every hop a Unix stream socket (app -> client
	// sidecar -> server sidecar -> app): no TCP/IP at all, the floor of
	// any transport between these two proxies (a shortcut included).
	unix bool
	// Cgroup is where its pods' processes run: a cgroup of its own under
	// the bench's subtree, for CPU accounting (and eBPF attachment).
	Cgroup string
	// install captures the pod's traffic with the given annotations.
	install func(tb podnet.TB, pod *Pod, annotations map[string]string)
	// remote is how the second node captures, when it differs: the eBPF
	// contenders have an agent (a Load, a cgroup) per node, so a
	// cross-node pair is never treated as same-node.
	remote *Contender
	// nodeProxy is the per-node contender's node proxy (nil otherwise).
	nodeProxy *benchNodeProxy
}

// cgroups are the cgroups its pods and proxies run in, on both nodes.
func (c *Contender) cgroups() []string {
	var out []string
	for _, x := range []*Contender{c, c.remote} {
		if x != nil && x.Cgroup != "" && !slices.Contains(out, x.Cgroup) {
			out = append(out, x.Cgroup)
		}
	}
	return out
}

// Pod is a benchmark pod: a netns on the mesh's bridge and, for contenders
// with a sidecar, haproxy's stats socket.
type Pod struct {
	NS     *podnet.NS
	Stats  string
	Cgroup string
	// Dir holds the Unix sockets of a unix contender's pod: out.sock and
	// in.sock (its sidecar's listeners), app.sock (a server's app).
	Dir string
}

// Pair is a contender's client pod and server pod, with the server running.
// ClientC is the client's contender when it differs from C (a cross-node
// client of an eBPF or per-node contender: the other node's capture).
type Pair struct {
	C, ClientC     *Contender
	Client, Server *Pod
}

// Mesh is the simulated node: every contender's pods on one bridge, and a
// second node (bridge) joined to it for cross-node clients.
type Mesh struct {
	tb       podnet.TB
	net      *podnet.Net
	remote   *podnet.Net
	benchBin string
	log      *slog.Logger
	// pin puts each pod's processes on a fixed core (see serverCPU).
	pin bool
	// cgroupRoot is the bench's cgroup v2 subtree: one child per contender
	// and node.
	cgroupRoot string
	// Contenders that could be set up, and why the others could not.
	Contenders []*Contender
	Pending    map[string]string
}

// MeshConfig says what the mesh needs.
type MeshConfig struct {
	BenchBin   string // sidelane-bench, started in pods
	PilotAgent string // Istio's pilot-agent ("" or missing: istio-iptables pending)
	// Shortcut is the agent's default of --enable-shortcut: sidelane-ebpf
	// runs with it, the other setting is measured as its own contender.
	Shortcut bool
	// PinCPUs runs every client pod's processes (app and sidecar) on core
	// 0 and every server pod's on core 1 (node proxies: node 2's on 0,
	// node 1's on 1), the same for every contender. Unpinned, where the
	// scheduler puts a pipeline's four processes changes from batch to
	// batch, and stream throughput with it (bimodal batches, see the
	// README). Ignored on a machine with fewer than two cores.
	PinCPUs bool
	Log     *slog.Logger
}

// The cores of a pinned mesh.
const (
	clientCPU = "0"
	serverCPU = "1"
)

// AltEBPF is the name of the eBPF contender with the non-default shortcut
// setting.
func AltEBPF(shortcutDefault bool) string {
	if shortcutDefault {
		return report.EBPFNoShortcut
	}
	return report.EBPFShortcut
}

// NewMesh builds the node and every contender it can. Every contender's
// processes run in their own cgroup under a fresh subtree of the cgroup v2
// mount (CPU accounting; eBPF ones attach there), never the machine's root
// cgroup; eBPF ones get their own pin dir.
func NewMesh(tb podnet.TB, cfg MeshConfig) *Mesh {
	tb.Helper()
	m := &Mesh{tb: tb, net: podnet.New(tb), benchBin: cfg.BenchBin, log: cfg.Log, Pending: map[string]string{},
		pin: cfg.PinCPUs && runtime.NumCPU() >= 2}
	mnt, err := bpf.CgroupV2Mount()
	if err != nil {
		tb.Fatalf("cgroup v2: %v", err)
	}
	m.cgroupRoot = filepath.Join(mnt, podnet.UniqueName("sidelane-bench-"))
	if err := os.Mkdir(m.cgroupRoot, 0o755); err != nil {
		tb.Fatalf("create cgroup: %v", err)
	}
	// Registered first, so it runs last: after every child is gone.
	tb.Cleanup(func() { removeCgroup(m.cgroupRoot) })
	m.remote = podnet.New(tb)
	for m.remote.Subnet4 == m.net.Subnet4 {
		m.remote = podnet.New(tb) // the first one is cleaned up with the others
	}
	m.net.Join(m.remote)
	m.Contenders = append(m.Contenders, &Contender{Name: report.NoMesh, Cgroup: m.cgroup(report.NoMesh)})
	m.Contenders = append(m.Contenders, &Contender{Name: report.Explicit, Sidecar: true, explicit: true, Cgroup: m.cgroup(report.Explicit)})
	m.Contenders = append(m.Contenders, &Contender{Name: report.ExplicitUnix, Sidecar: true, explicit: true, unix: true, Cgroup: m.cgroup(report.ExplicitUnix)})
	if _, err := os.Stat(cfg.PilotAgent); err == nil {
		m.Contenders = append(m.Contenders,
			&Contender{Name: report.IstioIptables, Sidecar: true, Cgroup: m.cgroup(report.IstioIptables), install: istioInstall(cfg.PilotAgent)},
			&Contender{Name: report.IstioNFTables, Sidecar: true, Cgroup: m.cgroup(report.IstioNFTables), install: istioInstall(cfg.PilotAgent, "--native-nftables")})
	} else {
		for _, n := range []string{report.IstioIptables, report.IstioNFTables} {
			m.Pending[n] = fmt.Sprintf("pilot-agent not built (hack/install-tools.sh istio): %v", err)
		}
	}
	ipt := iptables.New(cfg.Log)
	m.Contenders = append(m.Contenders, &Contender{Name: report.SidelaneIptables, Sidecar: true, Cgroup: m.cgroup(report.SidelaneIptables),
		install: func(tb podnet.TB, p *Pod, ann map[string]string) { enroll(tb, ipt, p, ann, "sidecar") }})
	for _, e := range []struct {
		name     string
		shortcut bool
	}{{report.SidelaneEBPF, cfg.Shortcut}, {AltEBPF(cfg.Shortcut), !cfg.Shortcut}} {
		var nodes [2]*Contender
		for i := range nodes {
			c, err := m.loadEBPF(tb, fmt.Sprintf("%s-node%d", e.name, i+1), e.shortcut)
			if err != nil {
				m.Pending[e.name] = "eBPF datapath not loadable here: " + err.Error()
				break
			}
			dp := ebpf.New(c.capture, cfg.Log)
			nodes[i] = &Contender{Name: e.name, Sidecar: true, Cgroup: c.cgroup,
				install: func(tb podnet.TB, p *Pod, ann map[string]string) { enroll(tb, dp, p, ann, "sidecar") }}
		}
		if nodes[1] != nil {
			nodes[0].remote = nodes[1]
			m.Contenders = append(m.Contenders, nodes[0])
		}
	}
	local, err := m.addPerNode(tb, m.net, 1)
	var remote *Contender
	if err == nil {
		remote, err = m.addPerNode(tb, m.remote, 2)
	}
	if err != nil {
		m.Pending[report.PerNode] = "per-node contender not set up: " + err.Error()
	} else {
		local.remote = remote
		m.Contenders = append(m.Contenders, local)
	}
	return m
}

// cgroup creates the bench subtree's child cgroup name.
func (m *Mesh) cgroup(name string) string {
	cg := filepath.Join(m.cgroupRoot, name)
	if err := os.Mkdir(cg, 0o755); err != nil {
		m.tb.Fatalf("create cgroup: %v", err)
	}
	// Registered before the processes started in it, so it runs after
	// they were stopped.
	m.tb.Cleanup(func() { removeCgroup(cg) })
	return cg
}

type loaded struct {
	capture *bpf.Capture
	cgroup  string
}

// loadEBPF loads a capture attached to a new cgroup name of the bench's
// subtree.
func (m *Mesh) loadEBPF(tb podnet.TB, name string, shortcut bool) (*loaded, error) {
	cg := m.cgroup(name)
	c, err := bpf.Load(bpf.Config{Cgroup: cg, PinDir: filepath.Join("/sys/fs/bpf", podnet.UniqueName("sidelane-bench-")),
		EnableShortcut: shortcut, Log: m.log})
	if err != nil {
		return nil, err
	}
	tb.Cleanup(func() {
		j := c.ShortcutJoins()
		m.log.Info("shortcut joins", "capture", name, "joined", j.Joined, "missed", j.Missed, "noNetns", j.NoNetns)
		if err := c.Uninstall(); err != nil {
			m.log.Warn("uninstall eBPF", "error", err)
		}
	})
	return &loaded{capture: c, cgroup: cg}, nil
}

// removeCgroup removes cg once its processes are gone (they were just
// killed and may take a moment to leave).
func removeCgroup(cg string) {
	for range 100 {
		if err := os.Remove(cg); err == nil || errors.Is(err, os.ErrNotExist) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// istioInstall runs Istio's own pilot-agent istio-iptables with
// istio-cni's flags (plus extra, e.g. --native-nftables) in the pod.
func istioInstall(pilotAgent string, extra ...string) func(podnet.TB, *Pod, map[string]string) {
	return func(tb podnet.TB, p *Pod, ann map[string]string) {
		tb.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		flags := append(istioref.Flags(capture.Pod{Annotations: ann}), extra...)
		out, err := p.NS.Command(ctx, pilotAgent, append([]string{"istio-iptables"}, flags...)...).CombinedOutput()
		if err != nil {
			tb.Fatalf("pilot-agent istio-iptables: %v\n%s", err, tailLines(string(out), 10))
		}
	}
}

type enroller interface {
	Enroll(ctx context.Context, e *store.Entry) error
	Unenroll(ctx context.Context, e store.Entry) error
	Verify(ctx context.Context, e store.Entry) error
}

// enroll captures the pod the way the agent does in mode ("sidecar" or
// "node"): parse the knobs, Enroll, Verify.
func enroll(tb podnet.TB, dp enroller, p *Pod, ann map[string]string, mode string) {
	tb.Helper()
	settings, _, err := capture.ParseOrDefaults(capture.Pod{Annotations: ann})
	if err != nil {
		tb.Fatalf("capture annotations: %v", err)
	}
	e := store.Entry{
		Key:     store.Key{Network: "bench", ContainerID: p.NS.Name, IfName: "eth0"},
		Netns:   p.NS.Path,
		IPs:     []netip.Prefix{netip.PrefixFrom(p.NS.IP4, 24), netip.PrefixFrom(p.NS.IP6, 64)},
		Mode:    mode,
		Capture: &settings,
	}
	ctx := context.Background()
	if err := dp.Enroll(ctx, &e); err != nil {
		tb.Fatalf("enroll %s: %v", p.NS.Name, err)
	}
	tb.Cleanup(func() { _ = dp.Unenroll(context.Background(), e) })
	if err := dp.Verify(ctx, e); err != nil {
		tb.Fatalf("verify %s: %v", p.NS.Name, err)
	}
}

// NewPod adds a pod for c on the node: its namespace, its sidecar, its
// capture.
func (m *Mesh) NewPod(c *Contender, prefix string, annotations map[string]string) *Pod {
	return m.newPod(m.net, c, prefix, annotations, nil)
}

// NewRemoteClient is a client pod for pr's contender on the other node,
// paired with pr's server.
func (m *Mesh) NewRemoteClient(pr *Pair) *Pair {
	c := pr.C
	if c.remote != nil {
		c = c.remote
	}
	if c.unix {
		m.tb.Fatalf("%s: Unix sockets do not cross nodes", c.Name)
	}
	return &Pair{C: pr.C, ClientC: c, Client: m.newPod(m.remote, c, "br", nil, pr.Server), Server: pr.Server}
}

// upstream is where an explicit-proxy client's sidecar sends everything:
// the server pod's sidecar's inbound listener.
func upstream(server *Pod) netip.AddrPort {
	return netip.AddrPortFrom(server.NS.IP4, capture.InboundPort)
}

// newPod makes a pod of c; server, when set, is the pod an explicit
// contender's sidecar sends everything to.
func (m *Mesh) newPod(net *podnet.Net, c *Contender, prefix string, annotations map[string]string, server *Pod) *Pod {
	tb := m.tb
	tb.Helper()
	p := &Pod{NS: net.Add(prefix), Cgroup: c.Cgroup}
	if m.pin {
		p.NS.CPUs = clientCPU
		if prefix == serverPrefix {
			p.NS.CPUs = serverCPU
		}
	}
	// Connection churn would run out of ports in TIME_WAIT otherwise.
	podnet.Run(tb, "ip", "netns", "exec", p.NS.Name, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=20000 65000")
	if c.Sidecar {
		p.Stats = filepath.Join(tb.TempDir(), "stats.sock")
		sc := podnet.Sidecar{UID: proxyUID, GID: proxyUID, OutPort: capture.OutboundPort, InPort: capture.InboundPort,
			Cgroup: c.Cgroup, StatsSocket: p.Stats}
		switch {
		case c.unix:
			p.Dir = socketDir(tb)
			up := ""
			if server != nil {
				up = server.Dir
			}
			startUnixSidecar(tb, p, sc, up)
		case c.explicit:
			up := netip.AddrPort{}
			if server != nil {
				up = upstream(server)
			}
			startExplicitSidecar(tb, p.NS, sc, up)
		default:
			p.NS.StartSidecar(tb, sc)
		}
	}
	if c.install != nil {
		c.install(tb, p, annotations)
	}
	return p
}

// explicitConfig is the sidecar's haproxy config (podnet.HAProxyConfig)
// with fixed upstreams instead of original destinations: outbound to up
// (the server's sidecar), inbound to the app on 127.0.0.1. Everything else
// (haproxy build, mode, timeouts, uid, source 127.0.0.6) is the same.
func explicitConfig(sc podnet.Sidecar, up netip.AddrPort) (string, error) {
	cfg := podnet.HAProxyConfig(sc)
	if !up.IsValid() {
		up = netip.MustParseAddrPort("127.0.0.1:9") // a server pod's sidecar sends nothing out
	}
	for _, r := range []struct{ old, new string }{
		{"backend orig_out\n  server orig 0.0.0.0\n", fmt.Sprintf("backend orig_out\n  server orig %s\n", up)},
		{"backend orig_in\n  server orig 0.0.0.0 source", fmt.Sprintf("backend orig_in\n  server orig 127.0.0.1:%d source", serverPort)},
	} {
		if !strings.Contains(cfg, r.old) {
			return "", fmt.Errorf("sidecar config lacks %q", r.old)
		}
		cfg = strings.Replace(cfg, r.old, r.new, 1)
	}
	return cfg, nil
}

// socketDir is a directory for a pod's Unix sockets that the proxy uid
// can reach (a test's TempDir is not: its parent is 0700).
func socketDir(tb podnet.TB) string {
	dir, err := os.MkdirTemp("", "sidelane-bench-sock-")
	if err == nil {
		err = os.Chmod(dir, 0o755)
	}
	if err != nil {
		tb.Fatalf("socket dir: %v", err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// unixConfig is explicitConfig over Unix sockets: the sidecar listens on
// dir/out.sock and dir/in.sock, sends outbound to upDir/in.sock (the
// server's sidecar; none for a server pod) and inbound to dir/app.sock.
func unixConfig(sc podnet.Sidecar, dir, upDir string) (string, error) {
	cfg := podnet.HAProxyConfig(sc)
	up := "unix@" + filepath.Join(dir, "none.sock") // a server pod's sidecar sends nothing out
	if upDir != "" {
		up = "unix@" + filepath.Join(upDir, "in.sock")
	}
	for _, r := range []struct{ old, new string }{
		{fmt.Sprintf("frontend outbound\n  bind 0.0.0.0:%d\n", sc.OutPort), fmt.Sprintf("frontend outbound\n  bind unix@%s mode 666\n", filepath.Join(dir, "out.sock"))},
		{fmt.Sprintf("frontend inbound\n  bind 0.0.0.0:%d\n", sc.InPort), fmt.Sprintf("frontend inbound\n  bind unix@%s mode 666\n", filepath.Join(dir, "in.sock"))},
		{"backend orig_out\n  server orig 0.0.0.0\n", fmt.Sprintf("backend orig_out\n  server orig %s\n", up)},
		{"backend orig_in\n  server orig 0.0.0.0 source 127.0.0.6\n", fmt.Sprintf("backend orig_in\n  server orig unix@%s\n", filepath.Join(dir, "app.sock"))},
	} {
		if !strings.Contains(cfg, r.old) {
			return "", fmt.Errorf("sidecar config lacks %q", r.old)
		}
		cfg = strings.Replace(cfg, r.old, r.new, 1)
	}
	return cfg, nil
}

func startUnixSidecar(tb podnet.TB, p *Pod, sc podnet.Sidecar, upDir string) {
	tb.Helper()
	cfg, err := unixConfig(sc, p.Dir, upDir)
	if err != nil {
		tb.Fatalf("unix sidecar: %v", err)
	}
	path := filepath.Join(tb.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		tb.Fatalf("write haproxy config: %v", err)
	}
	p.NS.StartListening(tb, sc.Cgroup, nil, "haproxy", "-db", "-f", path)
	waitSockets(tb, filepath.Join(p.Dir, "out.sock"), filepath.Join(p.Dir, "in.sock"))
}

// waitSockets returns once every path exists (a Unix listener is bound).
func waitSockets(tb podnet.TB, paths ...string) {
	tb.Helper()
	for _, path := range paths {
		var err error
		for range 400 {
			if _, err = os.Stat(path); err == nil {
				break
			}
			time.Sleep(25 * time.Millisecond)
		}
		if err != nil {
			tb.Fatalf("not listening: %v", err)
		}
	}
}

func startExplicitSidecar(tb podnet.TB, ns *podnet.NS, sc podnet.Sidecar, up netip.AddrPort) {
	tb.Helper()
	cfg, err := explicitConfig(sc, up)
	if err != nil {
		tb.Fatalf("explicit sidecar: %v", err)
	}
	path := filepath.Join(tb.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		tb.Fatalf("write haproxy config: %v", err)
	}
	ns.StartListening(tb, sc.Cgroup, []string{fmt.Sprintf("0.0.0.0:%d", sc.OutPort), fmt.Sprintf("0.0.0.0:%d", sc.InPort)}, "haproxy", "-db", "-f", path)
}

// serverPrefix names server pods' netns (clients: "bc", cross-node "br",
// exclusion scenarios "bx").
const serverPrefix = "bs"

// NewPair makes c's server pod (and starts the server), then its client.
func (m *Mesh) NewPair(c *Contender) *Pair {
	tb := m.tb
	tb.Helper()
	pr := &Pair{C: c, Server: m.NewPod(c, serverPrefix, nil)}
	if c.unix {
		app := filepath.Join(pr.Server.Dir, "app.sock")
		pr.Server.NS.StartListening(tb, pr.Server.Cgroup, nil, m.benchBin, "serve", "-listen", "unix:"+app)
		waitSockets(tb, app)
	} else {
		// Go listens on 0.0.0.0 with a dual-stack socket, which ss shows as *:port.
		pr.Server.NS.StartListening(tb, pr.Server.Cgroup, []string{fmt.Sprintf(":%d", serverPort)},
			m.benchBin, "serve", "-listen", fmt.Sprintf("0.0.0.0:%d", serverPort))
	}
	pr.Client = m.newPod(m.net, c, "bc", nil, pr.Server)
	return pr
}

// ServerAddr is where clients connect: the server pod's IP, as an app
// would dial it (capture, if any, takes it from there), or, for the
// explicit proxy, the client's own sidecar.
func (pr *Pair) ServerAddr() string {
	if pr.C.unix {
		return "unix:" + filepath.Join(pr.Client.Dir, "out.sock")
	}
	if pr.C.explicit {
		return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), capture.OutboundPort).String()
	}
	return netip.AddrPortFrom(pr.Server.NS.IP4, serverPort).String()
}

// Client runs a sidelane-bench traffic subcommand in pod (its netns and
// cgroup) and reads its result. The cpu.stat files of c's cgroups go to
// it as fds (ip netns exec remounts /sys), for its measured window's CPU.
func (m *Mesh) Client(ctx context.Context, c *Contender, pod *Pod, args ...string) (ClientResult, error) {
	var res ClientResult
	var files []*os.File
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	for _, cg := range c.cgroups() {
		f, err := os.Open(filepath.Join(cg, "cpu.stat"))
		if err != nil {
			return res, err
		}
		files = append(files, f)
	}
	if len(files) > 0 && args[0] != "connect" {
		args = append(args, "-cpu-fds", strconv.Itoa(len(files)))
	}
	cmd := pod.NS.Command(ctx, m.benchBin, args...)
	cmd.ExtraFiles = files
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	closeCg, err := podnet.InCgroup(cmd, pod.Cgroup)
	if err != nil {
		return res, err
	}
	out, err := cmd.Output()
	closeCg()
	if err != nil {
		return res, fmt.Errorf("%s %s: %w: %s", c.Name, strings.Join(args, " "), err, tailLines(stderr.String(), 5))
	}
	if err := json.Unmarshal(out, &res); err != nil {
		return res, fmt.Errorf("%s %s: parse output %q: %w", c.Name, args[0], tailLines(string(out), 3), err)
	}
	return res, nil
}

// CheckCaptured proves traffic from the client app to the server app
// passes both sidecars (the client's outbound listener and the server's
// inbound one), so a benchmark can never measure an uncaptured path and
// call it a mesh. It sends a few round trips and reads haproxy's counters.
func (m *Mesh) CheckCaptured(ctx context.Context, pr *Pair) error {
	if pr.C.nodeProxy != nil {
		return m.checkNodeProxies(ctx, pr)
	}
	if !pr.C.Sidecar {
		return nil
	}
	before, err := sessions(pr)
	if err != nil {
		return err
	}
	if _, err := m.Client(ctx, pr.C, pr.Client, "rr", "-addr", pr.ServerAddr(), "-size", "64", "-count", "10"); err != nil {
		return err
	}
	after, err := sessions(pr)
	if err != nil {
		return err
	}
	if after[0] <= before[0] {
		return fmt.Errorf("%s: the client's connection did not pass its sidecar's outbound listener (sessions %d -> %d)", pr.C.Name, before[0], after[0])
	}
	if after[1] <= before[1] {
		return fmt.Errorf("%s: the connection did not pass the server's sidecar inbound listener (sessions %d -> %d)", pr.C.Name, before[1], after[1])
	}
	return nil
}

// checkNodeProxies proves a per-node pair passes the client's node proxy
// (outbound) and, cross-node, the server's node proxy too (its in-pod
// inbound listener); same node it is one proxy hop, by design.
func (m *Mesh) checkNodeProxies(ctx context.Context, pr *Pair) error {
	client, server := pr.C.nodeProxy, pr.C.nodeProxy
	if pr.ClientC != nil && pr.ClientC.nodeProxy != nil {
		client = pr.ClientC.nodeProxy
	}
	read := func() (out, in int, err error) {
		cs, err := podnet.FrontendSessions(client.Stats)
		if err != nil {
			return 0, 0, err
		}
		ss, err := podnet.FrontendSessions(server.Stats)
		if err != nil {
			return 0, 0, err
		}
		for k, v := range ss {
			if strings.HasPrefix(k, "inbound") {
				in += v
			}
		}
		return cs["outbound"], in, nil
	}
	out0, in0, err := read()
	if err != nil {
		return err
	}
	if _, err := m.Client(ctx, pr.C, pr.Client, "rr", "-addr", pr.ServerAddr(), "-size", "64", "-count", "10"); err != nil {
		return err
	}
	out1, in1, err := read()
	if err != nil {
		return err
	}
	if out1 <= out0 {
		return fmt.Errorf("%s: the connection did not pass the client's node proxy (sessions %d -> %d)", pr.C.Name, out0, out1)
	}
	if client != server && in1 <= in0 {
		return fmt.Errorf("%s: the cross-node connection did not pass the server's node proxy (inbound sessions %d -> %d)", pr.C.Name, in0, in1)
	}
	return nil
}

// sessions is [client outbound, server inbound] sessions so far.
func sessions(pr *Pair) ([2]int, error) {
	var out [2]int
	cs, err := podnet.FrontendSessions(pr.Client.Stats)
	if err != nil {
		return out, err
	}
	ss, err := podnet.FrontendSessions(pr.Server.Stats)
	if err != nil {
		return out, err
	}
	return [2]int{cs["outbound"], ss["inbound"]}, nil
}

// conntrackCount is the number of conntrack entries in pod's netns (zero
// when netfilter never tracked anything there).
func conntrackCount(pod *Pod) (int, error) {
	n := 0
	err := pod.NS.Do(func() error {
		b, err := os.ReadFile("/proc/sys/net/netfilter/nf_conntrack_count")
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		n, err = strconv.Atoi(strings.TrimSpace(string(b)))
		return err
	})
	return n, err
}

func tailLines(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

// Session is a long-lived `sidelane-bench session` client in a pod: the
// runner hands it one short batch at a time (Do), alternating contenders
// batch by batch, so the machine's slow swings of load land on every
// contender alike and no batch pays a process start.
type Session struct {
	c     *Contender
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Scanner
	errs  *podnet.Buffer
	files []*os.File
}

// StartSession starts a session client for size-byte transfers to addr
// in pod (its netns and cgroup), reporting the CPU time of c's cgroups.
func (m *Mesh) StartSession(c *Contender, pod *Pod, addr string, size int) (*Session, error) {
	s := &Session{c: c, errs: &podnet.Buffer{}}
	for _, cg := range c.cgroups() {
		f, err := os.Open(filepath.Join(cg, "cpu.stat"))
		if err != nil {
			s.closeFiles()
			return nil, err
		}
		s.files = append(s.files, f)
	}
	s.cmd = pod.NS.Command(context.Background(), m.benchBin, "session", "-addr", addr, "-size", strconv.Itoa(size), "-cpu-fds", strconv.Itoa(len(s.files)))
	s.cmd.ExtraFiles = s.files
	s.cmd.Stderr = s.errs
	var err error
	if s.stdin, err = s.cmd.StdinPipe(); err != nil {
		s.closeFiles()
		return nil, err
	}
	stdout, err := s.cmd.StdoutPipe()
	if err != nil {
		s.closeFiles()
		return nil, err
	}
	s.out = bufio.NewScanner(stdout)
	s.out.Buffer(make([]byte, 1<<20), 64<<20)
	closeCg, err := podnet.InCgroup(s.cmd, pod.Cgroup)
	if err != nil {
		s.closeFiles()
		return nil, err
	}
	err = s.cmd.Start()
	closeCg()
	if err != nil {
		s.closeFiles()
		return nil, fmt.Errorf("start session: %w", err)
	}
	return s, nil
}

// Do runs one session command ("rr 1000", "stream 50ms", "crr 200ms 8").
func (s *Session) Do(command string) (ClientResult, error) {
	var res ClientResult
	if _, err := io.WriteString(s.stdin, command+"\n"); err != nil {
		return res, fmt.Errorf("%s session %s: %w: %s", s.c.Name, command, err, tailLines(s.errs.String(), 5))
	}
	if !s.out.Scan() {
		return res, fmt.Errorf("%s session %s: exited: %v %s", s.c.Name, command, s.out.Err(), tailLines(s.errs.String(), 5))
	}
	if err := json.Unmarshal(s.out.Bytes(), &res); err != nil {
		return res, fmt.Errorf("%s session %s: parse %q: %w", s.c.Name, command, tailLines(s.out.Text(), 3), err)
	}
	if res.Error != "" {
		return res, fmt.Errorf("%s session %s: %s", s.c.Name, command, res.Error)
	}
	return res, nil
}

// Close ends the session (EOF on its stdin) and waits for it.
func (s *Session) Close() {
	s.stdin.Close()
	done := make(chan struct{})
	go func() { _ = s.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = s.cmd.Process.Kill()
		<-done
	}
	s.closeFiles()
}

func (s *Session) closeFiles() {
	for _, f := range s.files {
		f.Close()
	}
}
