package bpf

import "errors"

// ErrNotSupported is wrapped by every error that means "this kernel (or
// this configuration) cannot run the eBPF datapath": the agent falls back to
// the iptables backend on it.
var ErrNotSupported = errors.New("eBPF datapath not supported")
