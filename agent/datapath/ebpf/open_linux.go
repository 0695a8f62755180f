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
	Log          *slog.Logger
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
	c, err := bpf.Load(bpf.Config{Cgroup: o.Cgroup, PinDir: o.PinDir, EnableShortcut: o.EnableShortcut, Log: o.Log})
	if err != nil {
		return nil, nil, err
	}
	return New(c, o.Log), c, nil
}
