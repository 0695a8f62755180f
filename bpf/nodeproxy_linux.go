//go:build linux

package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
)

// NodeProxy says where per-node pods' outbound connections go: the node
// proxy's outbound listener, on an address of the host netns that pods can
// reach (the CNI bridge's gateway address is the natural choice: every pod
// on the node has a route to it and it is not routable from other nodes).
// The same address is how inbound capture recognizes the node proxy's own
// upstream connections (and the host's, e.g. kubelet probes): connections
// from it to a per-node pod are not captured again, so the proxy must
// connect to pods from this address (Envoy: upstream_bind_config, haproxy:
// "source").
type NodeProxy struct {
	// Netns is the cookie of the netns the proxy runs in (the host's:
	// NetnsCookie("/proc/self/ns/net") in a hostNetwork agent).
	Netns uint64
	// IPv4 and IPv6 are the listener addresses; at least one is required.
	// A per-node pod's connect of a family without an address is refused.
	IPv4, IPv6 netip.Addr
	// Port is the outbound listener's port (15001 by convention).
	Port uint16
}

// Validate reports every invalid field of n.
func (n NodeProxy) Validate() error {
	var errs []error
	if n.Netns == 0 {
		errs = append(errs, errors.New("netns: must not be 0"))
	}
	if n.Port == 0 {
		errs = append(errs, errors.New("port: must not be 0"))
	}
	if !n.IPv4.IsValid() && !n.IPv6.IsValid() {
		errs = append(errs, errors.New("ipv4, ipv6: at least one address is required"))
	}
	if n.IPv4.IsValid() && (!n.IPv4.Unmap().Is4() || n.IPv4.IsUnspecified()) {
		errs = append(errs, fmt.Errorf("ipv4: %s is not a usable IPv4 address", n.IPv4))
	}
	if n.IPv6.IsValid() && (!n.IPv6.Is6() || n.IPv6.Is4In6() || n.IPv6.IsUnspecified()) {
		errs = append(errs, fmt.Errorf("ipv6: %s is not a usable IPv6 address", n.IPv6))
	}
	return errors.Join(errs...)
}

func (n NodeProxy) value() captureNodeProxy {
	v := captureNodeProxy{Netns: n.Netns, Port: n.Port}
	if n.IPv4.IsValid() {
		a := n.IPv4.Unmap().As4()
		v.Ip4 = nativeOf(a[:])
	}
	if n.IPv6.IsValid() {
		a := n.IPv6.As16()
		for i := range 4 {
			v.Ip6[i] = nativeOf(a[i*4 : i*4+4])
		}
	}
	return v
}

// nativeOf reads 4 network-order bytes as the uint32 a BPF program sees
// when it loads them from memory.
func nativeOf(b []byte) uint32 { return binary.NativeEndian.Uint32(b) }

// SetNodeProxy configures the node proxy for per-node pods (new
// connections). An invalid n is an error naming the field and changes
// nothing. ClearNodeProxy removes it: per-node pods' connects then fail.
func (c *Capture) SetNodeProxy(n NodeProxy) error {
	if err := n.Validate(); err != nil {
		return fmt.Errorf("node proxy: %w", err)
	}
	var zero uint32
	v := n.value()
	if err := c.objs.NodeProxyCfg.Update(&zero, &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write node proxy: %w", err)
	}
	return nil
}

// ClearNodeProxy forgets the node proxy: per-node pods fail closed.
func (c *Capture) ClearNodeProxy() error {
	var zero uint32
	v := captureNodeProxy{}
	if err := c.objs.NodeProxyCfg.Update(&zero, &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("clear node proxy: %w", err)
	}
	return nil
}

// NodeCounters sums the per-node mode counters over CPUs.
func (c *Capture) NodeCounters() (NodeCounters, error) {
	var zero uint32
	var per []captureNodeStats
	if err := c.objs.NodeCounters.Lookup(&zero, &per); err != nil {
		return NodeCounters{}, fmt.Errorf("node counters: %w", err)
	}
	var s NodeCounters
	for _, p := range per {
		s.Redirected += p.Redirected
		s.Refused += p.Refused
		s.Unconfigured += p.Unconfigured
		s.Looped += p.Looped
	}
	return s, nil
}
