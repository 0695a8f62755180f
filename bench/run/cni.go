package run

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"

	"github.com/sidelane/sidelane/bench/loadgen"
	"github.com/sidelane/sidelane/bench/report"
	"github.com/sidelane/sidelane/bpf"
	"github.com/sidelane/sidelane/internal/agentproc"
)

// timingExec runs plugins like libcni's default executor and records how
// long each plugin binary took per command, so sidelane's share of the
// chain's latency is measured inside the real chain.
type timingExec struct {
	invoke.Exec
	mu  sync.Mutex
	per map[string][]time.Duration // "ADD sidelane-cni" -> durations
}

func newTimingExec() *timingExec {
	return &timingExec{
		Exec: &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}, PluginDecoder: version.PluginDecoder{}},
		per:  map[string][]time.Duration{},
	}
}

func (t *timingExec) ExecPlugin(ctx context.Context, path string, stdin []byte, env []string) ([]byte, error) {
	cmd := ""
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "CNI_COMMAND="); ok {
			cmd = v
		}
	}
	start := time.Now()
	out, err := t.Exec.ExecPlugin(ctx, path, stdin, env)
	d := time.Since(start)
	t.mu.Lock()
	t.per[cmd+" "+filepath.Base(path)] = append(t.per[cmd+" "+filepath.Base(path)], d)
	t.mu.Unlock()
	return out, err
}

// chain is a bridge + host-local + sidelane-cni network for benchmark pods,
// with its own agent process.
type chain struct {
	name, bridge string
	list         *libcni.NetworkConfigList
	cni          *libcni.CNIConfig
	exec         *timingExec
	agent        *agentproc.Proc
	// metrics is the agent's /metrics URL.
	metrics string
}

// chainOpts choose the chain's agent.
type chainOpts struct {
	// ebpf runs the agent with the real eBPF datapath (attached to a
	// cgroup subtree of its own, pins under a unique dir) and every pod in
	// sidecar mode with Istio's default capture, so ADD enrolls for real
	// (netns cookie, map writes, tc attach). Otherwise: the no-op datapath.
	ebpf bool
}

// newChain is a chain whose agent runs the no-op datapath.
func (r *Runner) newChain(ctx context.Context, subnet netip.Prefix) (*chain, error) {
	return r.newChainWith(ctx, subnet, chainOpts{})
}

func (r *Runner) newChainWith(ctx context.Context, subnet netip.Prefix, o chainOpts) (*chain, error) {
	dir, err := os.MkdirTemp("", "sidelane-bench-cni-")
	if err != nil {
		return nil, err
	}
	r.cleanup(func() { os.RemoveAll(dir) })
	c := &chain{name: uniqueName("slbench-"), bridge: uniqueName("slbb"), exec: newTimingExec()}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	c.metrics = fmt.Sprintf("http://127.0.0.1:%d/metrics", port)
	// The agent's defaults (info), not agentproc's debug logging.
	args := []string{"--log-level", "info", "--metrics-addr", fmt.Sprintf("127.0.0.1:%d", port)}
	if o.ebpf {
		eargs, err := r.ebpfNode()
		if err != nil {
			return nil, err
		}
		args = append(args, eargs...)
	}
	c.agent = agentproc.New(filepath.Join(r.cfg.SidelaneBin, "sidelane"), filepath.Join(dir, "agent"), args...)
	if err := c.agent.Start(ctx); err != nil {
		return nil, err
	}
	r.cleanup(c.agent.Stop)
	r.cleanup(func() {
		if l, err := netlink.LinkByName(c.bridge); err == nil {
			_ = netlink.LinkDel(l)
		}
	})
	raw, err := json.Marshal(map[string]any{
		"cniVersion": "1.0.0", "name": c.name,
		"plugins": []map[string]any{
			{"type": "bridge", "bridge": c.bridge, "isGateway": true, "ipam": map[string]any{
				"type": "host-local", "ranges": [][]map[string]string{{{"subnet": subnet.String()}}}, "dataDir": filepath.Join(dir, "ipam")}},
			{"type": "sidelane-cni", "agentSocket": c.agent.Socket},
		},
	})
	if err != nil {
		return nil, err
	}
	if c.list, err = libcni.ConfListFromBytes(raw); err != nil {
		return nil, err
	}
	c.cni = libcni.NewCNIConfigWithCacheDir([]string{r.cfg.SidelaneBin, r.cfg.ToolBin}, filepath.Join(dir, "cache"), c.exec)
	return c, nil
}

// ebpfNode makes a cgroup subtree and a pin dir for one agent's eBPF
// datapath and returns the agent's flags for them. The cleanups (run after
// the agent stopped) remove what the agent left pinned and the cgroup.
func (r *Runner) ebpfNode() ([]string, error) {
	mnt, err := bpf.CgroupV2Mount()
	if err != nil {
		return nil, err
	}
	cg := filepath.Join(mnt, uniqueName("sidelane-bench-cni-"))
	if err := os.Mkdir(cg, 0o755); err != nil {
		return nil, fmt.Errorf("create cgroup: %w", err)
	}
	r.cleanup(func() { removeCgroup(cg) })
	pin := filepath.Join("/sys/fs/bpf", uniqueName("sidelane-bench-cni-"))
	// Removing the pins drops the last reference to the agent's links
	// (it has exited by then), which detaches them.
	r.cleanup(func() { _ = os.RemoveAll(pin) })
	return []string{"--datapath", "ebpf", "--cgroup-root", cg, "--bpf-pin-dir", pin,
		"--standalone", "--standalone-mode", "sidecar"}, nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func (c *chain) rt(id string, n ns.NetNS) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{ContainerID: id, NetNS: n.Path(), IfName: "eth0",
		Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "bench"}, {"K8S_POD_NAME", id}}}
}

// cniBurst adds n pods with parallelism p, then deletes them, recording
// whole-chain and sidelane-only latencies under scenario s.
func (r *Runner) cniBurst(ctx context.Context, s string, n, p int) error {
	c, err := r.newChainWith(ctx, netip.MustParsePrefix("10.213.0.0/16"), chainOpts{ebpf: true})
	if err != nil {
		return err
	}
	nss := make([]ns.NetNS, n)
	for i := range nss {
		if nss[i], err = testutils.NewNS(); err != nil {
			return fmt.Errorf("create netns: %w", err)
		}
		netns := nss[i]
		r.cleanup(func() { netns.Close(); _ = testutils.UnmountNS(netns) })
	}
	measure := func(op string, f func(i int) error) ([]time.Duration, error) {
		lat := make([]time.Duration, n)
		sem := make(chan struct{}, p)
		var wg sync.WaitGroup
		var mu sync.Mutex
		var firstErr error
		for i := range n {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				start := time.Now()
				err := f(i)
				lat[i] = time.Since(start)
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("%s pod %d: %w", op, i, err)
					}
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		return lat, firstErr
	}
	add, err := measure("ADD", func(i int) error {
		_, err := c.cni.AddNetworkList(ctx, c.list, c.rt(fmt.Sprintf("burst%03d", i), nss[i]))
		return err
	})
	if err != nil {
		return err
	}
	if err := r.addPhases(ctx, s, c, nil); err != nil {
		r.log.Warn("read the agent's ADD phases", "scenario", s, "error", err)
	}
	del, err := measure("DEL", func(i int) error {
		return c.cni.DelNetworkList(ctx, c.list, c.rt(fmt.Sprintf("burst%03d", i), nss[i]))
	})
	if err != nil {
		return err
	}
	ms := func(us float64) float64 { return us / 1000 }
	pa, pd := loadgen.Summarize(add), loadgen.Summarize(del)
	r.res.Add(s, "chain", "addP50ms", ms(pa.P50us), "ms")
	r.res.Add(s, "chain", "addP99ms", ms(pa.P99us), "ms")
	r.res.Add(s, "chain", "delP50ms", ms(pd.P50us), "ms")
	r.res.Add(s, "chain", "delP99ms", ms(pd.P99us), "ms")
	sa, sd := loadgen.Summarize(c.exec.per["ADD sidelane-cni"]), loadgen.Summarize(c.exec.per["DEL sidelane-cni"])
	r.res.Add(s, report.Sidelane, "addP50ms", ms(sa.P50us), "ms")
	r.res.Add(s, report.Sidelane, "addP99ms", ms(sa.P99us), "ms")
	r.res.Add(s, report.Sidelane, "delP50ms", ms(sd.P50us), "ms")
	r.res.Add(s, report.Sidelane, "delP99ms", ms(sd.P99us), "ms")
	// Starting the plugin process alone (CNI_COMMAND=VERSION), as many
	// times and as many at once as the scenario's ADDs (after them, the
	// agent idle): the floor of sidelane-cni's share at the median and at
	// the tail, whatever the agent does. Next to agentAddP99ms it shows
	// whether sidelane-cni's ADD tail is the agent's or the process's.
	if v, err := r.execVersion(ctx, n, p); err != nil {
		r.log.Warn("time sidelane-cni VERSION", "scenario", s, "error", err)
	} else {
		how := fmt.Sprintf("%d VERSION execs, %d at a time", n, p)
		r.res.AddNoted(s, report.Sidelane, "execVersionP50ms", ms(v.P50us), "ms", how)
		r.res.AddNoted(s, report.Sidelane, "execVersionP99ms", ms(v.P99us), "ms", how)
	}
	r.log.Info("cni burst", "pods", n, "parallel", p, "chainAddP99ms", ms(pa.P99us), "sidelaneAddP99ms", ms(sa.P99us))
	return nil
}
