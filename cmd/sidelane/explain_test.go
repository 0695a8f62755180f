package main

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/sidelane/sidelane/agent/cnirpc"
	"github.com/sidelane/sidelane/istio/capture"
)

func TestPrintExplanation(t *testing.T) {
	ex := &cnirpc.Explanation{
		Pod: cnirpc.PodRef{Namespace: "shop", Name: "web"}, Datapath: "ebpf",
		Attachments: []cnirpc.ExplainedAttachment{{
			Network: "k8s", ContainerID: "0123456789abcdef", IfName: "eth0", Netns: "/var/run/netns/x",
			IPs: []netip.Prefix{netip.MustParsePrefix("10.1.0.5/24")}, Mode: "sidecar", Reason: "Istio injected a sidecar",
			Added: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), Counters: map[string]uint64{"redirected": 7},
		}},
		Current: &cnirpc.ExplainedDecision{Mode: "node", Reason: "namespace labeled ambient"},
	}
	ex.Attachments = append(ex.Attachments, ex.Attachments[0])
	ex.Attachments[1].Counters = nil
	ex.Attachments[1].Capture = &capture.Settings{OutboundPort: 15001, InboundPort: 15006, OutboundAllCIDRs: true,
		ExcludeOutboundPorts: []capture.PortRange{{First: 5432, Last: 5432}}, InboundAllPorts: true,
		ExcludeInboundPorts: []capture.PortRange{{First: 15020, Last: 15021}}, ProxyUIDs: []uint32{1337}, ProxyGIDs: []uint32{1337}}
	var b strings.Builder
	if err := printExplanation(&b, ex); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"shop/web", "k8s/0123456789ab/eth0", "10.1.0.5/24", "mode:", "sidecar", "Istio injected a sidecar",
		"Istio defaults", "outbound: all destinations -> :15001, except ports 5432",
		"inbound: all ports -> :15006, except ports 15020-15021", "DNS: not captured", "counter redirected:", "7", "classifier now:", "node: namespace labeled ambient", "live move is pending"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}
