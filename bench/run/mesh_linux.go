//go:build linux

package run

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
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
	// Cgroup is where its pods' processes run ("" = the runner's own).
	Cgroup string
	// install captures the pod's traffic with the given annotations.
	install func(tb podnet.TB, pod *Pod, annotations map[string]string)
	// remote is how the second node captures, when it differs: the eBPF
	// contenders have an agent (a Load, a cgroup) per node, so a
	// cross-node pair is never treated as same-node.
	remote *Contender
	// nodeProxy is the per-node contender's node proxy (nil otherwise);
	// noRemote, if set, says why cross-node pairs are not measured.
	nodeProxy *benchNodeProxy
	noRemote  string
}

// Pod is a benchmark pod: a netns on the mesh's bridge and, for contenders
// with a sidecar, haproxy's stats socket.
type Pod struct {
	NS     *podnet.NS
	Stats  string
	Cgroup string
}

// Pair is a contender's client pod and server pod, with the server running.
type Pair struct {
	C              *Contender
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
	// Contenders that could be set up, and why the others could not.
	Contenders []*Contender
	Pending    map[string]string
}

// MeshConfig says what the mesh needs.
type MeshConfig struct {
	BenchBin   string // sidelane-bench, started in pods
	PilotAgent string // Istio's pilot-agent ("" or missing: istio-iptables pending)
	Log        *slog.Logger
}

// NewMesh builds the node and every contender it can: eBPF ones get their
// own cgroup under a fresh subtree and their own pin dir, never the
// machine's root cgroup.
func NewMesh(tb podnet.TB, cfg MeshConfig) *Mesh {
	tb.Helper()
	m := &Mesh{tb: tb, net: podnet.New(tb), benchBin: cfg.BenchBin, log: cfg.Log, Pending: map[string]string{}}
	m.remote = podnet.New(tb)
	for m.remote.Subnet4 == m.net.Subnet4 {
		m.remote = podnet.New(tb) // the first one is cleaned up with the others
	}
	m.net.Join(m.remote)
	m.Contenders = append(m.Contenders, &Contender{Name: report.NoMesh})
	if _, err := os.Stat(cfg.PilotAgent); err == nil {
		m.Contenders = append(m.Contenders, &Contender{Name: report.IstioIptables, Sidecar: true, install: istioInstall(cfg.PilotAgent)})
	} else {
		m.Pending[report.IstioIptables] = fmt.Sprintf("pilot-agent not built (hack/install-tools.sh istio): %v", err)
	}
	ipt := iptables.New(cfg.Log)
	m.Contenders = append(m.Contenders, &Contender{Name: report.SidelaneIptables, Sidecar: true,
		install: func(tb podnet.TB, p *Pod, ann map[string]string) { enroll(tb, ipt, p, ann, "sidecar") }})
	for _, e := range []struct {
		name     string
		shortcut bool
	}{{report.SidelaneEBPF, true}, {report.EBPFNoShortcut, false}} {
		var nodes [2]*Contender
		for i := range nodes {
			c, err := m.loadEBPF(tb, e.shortcut)
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
	if c, err := m.addPerNode(tb); err != nil {
		m.Pending[report.PerNode] = "per-node contender not set up: " + err.Error()
	} else {
		m.Contenders = append(m.Contenders, c)
	}
	return m
}

type loaded struct {
	capture *bpf.Capture
	cgroup  string
}

func (m *Mesh) loadEBPF(tb podnet.TB, shortcut bool) (*loaded, error) {
	mnt, err := bpf.CgroupV2Mount()
	if err != nil {
		return nil, err
	}
	cg := filepath.Join(mnt, podnet.UniqueName("sidelane-bench-"))
	if err := os.Mkdir(cg, 0o755); err != nil {
		return nil, fmt.Errorf("create cgroup: %w", err)
	}
	// Registered first, so it runs last: after every process in it ended.
	tb.Cleanup(func() { removeCgroup(cg) })
	c, err := bpf.Load(bpf.Config{Cgroup: cg, PinDir: filepath.Join("/sys/fs/bpf", podnet.UniqueName("sidelane-bench-")),
		EnableShortcut: shortcut, Log: m.log})
	if err != nil {
		return nil, err
	}
	tb.Cleanup(func() {
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

func istioInstall(pilotAgent string) func(podnet.TB, *Pod, map[string]string) {
	return func(tb podnet.TB, p *Pod, ann map[string]string) {
		tb.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		flags := istioref.Flags(capture.Pod{Annotations: ann})
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
	return m.newPod(m.net, c, prefix, annotations)
}

// NewRemoteClient is a client pod for pr's contender on the other node,
// paired with pr's server.
func (m *Mesh) NewRemoteClient(pr *Pair) *Pair {
	c := pr.C
	if c.remote != nil {
		c = c.remote
	}
	return &Pair{C: pr.C, Client: m.newPod(m.remote, c, "br", nil), Server: pr.Server}
}

func (m *Mesh) newPod(net *podnet.Net, c *Contender, prefix string, annotations map[string]string) *Pod {
	tb := m.tb
	tb.Helper()
	p := &Pod{NS: net.Add(prefix), Cgroup: c.Cgroup}
	// Connection churn would run out of ports in TIME_WAIT otherwise.
	podnet.Run(tb, "ip", "netns", "exec", p.NS.Name, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=20000 65000")
	if c.Sidecar {
		p.Stats = filepath.Join(tb.TempDir(), "stats.sock")
		p.NS.StartSidecar(tb, podnet.Sidecar{UID: proxyUID, GID: proxyUID, OutPort: capture.OutboundPort, InPort: capture.InboundPort,
			Cgroup: c.Cgroup, StatsSocket: p.Stats})
	}
	if c.install != nil {
		c.install(tb, p, annotations)
	}
	return p
}

// NewPair makes c's client and server pods and starts the server.
func (m *Mesh) NewPair(c *Contender) *Pair {
	tb := m.tb
	tb.Helper()
	pr := &Pair{C: c, Client: m.NewPod(c, "bc", nil), Server: m.NewPod(c, "bs", nil)}
	// Go listens on 0.0.0.0 with a dual-stack socket, which ss shows as *:port.
	pr.Server.NS.StartListening(tb, pr.Server.Cgroup, []string{fmt.Sprintf(":%d", serverPort)},
		m.benchBin, "serve", "-listen", fmt.Sprintf("0.0.0.0:%d", serverPort))
	return pr
}

// ServerAddr is where clients connect: the server pod's IP, as an app
// would dial it (capture, if any, takes it from there).
func (pr *Pair) ServerAddr() string {
	return netip.AddrPortFrom(pr.Server.NS.IP4, serverPort).String()
}

// Client runs a sidelane-bench traffic subcommand in pod (its netns and
// cgroup) and reads its result.
func (m *Mesh) Client(ctx context.Context, c *Contender, pod *Pod, args ...string) (ClientResult, error) {
	var res ClientResult
	cmd := pod.NS.Command(ctx, m.benchBin, args...)
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
	if np := pr.C.nodeProxy; np != nil {
		// Same node, per-node to per-node: through the node proxy once.
		before, err := podnet.FrontendSessions(np.Stats)
		if err != nil {
			return err
		}
		if _, err := m.Client(ctx, pr.C, pr.Client, "rr", "-addr", pr.ServerAddr(), "-size", "64", "-count", "10"); err != nil {
			return err
		}
		after, err := podnet.FrontendSessions(np.Stats)
		if err != nil {
			return err
		}
		if after["outbound"] <= before["outbound"] {
			return fmt.Errorf("%s: the connection did not pass the node proxy (sessions %d -> %d)", pr.C.Name, before["outbound"], after["outbound"])
		}
		return nil
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
