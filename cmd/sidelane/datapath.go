package main

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sidelane/sidelane/agent/datapath/choose"
	"github.com/sidelane/sidelane/agent/datapath/ebpf"
	"github.com/sidelane/sidelane/bpf"
)

type datapathFlags struct {
	kind          string
	cgroupRoot    string
	pinDir        string
	shortcut      bool
	forceMissing  string
	nodeProxyAddr string
	nodeProxyOut  uint
	nodeProxyIn   uint
	nodeProxyNS   string
	repair        time.Duration
}

func (f *datapathFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.kind, "datapath", choose.Auto, "capture backend: auto (eBPF, falling back to iptables when the kernel lacks a feature, and to nftables when the iptables binaries or kernel modules are missing too), ebpf, iptables, nftables or noop")
	fs.StringVar(&f.cgroupRoot, "cgroup-root", "", "cgroup v2 directory the eBPF programs attach to; every pod must be below it (default: the cgroup2 mount from /proc/mounts)")
	fs.StringVar(&f.pinDir, "bpf-pin-dir", bpf.DefaultPinDir, "bpffs directory for sidelane's pinned maps and links")
	fs.BoolVar(&f.shortcut, "enable-shortcut", true, "redirect bytes socket-to-socket (sockmap) for same-node pairs that carry request/response traffic; streams and short connections stay on TCP (see README, Shortcut design); false: TCP for every connection")
	fs.StringVar(&f.forceMissing, "force-missing-feature", "", "comma-separated kernel features to treat as missing (tests of the fallback); \"iptables\" makes auto skip the iptables backend (tests of the nftables fallback)")
	fs.StringVar(&f.nodeProxyAddr, "node-proxy-address", "", "per-node mode: comma-separated IPv4/IPv6 addresses of the node proxy's listeners in the host netns (e.g. the CNI bridge gateway); empty: per-node pods fail closed")
	fs.UintVar(&f.nodeProxyOut, "node-proxy-outbound-port", 15001, "per-node mode: the node proxy's outbound listener port")
	fs.UintVar(&f.nodeProxyIn, "node-proxy-inbound-port", 15006, "per-node mode: the port of the listener the node proxy opens in each per-node pod's netns")
	fs.DurationVar(&f.repair, "repair-interval", ebpf.DefaultRepairInterval, "eBPF datapath: how often the agent checks that its cgroup links, tc links and pins are in place and re-attaches what another process detached (0: never)")
	fs.StringVar(&f.nodeProxyNS, "node-proxy-netns", "", "per-node mode: path of the network namespace the node proxy runs in; its own connections there are never captured (default: the agent's own, i.e. the host netns of a hostNetwork agent)")
}

func (f *datapathFlags) nodeProxy() (*ebpf.NodeProxyOptions, error) {
	if f.nodeProxyAddr == "" {
		return nil, nil
	}
	if f.nodeProxyOut == 0 || f.nodeProxyOut > 65535 || f.nodeProxyIn == 0 || f.nodeProxyIn > 65535 {
		return nil, errors.New("--node-proxy-outbound-port and --node-proxy-inbound-port must be 1-65535")
	}
	o := &ebpf.NodeProxyOptions{OutboundPort: uint16(f.nodeProxyOut), InboundPort: uint16(f.nodeProxyIn), HostNetns: f.nodeProxyNS}
	for _, s := range strings.Split(f.nodeProxyAddr, ",") {
		a, err := netip.ParseAddr(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("--node-proxy-address %q: %w", s, err)
		}
		switch {
		case a.Is4() && !o.IPv4.IsValid():
			o.IPv4 = a
		case a.Is6() && !o.IPv6.IsValid():
			o.IPv6 = a
		default:
			return nil, fmt.Errorf("--node-proxy-address %q: at most one IPv4 and one IPv6 address", f.nodeProxyAddr)
		}
	}
	return o, nil
}

// open picks and opens the backend (package choose).
func (f *datapathFlags) open(log *slog.Logger) (*choose.Opened, error) {
	np, err := f.nodeProxy()
	if err != nil {
		return nil, err
	}
	var missing []string
	noIPTables := false
	if f.forceMissing != "" {
		for _, m := range strings.Split(f.forceMissing, ",") {
			if m == choose.ForceMissingIPTables {
				noIPTables = true
				continue
			}
			missing = append(missing, m)
		}
	}
	return choose.Open(choose.Options{Kind: f.kind, Log: log, ForceMissingIPTables: noIPTables, EBPF: ebpf.Options{
		Cgroup: f.cgroupRoot, PinDir: f.pinDir, EnableShortcut: f.shortcut, ForceMissing: missing, NodeProxy: np, Log: log,
	}})
}

// datapathInfo is the sidelane_datapath_info gauge: which backend runs
// and, when auto fell back to iptables or nftables, why.
func datapathInfo(requested string, dp *choose.Opened) prometheus.Collector {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "sidelane_datapath_info",
		Help: "The capture backend in use (value 1); fallback_reason is set when --datapath=auto fell back to iptables or nftables (the eBPF reason, then the iptables one).",
	}, []string{"requested", "backend", "fallback_reason"})
	g.WithLabelValues(requested, dp.Name(), dp.FellBack).Set(1)
	return g
}
