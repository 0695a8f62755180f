package main

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/sidelane/sidelane/agent/cnirpc"
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
	var b strings.Builder
	if err := printExplanation(&b, ex); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"shop/web", "k8s/0123456789ab/eth0", "10.1.0.5/24", "mode:", "sidecar", "Istio injected a sidecar",
		"Istio defaults", "counter redirected:", "7", "classifier now:", "node: namespace labeled ambient", "live move is pending"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}
