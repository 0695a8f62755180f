package main

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"
	"unicode"

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

// TestPrintExplanationEscapesPodText: the reason (Istio's revision, from
// the pod's sidecar.istio.io/status annotation), the policy names and the
// other strings explain prints come from pods and their owners. Control
// characters in them must reach the terminal escaped, never raw (an ESC
// could rewrite the operator's screen or title), and a newline must not
// fake extra lines.
func TestPrintExplanationEscapesPodText(t *testing.T) {
	evil := "revision \x1b]0;pwned\x07\x1b[2J\nmode:\tnone\u009b31m\xff"
	ex := &cnirpc.Explanation{
		Pod: cnirpc.PodRef{Namespace: "shop", Name: "web"}, Datapath: "ebpf",
		Attachments: []cnirpc.ExplainedAttachment{{
			Network: "k8s\x1b[1m", ContainerID: "c\x1b", IfName: "eth0\r", Netns: "/var/run/netns/\x1bx",
			Mode: "sidecar", Reason: evil, Counters: map[string]uint64{"odd\x1bkey": 1},
		}},
		L7:      &cnirpc.ExplainedL7{Policies: []string{"p\x1b[8m"}, Ports: []int32{80}},
		Current: &cnirpc.ExplainedDecision{Mode: "sidecar", Reason: evil},
	}
	var b strings.Builder
	if err := printExplanation(&b, ex); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, bad := range []string{"\x1b", "\x07", "\r", "\u009b", "\xff", "\nmode:\tnone"} {
		if strings.Contains(out, bad) {
			t.Errorf("output carries %q unescaped:\n%s", bad, out)
		}
	}
	for _, want := range []string{`revision \x1b]0;pwned\a\x1b[2J\nmode:\tnone\u009b31m\xff`, `k8s\x1b[1m`, `p\x1b[8m`, `odd\x1bkey`} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks the escaped %q:\n%s", want, out)
		}
	}
	if n := strings.Count(out, "\n"); n != 9 {
		t.Errorf("output has %d lines, want 9 (a newline in pod text must not add lines):\n%s", n, out)
	}
}

// TestPrintJSONEscapesPodText: -o json carries the same pod text escaped
// too, including what encoding/json leaves raw (DEL, C1 controls, bidi
// overrides), and still decodes to the original strings.
func TestPrintJSONEscapesPodText(t *testing.T) {
	evil := "rev \x1b[2J \x7f \u009b31m \u202eevil \U000e0041 \\ end"
	ex := &cnirpc.Explanation{Pod: cnirpc.PodRef{Namespace: "shop", Name: "web"}, Datapath: "ebpf",
		Attachments: []cnirpc.ExplainedAttachment{{Network: "k8s", Mode: "sidecar", Reason: evil}}}
	var b strings.Builder
	if err := printJSON(&b, ex); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, r := range out {
		if r != '\n' && !unicode.IsPrint(r) {
			t.Errorf("output carries %U raw:\n%s", r, out)
		}
	}
	var back cnirpc.Explanation
	if err := json.Unmarshal([]byte(out), &back); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, out)
	}
	if back.Attachments[0].Reason != evil {
		t.Errorf("reason decodes to %q, want %q", back.Attachments[0].Reason, evil)
	}
}

// Istio applies excludeInboundPorts only with includeInboundPorts "*":
// explain must not claim exclusions for an explicit list.
func TestCaptureLinesInboundExcludesOnlyWithWildcard(t *testing.T) {
	list := &capture.Settings{InboundPort: 15006, IncludeInboundPorts: []capture.PortRange{{First: 80, Last: 80}},
		ExcludeInboundPorts: []capture.PortRange{{First: 80, Last: 80}}}
	all := &capture.Settings{InboundPort: 15006, InboundAllPorts: true, ExcludeInboundPorts: list.ExcludeInboundPorts}
	if got := strings.Join(captureLines(list), "\n"); !strings.Contains(got, "inbound: ports 80 -> :15006") || strings.Contains(got, "except ports 80") {
		t.Errorf("explicit list:\n%s", got)
	}
	if got := strings.Join(captureLines(all), "\n"); !strings.Contains(got, "inbound: all ports -> :15006, except ports 80") {
		t.Errorf("wildcard:\n%s", got)
	}
}
