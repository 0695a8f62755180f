package run

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

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
	// plugin is the chained plugin after bridge: sidelane-cni, or the
	// reference noop plugin (chainOpts.noop), whose per-pod debug files
	// are under noopDir.
	plugin, noopDir string
	list            *libcni.NetworkConfigList
	cni             *libcni.CNIConfig
	exec            *timingExec
	agent           *agentproc.Proc
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
	// noop puts the CNI project's reference noop plugin (plugins/test/noop,
	// told to pass prevResult through) in sidelane-cni's place and starts
	// no agent: a chained plugin that only starts, reads and writes its
	// small debug file, and exits. Its share of the chain is the floor of
	// any chained plugin's share, measured in the same burst.
	noop bool
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
	c := &chain{name: uniqueName("slbench-"), bridge: uniqueName("slbb"), exec: newTimingExec(), plugin: "sidelane-cni"}
	r.cleanup(func() {
		if l, err := netlink.LinkByName(c.bridge); err == nil {
			_ = netlink.LinkDel(l)
		}
	})
	var last map[string]any
	if o.noop {
		c.plugin, c.noopDir = "noop", filepath.Join(dir, "noop")
		if err := os.Mkdir(c.noopDir, 0o755); err != nil {
			return nil, err
		}
		last = map[string]any{"type": "noop"}
	} else {
		if err := r.startAgent(ctx, c, dir, o); err != nil {
			return nil, err
		}
		last = map[string]any{"type": "sidelane-cni", "agentSocket": c.agent.Socket}
	}
	raw, err := json.Marshal(map[string]any{
		"cniVersion": "1.0.0", "name": c.name,
		"plugins": []map[string]any{
			{"type": "bridge", "bridge": c.bridge, "isGateway": true, "ipam": map[string]any{
				"type": "host-local", "ranges": [][]map[string]string{{{"subnet": subnet.String()}}}, "dataDir": filepath.Join(dir, "ipam")}},
			last,
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

// startAgent starts c's agent with its run dir (socket and state) on a
// tmpfs, as /var/run is on a node (this VM's /tmp is ext4, where a state
// write's tail was 9 ms in a burst), in the node's agent cpu group when
// the scenario has one (nodeCPU).
func (r *Runner) startAgent(ctx context.Context, c *chain, dir string, o chainOpts) error {
	port, err := freePort()
	if err != nil {
		return err
	}
	c.metrics = fmt.Sprintf("http://127.0.0.1:%d/metrics", port)
	// The agent's defaults (info), not agentproc's debug logging.
	args := []string{"--log-level", "info", "--metrics-addr", fmt.Sprintf("127.0.0.1:%d", port)}
	if o.ebpf {
		eargs, err := r.ebpfNode()
		if err != nil {
			return err
		}
		args = append(args, eargs...)
	}
	run := filepath.Join(dir, "agent")
	if err := os.Mkdir(run, 0o700); err != nil {
		return err
	}
	if err := unix.Mount("tmpfs", run, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "size=64m,mode=0700"); err != nil {
		return fmt.Errorf("mount tmpfs for the agent's run dir: %w", err)
	}
	r.cleanup(func() { _ = unix.Unmount(run, unix.MNT_DETACH) })
	c.agent = agentproc.New(filepath.Join(r.cfg.SidelaneBin, "sidelane"), run, args...)
	if err := c.agent.Start(ctx); err != nil {
		return err
	}
	r.cleanup(c.agent.Stop)
	if r.node != nil {
		if err := r.node.placeAgent(c.agent.PID()); err != nil {
			return err
		}
	}
	return nil
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
	args := [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "bench"}, {"K8S_POD_NAME", id}}
	if c.noopDir != "" {
		args = append(args, [2]string{"DEBUG", c.noopDebug(id)})
	}
	return &libcni.RuntimeConf{ContainerID: id, NetNS: n.Path(), IfName: "eth0", Args: args}
}

// noopDebug is pod id's debug file for the noop plugin (its CNI_ARGS
// DEBUG): one per pod, since the plugin rewrites it on every call.
func (c *chain) noopDebug(id string) string { return filepath.Join(c.noopDir, id+".json") }

// noopPassThrough (re)writes pod id's debug file telling the noop plugin
// to print its prevResult, as a chained plugin must.
func (c *chain) noopPassThrough(id string) error {
	return os.WriteFile(c.noopDebug(id), []byte(`{"ReportResult":"PASSTHROUGH"}`), 0o644)
}

// cniBurst runs rounds of: n pods added with parallelism p, then deleted,
// through sidelane's chain and through the same chain with the reference
// noop plugin in sidelane-cni's place (which of the two goes first
// alternates by round). Every figure keeps its per-round values (a
// round's p50 and p99 over its n ADDs), so cni_add_share_p99 gets a paired
// interval; the noop plugin's share is its floor.
func (r *Runner) cniBurst(ctx context.Context, s string, n, p, rounds int) error {
	c, err := r.newChainWith(ctx, netip.MustParsePrefix("10.213.0.0/16"), chainOpts{ebpf: true})
	if err != nil {
		return err
	}
	ref, err := r.newChainWith(ctx, netip.MustParsePrefix("10.212.0.0/16"), chainOpts{noop: true})
	if err != nil {
		return err
	}
	// The two chains take turns with the same netns (each deletes its pods
	// before the other adds).
	nss := make([]ns.NetNS, n)
	for i := range nss {
		if nss[i], err = testutils.NewNS(); err != nil {
			return fmt.Errorf("create netns: %w", err)
		}
		netns := nss[i]
		r.cleanup(func() { netns.Close(); _ = testutils.UnmountNS(netns) })
	}
	type figKey struct{ contender, metric string }
	figs := map[figKey][]float64{} // per-round values, in ms
	keep := func(contender, metric string, d []time.Duration, q func(loadgen.Percentiles) float64) {
		k := figKey{contender, metric}
		figs[k] = append(figs[k], q(loadgen.Summarize(d))/1000)
	}
	p50 := func(x loadgen.Percentiles) float64 { return x.P50us }
	p99 := func(x loadgen.Percentiles) float64 { return x.P99us }
	for round := range rounds {
		order := []*chain{c, ref}
		if round%2 == 1 {
			order = []*chain{ref, c}
		}
		for _, ch := range order {
			plugin, whole := report.Sidelane, report.Chain
			if ch == ref {
				plugin, whole = report.NoopPlugin, report.NoopChain
			}
			from := ch.exec.count("ADD " + ch.plugin)
			fromDel := ch.exec.count("DEL " + ch.plugin)
			add, del, err := r.burstOnce(ctx, ch, nss, p)
			if err != nil {
				return fmt.Errorf("%s chain, round %d: %w", ch.plugin, round, err)
			}
			keep(whole, "addP50ms", add, p50)
			keep(whole, "addP99ms", add, p99)
			keep(whole, "delP50ms", del, p50)
			keep(whole, "delP99ms", del, p99)
			own := ch.exec.samples("ADD "+ch.plugin, from)
			ownDel := ch.exec.samples("DEL "+ch.plugin, fromDel)
			keep(plugin, "addP50ms", own, p50)
			keep(plugin, "addP99ms", own, p99)
			keep(plugin, "delP50ms", ownDel, p50)
			keep(plugin, "delP99ms", ownDel, p99)
		}
	}
	// The agent's histograms span every round.
	if err := r.addPhases(ctx, s, c, nil); err != nil {
		r.log.Warn("read the agent's ADD phases", "scenario", s, "error", err)
	}
	keys := slices.SortedFunc(maps.Keys(figs), func(a, b figKey) int {
		return cmp.Or(strings.Compare(a.contender, b.contender), strings.Compare(a.metric, b.metric))
	})
	for _, k := range keys {
		r.res.AddReps(s, k.contender, k.metric, figs[k], "ms")
	}
	// Starting the plugin process alone (CNI_COMMAND=VERSION), as many
	// times and as many at once as a round's ADDs (after them, the
	// agent idle): the floor of sidelane-cni's share at the median and at
	// the tail, whatever the agent does. Next to agentAddP99ms it shows
	// whether sidelane-cni's ADD tail is the agent's or the process's.
	ms := func(us float64) float64 { return us / 1000 }
	if v, err := r.execVersion(ctx, n, p); err != nil {
		r.log.Warn("time sidelane-cni VERSION", "scenario", s, "error", err)
	} else {
		how := fmt.Sprintf("%d VERSION execs, %d at a time", n, p)
		r.res.AddNoted(s, report.Sidelane, "execVersionP50ms", ms(v.P50us), "ms", how)
		r.res.AddNoted(s, report.Sidelane, "execVersionP99ms", ms(v.P99us), "ms", how)
	}
	share := func(plugin, whole string) float64 {
		return report.Mean(figs[figKey{plugin, "addP99ms"}]) / report.Mean(figs[figKey{whole, "addP99ms"}])
	}
	r.log.Info("cni burst", "pods", n, "parallel", p, "rounds", rounds,
		"sidelaneShareP99", share(report.Sidelane, report.Chain), "noopShareP99", share(report.NoopPlugin, report.NoopChain))
	return nil
}

// burstOnce adds every netns to ch with parallelism p, then deletes them,
// and returns each pod's whole-chain ADD and DEL latency.
func (r *Runner) burstOnce(ctx context.Context, ch *chain, nss []ns.NetNS, p int) (add, del []time.Duration, err error) {
	id := func(i int) string { return fmt.Sprintf("burst%03d", i) }
	if ch.noopDir != "" {
		for i := range nss {
			if err := ch.noopPassThrough(id(i)); err != nil {
				return nil, nil, err
			}
		}
	}
	measure := func(op string, f func(i int) error) ([]time.Duration, error) {
		lat := make([]time.Duration, len(nss))
		sem := make(chan struct{}, p)
		var wg sync.WaitGroup
		var mu sync.Mutex
		var firstErr error
		for i := range nss {
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
	if add, err = measure("ADD", func(i int) error {
		_, err := ch.cni.AddNetworkList(ctx, ch.list, ch.rt(id(i), nss[i]))
		return err
	}); err != nil {
		return nil, nil, err
	}
	del, err = measure("DEL", func(i int) error {
		return ch.cni.DelNetworkList(ctx, ch.list, ch.rt(id(i), nss[i]))
	})
	return add, del, err
}
