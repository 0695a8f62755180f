// Package choose picks the agent's capture backend: eBPF when the kernel
// has every feature it needs, else Istio's iptables rules in each pod's
// netns, as --datapath says.
package choose

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/sidelane/sidelane/agent/datapath"
	"github.com/sidelane/sidelane/agent/datapath/ebpf"
	"github.com/sidelane/sidelane/agent/datapath/iptables"
	"github.com/sidelane/sidelane/bpf"
)

// Kinds for Options.Kind (--datapath).
const (
	Auto     = "auto"     // eBPF if the kernel has every feature, else iptables
	EBPF     = "ebpf"     // eBPF or fail
	IPTables = "iptables" // Istio's rule set in each pod's netns
	Noop     = "noop"     // capture nothing (protocol testing)
)

// Options are the agent's datapath settings.
type Options struct {
	Kind string
	// EBPF is passed to ebpf.Open for Auto and EBPF.
	EBPF ebpf.Options
	Log  *slog.Logger
}

// Opened is the backend in use.
type Opened struct {
	datapath.Datapath
	// EBPF is set when the eBPF datapath runs.
	EBPF *ebpf.Datapath
	// FellBack says why Auto chose iptables ("" otherwise).
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
// eBPF feature gets the iptables backend and the reason is logged.
func Open(o Options) (*Opened, error) {
	if o.Log == nil {
		o.Log = slog.Default()
	}
	switch o.Kind {
	case Noop:
		return &Opened{Datapath: datapath.Noop{}}, nil
	case IPTables:
		return &Opened{Datapath: iptables.New(o.Log)}, nil
	case Auto, EBPF:
	default:
		return nil, fmt.Errorf("datapath %q: want %s, %s, %s or %s", o.Kind, Auto, EBPF, IPTables, Noop)
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
		o.Log.Warn("datapath: eBPF not supported on this node, using Istio's iptables rules in each pod instead", "reason", err.Error())
		return &Opened{Datapath: iptables.New(o.Log), FellBack: err.Error()}, nil
	}
	return nil, fmt.Errorf("open eBPF datapath: %w", err)
}
