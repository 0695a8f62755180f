package bpf

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/sidelane/sidelane/istio/capture"
)

// MaxProxyIDs is how many proxy uids (and gids) one pod may have; the BPF
// program checks a fixed-size array.
const MaxProxyIDs = 4

// Pod flags, as capture.c's POD_* defines.
const (
	flagOutboundAll uint16 = 0x1
	flagInboundAll  uint16 = 0x2
	flagDNS         uint16 = 0x4
	flagLoopbackIn  uint16 = 0x8
	flagNoIPv6      uint16 = 0x10

	// The pod has no rule of a kind, so the programs skip its lookup
	// (Pod.config derives them from the rules; a pod written without
	// them is looked up as before).
	flagNoRoutes       uint16 = 0x40
	flagNoExclPortsOut uint16 = 0x80
	flagNoExclCIDRsOut uint16 = 0x100
	flagNoInclPortsOut uint16 = 0x200
)

// CIDR and port rule kinds, as capture.c's CIDR_* and PORT_* defines.
const (
	cidrExcludeOut uint8 = 1
	cidrIncludeOut uint8 = 2
	cidrLocal      uint8 = 3
	cidrRoute      uint8 = 4

	// cidr_key.family: a range matches addresses of its own family only
	// (IPv4 is stored v4-mapped; "::/0" must not cover it).
	cidrFamilyV4 = 4
	cidrFamilyV6 = 6

	portExcludeOut uint8 = 1
	portIncludeOut uint8 = 2
	portExcludeIn  uint8 = 3
	portIncludeIn  uint8 = 4
)

// Pod is everything the BPF programs need for one enrolled pod, in plain Go
// types. PlanPod builds it from capture.Settings; the loader turns it into
// map entries.
type Pod struct {
	OutboundPort, InboundPort, DNSPort uint16
	Flags                              uint16
	ProxyUIDs, ProxyGIDs               []uint32
	// IPs are the pod's own addresses (Istio's "-o lo" destinations and the
	// same-node inbound lookup).
	IPs   []netip.Addr
	CIDRs []cidrRule
	Ports []portRule
}

type cidrRule struct {
	Kind   uint8
	Prefix netip.Prefix // IPv4 prefixes are stored v4-mapped by the loader
	Value  uint8        // 1 unless Kind is cidrRoute
}

// Route is one route of the pod's main routing table: a destination and
// whether it leaves by one of Istio's excludeInterfaces.
type Route struct {
	Dst      netip.Prefix
	Excluded bool
}

// WithRoutes adds the pod's routes, needed when interfaces are excluded:
// outbound connections routed via an excluded interface are not captured.
func (p Pod) WithRoutes(routes []Route) Pod {
	for _, r := range routes {
		v := uint8(0)
		if r.Excluded {
			v = 1
		}
		p.CIDRs = append(p.CIDRs, cidrRule{Kind: cidrRoute, Prefix: unmapPrefix(r.Dst), Value: v})
	}
	return p
}

// unmapPrefix turns a route given as an IPv4-mapped IPv6 prefix (some
// netlink paths do) into its IPv4 prefix.
func unmapPrefix(p netip.Prefix) netip.Prefix {
	if p.Addr().Is4In6() && p.Bits() >= 96 {
		return netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96).Masked()
	}
	return p.Masked()
}

// portRule matches the ports whose top Bits bits equal Port's.
type portRule struct {
	Kind uint8
	Port uint16
	Bits int
}

// PlanPod checks s and turns it into a Pod. It never returns a partial
// Pod: any invalid field is an error naming it.
func PlanPod(ips []netip.Prefix, s capture.Settings) (Pod, error) {
	var errs []error
	for name, port := range map[string]uint16{"outboundPort": s.OutboundPort, "inboundPort": s.InboundPort} {
		if port == 0 {
			errs = append(errs, fmt.Errorf("%s: must not be 0", name))
		}
	}
	if s.DNSCapture && s.DNSPort == 0 {
		errs = append(errs, errors.New("dnsPort: must not be 0 with dnsCapture"))
	}
	if len(s.ProxyUIDs) > MaxProxyIDs {
		errs = append(errs, fmt.Errorf("proxyUIDs: %d given, at most %d supported", len(s.ProxyUIDs), MaxProxyIDs))
	}
	if len(s.ProxyGIDs) > MaxProxyIDs {
		errs = append(errs, fmt.Errorf("proxyGIDs: %d given, at most %d supported", len(s.ProxyGIDs), MaxProxyIDs))
	}
	p := Pod{
		OutboundPort: s.OutboundPort,
		InboundPort:  s.InboundPort,
		DNSPort:      s.DNSPort,
		ProxyUIDs:    slices.Clone(s.ProxyUIDs),
		ProxyGIDs:    slices.Clone(s.ProxyGIDs),
	}
	if s.OutboundAllCIDRs {
		p.Flags |= flagOutboundAll
	}
	if s.InboundAllPorts {
		p.Flags |= flagInboundAll
	}
	if s.DNSCapture {
		p.Flags |= flagDNS
	}
	for _, c := range s.IncludeOutboundCIDRs {
		if c.Addr().IsLoopback() {
			// istio-iptables then drops its "app over lo: RETURN" rule.
			p.Flags |= flagLoopbackIn
		}
	}
	if !captureIPv6(ips, s.DualStack) {
		p.Flags |= flagNoIPv6
	}
	for i, ip := range ips {
		if !ip.IsValid() {
			errs = append(errs, fmt.Errorf("ips[%d]: invalid address", i))
			continue
		}
		p.IPs = append(p.IPs, ip.Addr().Unmap())
		p.CIDRs = append(p.CIDRs, cidrRule{Kind: cidrLocal, Prefix: netip.PrefixFrom(ip.Addr().Unmap(), ip.Addr().Unmap().BitLen()), Value: 1})
	}
	addCIDRs := func(field string, kind uint8, list []netip.Prefix) {
		for i, c := range list {
			if !c.IsValid() {
				errs = append(errs, fmt.Errorf("%s[%d]: invalid prefix", field, i))
				continue
			}
			// An IPv4-mapped IPv6 range stays IPv6, as Istio hands it to
			// ip6tables: it never matches IPv4 traffic.
			p.CIDRs = append(p.CIDRs, cidrRule{Kind: kind, Prefix: c.Masked(), Value: 1})
		}
	}
	addCIDRs("excludeOutboundCIDRs", cidrExcludeOut, s.ExcludeOutboundCIDRs)
	addCIDRs("includeOutboundCIDRs", cidrIncludeOut, s.IncludeOutboundCIDRs)
	addPorts := func(field string, kind uint8, list []capture.PortRange, encode bool) {
		for i, r := range list {
			if r.First > r.Last {
				errs = append(errs, fmt.Errorf("%s[%d]: first %d > last %d", field, i, r.First, r.Last))
				continue
			}
			if !encode {
				continue
			}
			for _, pp := range portPrefixes(r.First, r.Last) {
				p.Ports = append(p.Ports, portRule{Kind: kind, Port: pp.Port, Bits: pp.Bits})
			}
		}
	}
	addPorts("excludeOutboundPorts", portExcludeOut, s.ExcludeOutboundPorts, true)
	addPorts("includeOutboundPorts", portIncludeOut, s.IncludeOutboundPorts, true)
	// istio-iptables' ISTIO_INBOUND RETURNs HBONE's port first, then applies
	// excludeInboundPorts only with includeInboundPorts "*": with an explicit
	// list every listed port is captured, even an excluded one or 15020.
	// (capture.c checks PORT_EXCLUDE_IN before the include list, so only
	// HBONE's port may be there then.)
	addPorts("excludeInboundPorts", portExcludeIn, s.ExcludeInboundPorts, s.InboundAllPorts)
	if !s.InboundAllPorts {
		p.Ports = append(p.Ports, portRule{Kind: portExcludeIn, Port: capture.HBONEPort, Bits: 16})
	}
	addPorts("includeInboundPorts", portIncludeIn, s.IncludeInboundPorts, true)
	if len(errs) > 0 {
		slices.SortFunc(errs, func(a, b error) int { return strings.Compare(a.Error(), b.Error()) })
		return Pod{}, errors.Join(errs...)
	}
	return p, nil
}

// captureIPv6 is istio-iptables' choice: IPv6 is captured in an IPv6-only
// pod, and in a dual-stack pod only with ISTIO_DUAL_STACK.
func captureIPv6(ips []netip.Prefix, dualStack bool) bool {
	var v4, v6 bool
	for _, p := range ips {
		ip := p.Addr().Unmap()
		if !ip.IsValid() || ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() {
			continue
		}
		if ip.Is4() {
			v4 = true
		} else {
			v6 = true
		}
	}
	return v6 && (!v4 || dualStack)
}

type portPrefix struct {
	Port uint16
	Bits int
}

// portPrefixes covers [first, last] with the fewest aligned power-of-two
// blocks (at most 30 for 16-bit ports), so an LPM trie answers "is this
// port in the range" with one lookup however wide the range.
func portPrefixes(first, last uint16) []portPrefix {
	var out []portPrefix
	lo, hi := uint32(first), uint32(last)
	for lo <= hi {
		size := uint32(1)
		// Grow the block while lo stays aligned to it and it fits.
		for size < 1<<16 && lo%(size*2) == 0 && lo+size*2-1 <= hi {
			size *= 2
		}
		bits := 16
		for s := size; s > 1; s >>= 1 {
			bits--
		}
		out = append(out, portPrefix{Port: uint16(lo), Bits: bits})
		lo += size
	}
	return out
}

// flagNode marks a per-node pod (capture.c's POD_NODE).
const flagNode uint16 = 0x20

// NodePodSettings is what a pod in per-node mode (no sidecar; the node
// proxy captures for it) needs beyond its addresses.
type NodePodSettings struct {
	// InboundPort is where the node proxy's inbound listener for this pod
	// listens inside the pod's netns (Envoy: a listener whose address has
	// network_namespace_filepath set to the pod's netns). Required.
	InboundPort uint16
	// Exclusions, as Istio's annotations for sidecars.
	ExcludeOutboundCIDRs []netip.Prefix
	ExcludeOutboundPorts []capture.PortRange
	ExcludeInboundPorts  []capture.PortRange
}

// PlanNodePod checks s and turns it into a per-node Pod: every outbound
// TCP connection leaving the pod goes to the node proxy (whose address is
// node-wide, see Capture.SetNodeProxy), every inbound one to InboundPort,
// except the exclusions. Any invalid field is an error naming it.
func PlanNodePod(ips []netip.Prefix, s NodePodSettings) (Pod, error) {
	if s.InboundPort == 0 {
		return Pod{}, errors.New("inboundPort: must not be 0")
	}
	// The sidecar planner does the validation and encoding; the fields a
	// per-node pod does not use stay zero (no proxy uids: the proxy is not
	// in the pod).
	p, err := PlanPod(ips, capture.Settings{
		OutboundPort:         s.InboundPort, // unused in per-node mode, must be non-zero
		InboundPort:          s.InboundPort,
		OutboundAllCIDRs:     true,
		InboundAllPorts:      true,
		DualStack:            true,
		ExcludeOutboundCIDRs: s.ExcludeOutboundCIDRs,
		ExcludeOutboundPorts: s.ExcludeOutboundPorts,
		ExcludeInboundPorts:  s.ExcludeInboundPorts,
	})
	if err != nil {
		return Pod{}, err
	}
	p.Flags |= flagNode
	return p, nil
}

// origNode is capture.c's ORIG_NODE: an orig_dst recorded for a per-node
// pod's connection to the node proxy.
const origNode uint32 = 0x1

// emptyKinds is the flagNo* bits for the rule kinds p has none of.
func (p Pod) emptyKinds() uint16 {
	flags := flagNoRoutes | flagNoExclPortsOut | flagNoExclCIDRsOut | flagNoInclPortsOut
	for _, r := range p.CIDRs {
		switch r.Kind {
		case cidrRoute:
			flags &^= flagNoRoutes
		case cidrExcludeOut:
			flags &^= flagNoExclCIDRsOut
		}
	}
	for _, r := range p.Ports {
		switch r.Kind {
		case portExcludeOut:
			flags &^= flagNoExclPortsOut
		case portIncludeOut:
			flags &^= flagNoInclPortsOut
		}
	}
	return flags
}
