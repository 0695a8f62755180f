// Package capture turns a pod's Istio capture knobs (traffic.sidecar.istio.io/*
// annotations, proxy uid/gid, DNS capture) into Settings, the one description
// of "what to capture" that every datapath backend (eBPF, iptables, nftables) applies.
// It is pure code: no I/O, golden-tested.
package capture

import "net/netip"

// Istio's fixed ports, as istio-iptables uses them.
const (
	OutboundPort    uint16 = 15001 // Envoy's outbound listener (-p)
	InboundPort     uint16 = 15006 // Envoy's inbound listener (-z)
	DNSPort         uint16 = 15053 // istio-agent's DNS proxy
	HBONEPort       uint16 = 15008 // never captured
	DefaultProxyUID uint32 = 1337
	DefaultProxyGID uint32 = 1337
)

// InboundPassthroughSrc is the source address Envoy uses for inbound
// passthrough connections; they are never captured again.
var InboundPassthroughSrc = netip.MustParseAddr("127.0.0.6")

// PortRange is an inclusive range of ports; a single port has First == Last.
type PortRange struct {
	First uint16 `json:"first"`
	Last  uint16 `json:"last"`
}

// Contains reports whether p is in the range.
func (r PortRange) Contains(p uint16) bool { return p >= r.First && p <= r.Last }

// Settings is the capture to apply to one pod. The zero value captures
// nothing; use Defaults for Istio's defaults.
type Settings struct {
	// OutboundPort and InboundPort are where captured connections go.
	OutboundPort uint16 `json:"outboundPort"`
	InboundPort  uint16 `json:"inboundPort"`
	// ProxyUIDs/ProxyGIDs: connections made by these ids are never captured
	// (the sidecar's own upstream connections).
	ProxyUIDs []uint32 `json:"proxyUIDs"`
	ProxyGIDs []uint32 `json:"proxyGIDs"`

	// Outbound: a destination is captured when it is in IncludeOutboundCIDRs
	// (or OutboundAllCIDRs) and not in ExcludeOutboundCIDRs, and its port is
	// not in ExcludeOutboundPorts; IncludeOutboundPorts captures those ports
	// even outside the included CIDRs, as istio-iptables does.
	OutboundAllCIDRs     bool           `json:"outboundAllCIDRs"`
	IncludeOutboundCIDRs []netip.Prefix `json:"includeOutboundCIDRs,omitempty"`
	ExcludeOutboundCIDRs []netip.Prefix `json:"excludeOutboundCIDRs,omitempty"`
	IncludeOutboundPorts []PortRange    `json:"includeOutboundPorts,omitempty"`
	ExcludeOutboundPorts []PortRange    `json:"excludeOutboundPorts,omitempty"`

	// Inbound: with InboundAllPorts every port but ExcludeInboundPorts is
	// captured; otherwise every port of IncludeInboundPorts but HBONEPort,
	// and ExcludeInboundPorts does not apply (as in istio-iptables, where
	// only 15008 is returned before an explicit include list).
	// ExcludeInboundPorts always holds Istio's own ports (15008, 15090,
	// 15021, 15020).
	InboundAllPorts     bool        `json:"inboundAllPorts"`
	IncludeInboundPorts []PortRange `json:"includeInboundPorts,omitempty"`
	ExcludeInboundPorts []PortRange `json:"excludeInboundPorts,omitempty"`

	// ExcludeInterfaces are pod interfaces whose traffic is never captured.
	ExcludeInterfaces []string `json:"excludeInterfaces,omitempty"`

	// DNSCapture sends UDP and TCP port 53 to DNSPort (ISTIO_META_DNS_CAPTURE).
	DNSCapture bool   `json:"dnsCapture"`
	DNSPort    uint16 `json:"dnsPort"`

	// DualStack is ISTIO_DUAL_STACK: capture IPv6 as well in a pod that has
	// both families. Without it Istio captures IPv6 only in IPv6-only pods
	// (its sidecar then listens on IPv4 only); see CaptureIPv6.
	DualStack bool `json:"dualStack,omitempty"`

	// DropInvalid is INVALID_DROP: the iptables and nftables backends drop
	// TCP packets conntrack marks INVALID before they reach the pod, as
	// istio-iptables does against REDIRECT's out-of-window packets that
	// escape the reverse NAT and make the app reset the connection. The
	// eBPF backend NATs nothing and needs no such drop (see the README).
	DropInvalid bool `json:"dropInvalid,omitempty"`
}

// CapturesAnything reports whether s redirects any traffic at all
// (interceptionMode NONE gives Settings that do not). A proxy uid or gid
// alone captures: istio-iptables sends the sidecar's own connections to
// its pod's address to InboundPort even when nothing else is included.
func (s Settings) CapturesAnything() bool {
	return s.OutboundAllCIDRs || len(s.IncludeOutboundCIDRs) > 0 || len(s.IncludeOutboundPorts) > 0 ||
		s.InboundAllPorts || len(s.IncludeInboundPorts) > 0 || s.DNSCapture ||
		len(s.ProxyUIDs) > 0 || len(s.ProxyGIDs) > 0
}

// CaptureIPv6 reports whether IPv6 is captured in a pod with these
// addresses, as istio-iptables decides it: in an IPv6-only pod, or in a
// dual-stack pod with DualStack. IPv4 is always captured.
func (s Settings) CaptureIPv6(podIPs []netip.Addr) bool {
	var v4, v6 bool
	for _, ip := range podIPs {
		ip = ip.Unmap()
		if ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() {
			continue
		}
		if ip.Is4() {
			v4 = true
		} else {
			v6 = true
		}
	}
	return v6 && (!v4 || s.DualStack)
}

// IncludesLoopback reports whether an included outbound CIDR is a loopback
// one. istio-iptables then also captures the app's own connections to its
// pod address over lo, which it otherwise lets through.
func (s Settings) IncludesLoopback() bool {
	for _, p := range s.IncludeOutboundCIDRs {
		if p.Addr().IsLoopback() {
			return true
		}
	}
	return false
}
