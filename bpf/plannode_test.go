package bpf

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/sidelane/sidelane/istio/capture"
)

func TestPlanNodePod(t *testing.T) {
	ips := []netip.Prefix{netip.MustParsePrefix("10.1.0.5/24")}
	tests := []struct {
		name    string
		s       NodePodSettings
		wantErr string
	}{
		{"inbound port only", NodePodSettings{InboundPort: 15006}, ""},
		{"with exclusions", NodePodSettings{InboundPort: 15006,
			ExcludeOutboundCIDRs: []netip.Prefix{netip.MustParsePrefix("10.2.0.0/16")},
			ExcludeOutboundPorts: []capture.PortRange{{First: 20, Last: 30}},
			ExcludeInboundPorts:  []capture.PortRange{{First: 15020, Last: 15021}}}, ""},
		{"no inbound port", NodePodSettings{}, "inboundPort"},
		{"bad range", NodePodSettings{InboundPort: 15006, ExcludeInboundPorts: []capture.PortRange{{First: 9, Last: 8}}}, "excludeInboundPorts[0]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := PlanNodePod(ips, tt.s)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want one naming %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			// A per-node pod has no proxy of its own: no owner rules, every
			// port and CIDR captured but the exclusions.
			if p.Flags&flagNode == 0 || p.Flags&flagOutboundAll == 0 || p.Flags&flagInboundAll == 0 {
				t.Errorf("flags %#x, want node, outbound-all and inbound-all", p.Flags)
			}
			if len(p.ProxyUIDs)+len(p.ProxyGIDs) != 0 {
				t.Errorf("proxy ids %v %v, want none", p.ProxyUIDs, p.ProxyGIDs)
			}
			if p.InboundPort != tt.s.InboundPort {
				t.Errorf("inbound port %d, want %d", p.InboundPort, tt.s.InboundPort)
			}
		})
	}
}
