package bpf

import "errors"

// ErrNotSupported is wrapped by every error that means "this kernel (or
// this configuration) cannot run the eBPF datapath": the agent falls back to
// the iptables backend on it.
var ErrNotSupported = errors.New("eBPF datapath not supported")

// ErrMapFull is wrapped by Put's error when a map has no room for the pod
// (the node's limits: 16,384 pods, 1M CIDR rules, 256Ki port rules,
// 65,536 pod IPs). Nothing of the pod is written then.
var ErrMapFull = errors.New("map full")

// Counters are one pod's totals since it was enrolled.
type Counters struct {
	RedirectedOutbound uint64 // connects sent to the outbound port
	RedirectedInbound  uint64 // connects sent to the inbound port
	RedirectedDNS      uint64 // connects sent to the DNS port
	Excluded           uint64 // connects an exclusion let go direct
	OrigDstAnswered    uint64 // SO_ORIGINAL_DST answers to the pod's proxy
	ShortcutMessages   uint64 // sends moved socket-to-socket by the shortcut
	ShortcutBytes      uint64 // bytes in those sends
	DroppedInbound     uint64 // inbound packets dropped to fail closed (unparsable, fragmented SYN, no listener)
	ShortcutToTCP      uint64 // shortcut sockets that went back to TCP for good (streaming, or no peer)
	TimeWaitReuse      uint64 // inbound SYNs that reused the four-tuple of a connection the pod's side holds in TIME_WAIT
}

// NodeCounters are the per-node mode totals of the node (all per-node pods).
type NodeCounters struct {
	Redirected   uint64 // connects steered to the node proxy
	Refused      uint64 // of those, never established: the node proxy was down or unreachable
	Unconfigured uint64 // connects refused because no node proxy address was set
	Looped       uint64 // connects to the node proxy's listener itself, refused (no original destination)
}

// DefaultPinDir is where maps and links are pinned unless Config says
// otherwise. Everything sidelane pins lives under it.
const DefaultPinDir = "/sys/fs/bpf/sidelane"
