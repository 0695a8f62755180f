package bpf

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/sidelane/sidelane/istio/capture"
)

func TestPortPrefixes(t *testing.T) {
	tests := []struct {
		first, last uint16
		want        []portPrefix
	}{
		{80, 80, []portPrefix{{80, 16}}},
		{0, 65535, []portPrefix{{0, 0}}},
		{8000, 8003, []portPrefix{{8000, 14}}},
		{15000, 15010, []portPrefix{{15000, 13}, {15008, 15}, {15010, 16}}},
		{65535, 65535, []portPrefix{{65535, 16}}},
	}
	for _, tt := range tests {
		got := portPrefixes(tt.first, tt.last)
		if len(got) != len(tt.want) {
			t.Fatalf("portPrefixes(%d, %d) = %v, want %v", tt.first, tt.last, got, tt.want)
		}
		for i := range got {
			if got[i] != tt.want[i] {
				t.Fatalf("portPrefixes(%d, %d) = %v, want %v", tt.first, tt.last, got, tt.want)
			}
		}
	}
}

// Every port is matched by exactly the prefixes of the ranges holding it.
func TestPortPrefixesCoverExactly(t *testing.T) {
	ranges := [][2]uint16{{1, 1}, {3, 1000}, {1023, 1025}, {15000, 15099}, {40000, 65535}, {0, 0}}
	for _, r := range ranges {
		pre := portPrefixes(r[0], r[1])
		for p := 0; p <= 65535; p++ {
			n := 0
			for _, pp := range pre {
				mask := uint16(0xffff) << (16 - pp.Bits)
				if pp.Bits == 0 {
					mask = 0
				}
				if uint16(p)&mask == pp.Port&mask {
					n++
				}
			}
			in := p >= int(r[0]) && p <= int(r[1])
			if (in && n != 1) || (!in && n != 0) {
				t.Fatalf("range %v: port %d matched %d prefixes", r, p, n)
			}
		}
	}
}

func TestPlanPodErrors(t *testing.T) {
	ok := capture.Settings{OutboundPort: 15001, InboundPort: 15006}
	tests := []struct {
		name string
		mod  func(*capture.Settings)
		want string
	}{
		{"no outbound port", func(s *capture.Settings) { s.OutboundPort = 0 }, "outboundPort"},
		{"dns without port", func(s *capture.Settings) { s.DNSCapture = true }, "dnsPort"},
		{"too many uids", func(s *capture.Settings) { s.ProxyUIDs = []uint32{1, 2, 3, 4, 5} }, "proxyUIDs"},
		{"reversed range", func(s *capture.Settings) {
			s.ExcludeInboundPorts = []capture.PortRange{{First: 9, Last: 8}}
		}, "excludeInboundPorts[0]"},
		{"bad prefix", func(s *capture.Settings) { s.ExcludeOutboundCIDRs = []netip.Prefix{{}} }, "excludeOutboundCIDRs[0]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := ok
			tt.mod(&s)
			_, err := PlanPod(nil, s)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("PlanPod error = %v, want it to name %q", err, tt.want)
			}
		})
	}
	if _, err := PlanPod(nil, ok); err != nil {
		t.Fatalf("valid settings: %v", err)
	}
}

func TestPlanPodMapsIPv4(t *testing.T) {
	s := capture.Settings{OutboundPort: 15001, InboundPort: 15006,
		ExcludeOutboundCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.2.3/16")}}
	p, err := PlanPod([]netip.Prefix{netip.MustParsePrefix("10.0.0.5/24")}, s)
	if err != nil {
		t.Fatal(err)
	}
	want := []cidrRule{
		{cidrLocal, netip.MustParsePrefix("10.0.0.5/32"), 1},
		{cidrExcludeOut, netip.MustParsePrefix("10.1.0.0/16"), 1},
	}
	if len(p.CIDRs) != len(want) || p.CIDRs[0] != want[0] || p.CIDRs[1] != want[1] {
		t.Fatalf("CIDRs = %v, want %v", p.CIDRs, want)
	}
}

// FuzzPortPrefixes checks that the prefixes of any range match exactly the
// ports inside it, at the edges and at a fuzzed probe port.
func FuzzPortPrefixes(f *testing.F) {
	f.Add(uint16(15000), uint16(15099), uint16(15050))
	f.Add(uint16(0), uint16(65535), uint16(1))
	f.Fuzz(func(t *testing.T, first, last, probe uint16) {
		if first > last {
			first, last = last, first
		}
		pre := portPrefixes(first, last)
		if len(pre) > 30 {
			t.Fatalf("range %d-%d: %d prefixes, want at most 30", first, last, len(pre))
		}
		for _, p := range []int{int(first) - 1, int(first), int(last), int(last) + 1, int(probe)} {
			if p < 0 || p > 65535 {
				continue
			}
			n := 0
			for _, pp := range pre {
				var mask uint16
				if pp.Bits > 0 {
					mask = uint16(0xffff) << (16 - pp.Bits)
				}
				if uint16(p)&mask == pp.Port&mask {
					n++
				}
			}
			in := p >= int(first) && p <= int(last)
			if (in && n != 1) || (!in && n != 0) {
				t.Fatalf("range %d-%d: port %d matched %d prefixes", first, last, p, n)
			}
		}
	})
}

func TestPlanPodFlags(t *testing.T) {
	v4 := netip.MustParsePrefix("10.0.0.5/24")
	v6 := netip.MustParsePrefix("fd00::5/64")
	base := capture.Settings{OutboundPort: 15001, InboundPort: 15006}
	tests := []struct {
		name string
		ips  []netip.Prefix
		mod  func(*capture.Settings)
		want uint16
	}{
		{"IPv4-only pod", []netip.Prefix{v4}, nil, flagNoIPv6},
		{"IPv6-only pod captures IPv6", []netip.Prefix{v6}, nil, 0},
		{"dual-stack without ISTIO_DUAL_STACK leaves IPv6", []netip.Prefix{v4, v6}, nil, flagNoIPv6},
		{"dual-stack with ISTIO_DUAL_STACK", []netip.Prefix{v4, v6}, func(s *capture.Settings) { s.DualStack = true }, 0},
		{"loopback range included", []netip.Prefix{v6}, func(s *capture.Settings) {
			s.IncludeOutboundCIDRs = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
		}, flagLoopbackIn},
		{"everything", []netip.Prefix{v6}, func(s *capture.Settings) {
			s.OutboundAllCIDRs, s.InboundAllPorts, s.DNSCapture, s.DNSPort = true, true, true, 15053
		}, flagOutboundAll | flagInboundAll | flagDNS},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := base
			if tt.mod != nil {
				tt.mod(&s)
			}
			p, err := PlanPod(tt.ips, s)
			if err != nil {
				t.Fatal(err)
			}
			if p.Flags != tt.want {
				t.Errorf("flags = %#x, want %#x", p.Flags, tt.want)
			}
		})
	}
}

// TestPlanPodInboundExcludesOnlyWithWildcard: istio-iptables applies
// excludeInboundPorts only with includeInboundPorts "*"; with an explicit
// list it RETURNs just HBONE's port (15008) and captures every listed port,
// even one also excluded or one of Istio's own (15020).
func TestPlanPodInboundExcludesOnlyWithWildcard(t *testing.T) {
	s, _, err := capture.Parse(capture.Pod{Annotations: map[string]string{
		capture.AnnotationIncludeInboundPorts: "80,15020",
		capture.AnnotationExcludeInboundPorts: "80,9090",
	}})
	if err != nil {
		t.Fatal(err)
	}
	p, err := PlanPod(nil, s)
	if err != nil {
		t.Fatal(err)
	}
	var excluded, included []uint16
	for _, r := range p.Ports {
		switch r.Kind {
		case portExcludeIn:
			excluded = append(excluded, r.Port)
		case portIncludeIn:
			included = append(included, r.Port)
		}
	}
	if len(excluded) != 1 || excluded[0] != capture.HBONEPort {
		t.Errorf("inbound excludes = %v, want only %d", excluded, capture.HBONEPort)
	}
	if len(included) != 2 || included[0] != 80 || included[1] != 15020 {
		t.Errorf("inbound includes = %v, want [80 15020]", included)
	}

	// With "*" the excludes apply, Istio's own ports among them.
	s.InboundAllPorts, s.IncludeInboundPorts = true, nil
	if p, err = PlanPod(nil, s); err != nil {
		t.Fatal(err)
	}
	excluded = nil
	for _, r := range p.Ports {
		if r.Kind == portExcludeIn {
			excluded = append(excluded, r.Port)
		}
	}
	if want := []uint16{15008, 80, 9090, 15020, 15021, 15090}; !slices.Equal(excluded, want) {
		t.Errorf("inbound excludes with * = %v, want %v", excluded, want)
	}
}

// The programs skip a rule kind's lookup only when the pod has no rule of
// that kind: each setting that writes one clears its bit.
func TestPlanPodEmptyKinds(t *testing.T) {
	v4 := netip.MustParsePrefix("10.0.0.5/24")
	all := flagNoRoutes | flagNoExclPortsOut | flagNoExclCIDRsOut | flagNoInclPortsOut
	ports := []capture.PortRange{{First: 9000, Last: 9010}}
	cidrs := []netip.Prefix{netip.MustParsePrefix("10.9.0.0/16")}
	tests := []struct {
		name   string
		mod    func(*capture.Settings)
		routes []Route
		want   uint16
	}{
		{"defaults", nil, nil, all},
		{"excluded outbound ports", func(s *capture.Settings) { s.ExcludeOutboundPorts = ports }, nil, all &^ flagNoExclPortsOut},
		{"included outbound ports", func(s *capture.Settings) { s.IncludeOutboundPorts = ports }, nil, all &^ flagNoInclPortsOut},
		{"excluded outbound CIDRs", func(s *capture.Settings) { s.ExcludeOutboundCIDRs = cidrs }, nil, all &^ flagNoExclCIDRsOut},
		// Included CIDRs and inbound rules have lookups of their own,
		// never skipped.
		{"included CIDRs and inbound ports", func(s *capture.Settings) {
			s.IncludeOutboundCIDRs = cidrs
			s.IncludeInboundPorts = ports
			s.ExcludeInboundPorts = ports
		}, nil, all},
		{"routes (excluded interfaces)", nil, []Route{{Dst: cidrs[0], Excluded: true}}, all &^ flagNoRoutes},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := capture.Settings{OutboundPort: 15001, InboundPort: 15006, OutboundAllCIDRs: true}
			if tt.mod != nil {
				tt.mod(&s)
			}
			p, err := PlanPod([]netip.Prefix{v4}, s)
			if err != nil {
				t.Fatal(err)
			}
			p = p.WithRoutes(tt.routes)
			if got := p.emptyKinds(); got != tt.want {
				t.Errorf("emptyKinds = %#x, want %#x", got, tt.want)
			}
			if p.Flags&all != 0 {
				t.Errorf("PlanPod's own flags %#x carry derived bits", p.Flags)
			}
		})
	}
}
