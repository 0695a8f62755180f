package main

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sidelane/sidelane/agent/datapath"
	"github.com/sidelane/sidelane/agent/datapath/ebpf"
	"github.com/sidelane/sidelane/agent/datapath/iptables"
	"github.com/sidelane/sidelane/bpf"
)

// Datapath kinds for --datapath.
const (
	dpAuto     = "auto"     // eBPF if the kernel has every feature, else iptables
	dpEBPF     = "ebpf"     // eBPF or fail
	dpIPTables = "iptables" // Istio's rule set in each pod's netns
	dpNoop     = "noop"     // capture nothing (protocol testing)
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
}

func (f *datapathFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.kind, "datapath", dpAuto, "capture backend: auto (eBPF, falling back to iptables when the kernel lacks a feature), ebpf, iptables or noop")
	fs.StringVar(&f.cgroupRoot, "cgroup-root", "", "cgroup v2 directory the eBPF programs attach to; every pod must be below it (default: the cgroup2 mount from /proc/mounts)")
	fs.StringVar(&f.pinDir, "bpf-pin-dir", bpf.DefaultPinDir, "bpffs directory for sidelane's pinned maps and links")
	fs.BoolVar(&f.shortcut, "enable-shortcut", false, "redirect bytes socket-to-socket (sockmap) for same-node pairs; off by default until benchmarks show it never slows small writes")
	fs.StringVar(&f.forceMissing, "force-missing-feature", "", "comma-separated kernel features to treat as missing (tests of the iptables fallback)")
	fs.StringVar(&f.nodeProxyAddr, "node-proxy-address", "", "per-node mode: comma-separated IPv4/IPv6 addresses of the node proxy's listeners in the host netns (e.g. the CNI bridge gateway); empty: per-node pods fail closed")
	fs.UintVar(&f.nodeProxyOut, "node-proxy-outbound-port", 15001, "per-node mode: the node proxy's outbound listener port")
	fs.UintVar(&f.nodeProxyIn, "node-proxy-inbound-port", 15006, "per-node mode: the port of the listener the node proxy opens in each per-node pod's netns")
}

// openedDatapath is the backend in use plus what the agent needs of it.
type openedDatapath struct {
	datapath.Datapath
	ebpf     *ebpf.Datapath // nil unless eBPF
	close    func()
	fellBack string // why auto fell back to iptables, or ""
}

func (f *datapathFlags) nodeProxy() (*ebpf.NodeProxyOptions, error) {
	if f.nodeProxyAddr == "" {
		return nil, nil
	}
	if f.nodeProxyOut == 0 || f.nodeProxyOut > 65535 || f.nodeProxyIn == 0 || f.nodeProxyIn > 65535 {
		return nil, errors.New("--node-proxy-outbound-port and --node-proxy-inbound-port must be 1-65535")
	}
	o := &ebpf.NodeProxyOptions{OutboundPort: uint16(f.nodeProxyOut), InboundPort: uint16(f.nodeProxyIn)}
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

// open picks and opens the backend. With "auto", a kernel without a
// needed eBPF feature gets the iptables backend, and the reason is logged.
func (f *datapathFlags) open(log *slog.Logger) (*openedDatapath, error) {
	switch f.kind {
	case dpNoop:
		return &openedDatapath{Datapath: datapath.Noop{}, close: func() {}}, nil
	case dpIPTables:
		return &openedDatapath{Datapath: iptables.New(log), close: func() {}}, nil
	case dpAuto, dpEBPF:
	default:
		return nil, fmt.Errorf("--datapath %q: want auto, ebpf, iptables or noop", f.kind)
	}
	np, err := f.nodeProxy()
	if err != nil {
		return nil, err
	}
	var missing []string
	if f.forceMissing != "" {
		missing = strings.Split(f.forceMissing, ",")
	}
	d, c, err := ebpf.Open(ebpf.Options{Cgroup: f.cgroupRoot, PinDir: f.pinDir, EnableShortcut: f.shortcut,
		ForceMissing: missing, NodeProxy: np, Log: log})
	if err == nil {
		log.Info("datapath: eBPF", "cgroup", f.cgroupRoot, "pinDir", f.pinDir, "shortcut", f.shortcut)
		return &openedDatapath{Datapath: d, ebpf: d, close: func() { c.Close() }}, nil
	}
	if f.kind == dpAuto && errors.Is(err, bpf.ErrNotSupported) {
		log.Warn("datapath: eBPF not supported on this node, using Istio's iptables rules in each pod instead", "reason", err.Error())
		return &openedDatapath{Datapath: iptables.New(log), close: func() {}, fellBack: err.Error()}, nil
	}
	return nil, fmt.Errorf("open eBPF datapath: %w", err)
}

// datapathInfo is the sidelane_datapath_info gauge: which backend runs
// and, when auto fell back to iptables, why.
func datapathInfo(requested string, dp *openedDatapath) prometheus.Collector {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "sidelane_datapath_info",
		Help: "The capture backend in use (value 1); fallback_reason is set when --datapath=auto fell back to iptables.",
	}, []string{"requested", "backend", "fallback_reason"})
	g.WithLabelValues(requested, dp.Name(), dp.fellBack).Set(1)
	return g
}
