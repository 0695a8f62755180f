// Package choose picks the agent's capture backend: eBPF when the kernel
// has every feature it needs, else Istio's iptables rules in each pod's
// netns, else (no iptables binaries or kernel modules) Istio's nftables
// rules, as --datapath says.
package choose

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/sidelane/sidelane/agent/datapath"
	"github.com/sidelane/sidelane/agent/datapath/ebpf"
	"github.com/sidelane/sidelane/agent/datapath/iptables"
	"github.com/sidelane/sidelane/agent/datapath/nftables"
	"github.com/sidelane/sidelane/bpf"
)

// Kinds for Options.Kind (--datapath).
const (
	Auto     = "auto"     // eBPF if the kernel has every feature, else iptables, else nftables
	EBPF     = "ebpf"     // eBPF or fail
	IPTables = "iptables" // Istio's iptables rule set in each pod's netns
	NFTables = "nftables" // Istio's nftables rule set in each pod's netns
	Noop     = "noop"     // capture nothing (protocol testing)
)

// ForceMissingIPTables is the --force-missing-feature name that makes
// Auto treat the iptables backend as unavailable (tests of the nftables
// fallback).
const ForceMissingIPTables = "iptables"

// Options are the agent's datapath settings.
type Options struct {
	Kind string
	// EBPF is passed to ebpf.Open for Auto and EBPF.
	EBPF ebpf.Options
	// ForceMissingIPTables makes Auto skip the iptables backend as if its
	// binaries or kernel modules were missing.
	ForceMissingIPTables bool
	Log                  *slog.Logger
}

// Opened is the backend in use.
type Opened struct {
	datapath.Datapath
	// EBPF is set when the eBPF datapath runs.
	EBPF *ebpf.Datapath
	// FellBack says why Auto chose iptables or nftables ("" otherwise).
	FellBack string
	closeFn  func()
}

// Close releases the Go side; capture keeps running from the pins.
func (o *Opened) Close() {
	if o.closeFn != nil {
		o.closeFn()
	}
}

// Open picks and opens the backend. With Auto, a kernel without a needed
// eBPF feature gets the iptables backend, and a node without iptables
// (binaries or kernel modules, probed in a throwaway netns) the nftables
// backend; the reasons are logged and returned in FellBack.
func Open(o Options) (*Opened, error) {
	if o.Log == nil {
		o.Log = slog.Default()
	}
	switch o.Kind {
	case Noop:
		return &Opened{Datapath: datapath.Noop{}}, nil
	case IPTables:
		return &Opened{Datapath: iptables.New(o.Log)}, nil
	case NFTables:
		if err := nftables.Probe(context.Background()); err != nil {
			return nil, fmt.Errorf("datapath %s: %w", NFTables, err)
		}
		return &Opened{Datapath: nftables.New(o.Log)}, nil
	case Auto, EBPF:
	default:
		return nil, fmt.Errorf("datapath %q: want %s, %s, %s, %s or %s", o.Kind, Auto, EBPF, IPTables, NFTables, Noop)
	}
	if o.EBPF.Log == nil {
		o.EBPF.Log = o.Log
	}
	d, c, err := ebpf.Open(o.EBPF)
	if err == nil {
		o.Log.Info("datapath: eBPF", "cgroup", o.EBPF.Cgroup, "pinDir", o.EBPF.PinDir, "shortcut", o.EBPF.EnableShortcut)
		return &Opened{Datapath: d, EBPF: d, closeFn: func() { c.Close() }}, nil
	}
	if o.Kind == Auto && errors.Is(err, bpf.ErrNotSupported) {
		return fallBack(o, err)
	}
	return nil, fmt.Errorf("open eBPF datapath: %w", err)
}

// fallBack picks iptables, else nftables, for a node without eBPF.
func fallBack(o Options, ebpfErr error) (*Opened, error) {
	ctx := context.Background()
	ipErr := errors.New("iptables: forced missing")
	if !o.ForceMissingIPTables {
		ipErr = probeIPTables(ctx)
	}
	if ipErr == nil {
		o.Log.Warn("datapath: eBPF not supported on this node, using Istio's iptables rules in each pod instead", "reason", ebpfErr.Error())
		return &Opened{Datapath: iptables.New(o.Log), FellBack: ebpfErr.Error()}, nil
	}
	reason := ebpfErr.Error() + "; " + ipErr.Error()
	if err := nftables.Probe(ctx); err != nil {
		return nil, fmt.Errorf("no capture backend works on this node: %s; %w", reason, err)
	}
	o.Log.Warn("datapath: neither eBPF nor iptables work on this node, using Istio's nftables rules in each pod instead", "reason", reason)
	return &Opened{Datapath: nftables.New(o.Log), FellBack: reason}, nil
}
