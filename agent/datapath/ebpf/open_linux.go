//go:build linux

package ebpf

import (
	"fmt"
	"log/slog"

	"github.com/sidelane/sidelane/bpf"
)

// Options configures Open.
type Options struct {
	// Cgroup is the attach point (--cgroup-root); default: the cgroup v2
	// mount found in /proc/mounts. Every pod must be below it.
	Cgroup string
	// PinDir defaults to bpf.DefaultPinDir.
	PinDir         string
	EnableShortcut bool
	// ForceMissing forces kernel features off (tests of the fallback).
	ForceMissing []string
	// NodeProxy enables per-node (sidecar-free) mode. Without it, pods in
	// per-node mode are still enrolled but their connects fail closed
	// (counted in NodeCounters().Unconfigured).
	NodeProxy *NodeProxyOptions
	Log       *slog.Logger
}

// Open probes the kernel and loads (or reuses from pins) the eBPF datapath.
// An error wrapping bpf.ErrNotSupported means this node cannot run it: the
// agent then logs it and uses the iptables backend. Close the returned
// Capture on shutdown (capture keeps running from the pins).
func Open(o Options) (*Datapath, *bpf.Capture, error) {
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.Cgroup == "" {
		mnt, err := bpf.CgroupV2Mount()
		if err != nil {
			return nil, nil, err
		}
		o.Cgroup = mnt
	}
	res, err := bpf.Probe(bpf.ProbeConfig{Cgroup: o.Cgroup, ForceMissing: o.ForceMissing})
	if err != nil {
		return nil, nil, fmt.Errorf("probe kernel: %w", err)
	}
	if err := res.Err(); err != nil {
		return nil, nil, err
	}
	// Bad node proxy settings fail before anything is loaded or pinned.
	np, err := nodeProxy(o.NodeProxy)
	if err != nil {
		return nil, nil, err
	}
	c, err := bpf.Load(bpf.Config{Cgroup: o.Cgroup, PinDir: o.PinDir, EnableShortcut: o.EnableShortcut, Log: o.Log})
	if err != nil {
		return nil, nil, err
	}
	d := New(c, o.Log)
	if np == nil {
		err = c.ClearNodeProxy()
	} else {
		err = c.SetNodeProxy(*np)
		d.SetNodeInboundPort(o.NodeProxy.InboundPort)
	}
	if err != nil {
		c.Close()
		return nil, nil, err
	}
	return d, c, nil
}

// nodeProxy turns the options into the node proxy's address, or nil when
// per-node mode has no proxy (its pods then fail closed).
func nodeProxy(o *NodeProxyOptions) (*bpf.NodeProxy, error) {
	if o == nil {
		return nil, nil
	}
	host := o.HostNetns
	if host == "" {
		host = "/proc/self/ns/net"
	}
	cookie, err := bpf.NetnsCookie(host)
	if err != nil {
		return nil, fmt.Errorf("node proxy netns: %w", err)
	}
	n := bpf.NodeProxy{Netns: cookie, IPv4: o.IPv4, IPv6: o.IPv6, Port: o.OutboundPort}
	if n.Port == 0 {
		n.Port = 15001
	}
	if err := n.Validate(); err != nil {
		return nil, fmt.Errorf("node proxy: %w", err)
	}
	return &n, nil
}
