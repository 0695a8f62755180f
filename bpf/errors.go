package bpf

import "errors"

// ErrNotSupported is wrapped by every error that means "this kernel (or
// this configuration) cannot run the eBPF datapath": the agent falls back to
// the iptables backend on it.
var ErrNotSupported = errors.New("eBPF datapath not supported")

// Counters are one pod's totals since it was enrolled.
type Counters struct {
	RedirectedOutbound uint64 // connects sent to the outbound port
	RedirectedInbound  uint64 // connects sent to the inbound port
	RedirectedDNS      uint64 // connects sent to the DNS port
	Excluded           uint64 // connects an exclusion let go direct
	OrigDstAnswered    uint64 // SO_ORIGINAL_DST answers to the pod's proxy
	ShortcutMessages   uint64 // sends moved socket-to-socket by the shortcut
	ShortcutBytes      uint64 // bytes in those sends
}
