//go:build linux

package conformance

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	corev1 "k8s.io/api/core/v1"

	"github.com/sidelane/sidelane/internal/istiocni"
	"github.com/sidelane/sidelane/internal/podnet"
	"github.com/sidelane/sidelane/internal/testenv"
	"github.com/sidelane/sidelane/istio/capture"
	capturekube "github.com/sidelane/sidelane/istio/capture/kube"
)

// The capture conformance table: one table of pods (Istio capture knobs)
// and connections, each with the outcome Istio's capture gives, asserted
// against every capture backend on real pods in network namespaces. The
// outcomes:
//
//	out     reached the sidecar's outbound listener (15001) with the
//	        original destination intact
//	in      reached the sidecar's inbound listener (15006), likewise
//	dns     reached istio-agent's DNS port (15053), likewise
//	direct  reached the destination without the sidecar
//	refused the connection was refused
const (
	wantOut     = "out"
	wantIn      = "in"
	wantDNS     = "dns"
	wantDirect  = "direct"
	wantRefused = "refused"
)

// Probe directions.
const (
	fromPod    = "out"      // the pod connects to the remote namespace
	toPod      = "in"       // the remote namespace connects to the pod
	podToSelf  = "self"     // the pod connects to its own address
	podToLocal = "loopback" // the pod connects to 127.0.0.1 / ::1
)

const (
	appUID   = 1000
	proxyUID = capture.DefaultProxyUID
)

type capProbe struct {
	dir  string
	ipv6 bool
	uid  uint32 // owner of the pod-side socket (fromPod, podToSelf, podToLocal)
	gid  uint32 // its group; 0 means the same as uid
	// dst picks the remote address: "a" (never excluded) or "b" (the one
	// cases exclude or leave out).
	dst  string
	port uint16
	udp  bool // a UDP datagram instead of a TCP connection
	want string
	// istioNFT is the outcome under Istio's nftables backend where it
	// differs from its iptables backend (want); sidelane's backends all
	// give want. See istioNFT().
	istioNFT string
	// ebpf is the outcome under sidelane's eBPF backend where it is
	// stricter than Istio's REDIRECT rules (want). See ebpfStricter().
	ebpf string
}

func (p capProbe) String() string {
	fam := "v4"
	if p.ipv6 {
		fam = "v6"
	}
	proto := ""
	if p.udp {
		proto = "udp"
	}
	s := fmt.Sprintf("%s-%s-%s%d", p.dir, fam, proto, p.port)
	if p.dir != toPod {
		s += "-uid" + strconv.Itoa(int(p.uid))
		if p.gid != 0 {
			s += "-gid" + strconv.Itoa(int(p.gid))
		}
	}
	if p.dst == "b" {
		s += "-b"
	}
	return s
}

type capCase struct {
	name string
	// pod's annotations may use {A4} {B4} {A6} {B6}: the remote addresses.
	pod      capture.Pod
	ipv6Only bool // the pod has no IPv4 address
	// rejects names the annotation Istio refuses this pod for (istio-cni's
	// validation or istio-iptables itself), so its CNI ADD fails. sidelane
	// fails the ADD too (the agent's strict capture.Parse, checked to name
	// the annotation and the value); the probes then compare sidelane's
	// fallback (capture.ParseOrDefaults) with Istio's defaults for the
	// same pod (its proxy uid/gid and env kept).
	rejects string
	// istioCNIRefuses says why istio-cni's NewRedirect refuses this pod
	// (its ADD fails) although sidelane accepts it on purpose; the case's
	// comment says what sidelane does instead. The references check the
	// refusal and run no probe.
	istioCNIRefuses string
	probes          []capProbe
}

func out(ipv6 bool, uid uint32, dst string, port uint16, want string) capProbe {
	return capProbe{dir: fromPod, ipv6: ipv6, uid: uid, dst: dst, port: port, want: want}
}

// istioNFT marks p as one where Istio's two backends disagree: got is
// what Istio's nftables backend gives. sidelane follows Istio's iptables
// backend in every such case: without ISTIO_DUAL_STACK Istio's nftables
// rules (inet tables) also redirect a dual-stack pod's IPv6, to listeners
// its Envoy opens on IPv4 only then (Envoy binds [::] only with
// ISTIO_DUAL_STACK), so a real pod's IPv6 connections would be refused,
// where its iptables backend (no ip6tables rules) leaves them direct.
func istioNFT(p capProbe, got string) capProbe { p.istioNFT = got; return p }

// ebpfStricter marks p as one where the eBPF backend, which NATs
// nothing, gives got where Istio's REDIRECT rules give p.want (an
// out-of-window segment resetting a connection without INVALID_DROP).
func ebpfStricter(p capProbe, got string) capProbe { p.ebpf = got; return p }

// withGID sets a probe's socket group apart from its user.
func withGID(p capProbe, gid uint32) capProbe { p.gid = gid; return p }

func outUDP(ipv6 bool, uid uint32, port uint16, want string) capProbe {
	return capProbe{dir: fromPod, ipv6: ipv6, uid: uid, dst: "a", port: port, udp: true, want: want}
}
func in(ipv6 bool, port uint16, want string) capProbe {
	return capProbe{dir: toPod, ipv6: ipv6, port: port, want: want}
}
func self(ipv6 bool, uid uint32, port uint16, want string) capProbe {
	return capProbe{dir: podToSelf, ipv6: ipv6, uid: uid, port: port, want: want}
}
func local(ipv6 bool, uid uint32, port uint16, want string) capProbe {
	return capProbe{dir: podToLocal, ipv6: ipv6, uid: uid, port: port, want: want}
}

var dualStack = map[string]string{capture.EnvDualStack: "true"}

// captureCases is the table. Outcomes are Istio's (istio-cni's defaults
// and rules); the reference backends (istio-cni's own code) check the
// table itself against Istio. A case's pod is what the test injects
// (istiocni.Inject): proxyMetadata becomes istio-proxy env, and an unset
// uid/gid the injector's 1337.
var captureCases = []capCase{
	{name: "defaults", probes: []capProbe{
		out(false, appUID, "a", 80, wantOut),
		out(false, appUID, "b", 443, wantOut),
		out(false, proxyUID, "a", 80, wantDirect),
		out(false, appUID, "a", 15020, wantDirect), // istio-cni excludes outbound 15020 by default
		out(false, appUID, "a", 53, wantOut),       // no DNS capture: port 53 is plain outbound
		outUDP(false, appUID, 53, wantDirect),      // and UDP is never captured but for DNS
		// A dual-stack pod without ISTIO_DUAL_STACK: IPv4 only (Istio's
		// nftables backend captures IPv6 too; see istioNFT).
		istioNFT(out(true, appUID, "a", 80, wantDirect), wantOut),
		local(false, appUID, 80, wantDirect),
		local(false, proxyUID, 80, wantDirect),
		self(false, appUID, 80, wantDirect),
		self(false, proxyUID, 80, wantIn), // sidecar calling its own pod goes inbound
		self(false, proxyUID, 15008, wantDirect),
		withGID(out(false, appUID, "a", 80, wantDirect), proxyUID), // the proxy's gid alone exempts
		withGID(self(false, appUID, 80, wantDirect), proxyUID),     // the uid rules return it first
		withGID(out(false, proxyUID, "a", 80, wantDirect), appUID),
		in(false, 80, wantIn),
		in(false, 8080, wantIn),
		in(false, 15008, wantDirect),
		in(false, 15020, wantDirect),
		in(false, 15021, wantDirect),
		in(false, 15090, wantDirect),
		istioNFT(in(true, 80, wantDirect), wantIn),
		// Without INVALID_DROP, REDIRECT lets an out-of-window segment
		// reset the connection; eBPF, without NAT, never does.
		ebpfStricter(inOOW(80, wantReset), wantIn),
	}},
	{name: "dual-stack", pod: capture.Pod{ProxyEnv: dualStack}, probes: []capProbe{
		out(true, appUID, "a", 80, wantOut),
		out(false, appUID, "a", 80, wantOut),
		out(true, proxyUID, "a", 80, wantDirect),
		out(true, appUID, "a", 15020, wantDirect),
		local(true, appUID, 80, wantDirect),
		self(true, appUID, 80, wantDirect),
		self(true, proxyUID, 80, wantIn),
		in(true, 80, wantIn),
		in(true, 15021, wantDirect),
		in(true, 15008, wantDirect),
	}},
	{name: "ipv6-only", ipv6Only: true, probes: []capProbe{
		// Istio captures IPv6 in an IPv6-only pod without ISTIO_DUAL_STACK.
		out(true, appUID, "a", 80, wantOut),
		out(true, proxyUID, "a", 80, wantDirect),
		out(true, appUID, "a", 15020, wantDirect),
		local(true, appUID, 80, wantDirect),
		self(true, appUID, 80, wantDirect),
		self(true, proxyUID, 80, wantIn),
		in(true, 80, wantIn),
		in(true, 15090, wantDirect),
	}},
	{name: "exclude-outbound-ranges", pod: capture.Pod{
		Annotations: map[string]string{capture.AnnotationExcludeOutboundIPRanges: "{B4}/32,{B6}/128"},
		ProxyEnv:    dualStack,
	}, probes: []capProbe{
		out(false, appUID, "a", 80, wantOut),
		out(false, appUID, "b", 80, wantDirect),
		out(true, appUID, "a", 80, wantOut),
		out(true, appUID, "b", 80, wantDirect),
	}},
	{name: "include-outbound-ranges", pod: capture.Pod{
		Annotations: map[string]string{capture.AnnotationIncludeOutboundIPRanges: "{A4}/32,{A6}/128"},
		ProxyEnv:    dualStack,
	}, probes: []capProbe{
		out(false, appUID, "a", 80, wantOut),
		out(false, appUID, "b", 80, wantDirect),
		out(true, appUID, "a", 80, wantOut),
		out(true, appUID, "b", 80, wantDirect),
		in(false, 80, wantIn),
	}},
	{name: "include-outbound-ports-only", pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationIncludeOutboundIPRanges: "",
		capture.AnnotationIncludeOutboundPorts:    "3306,8080",
	}}, probes: []capProbe{
		out(false, appUID, "a", 3306, wantOut),
		out(false, appUID, "b", 8080, wantOut),
		out(false, appUID, "a", 80, wantDirect),
		out(false, proxyUID, "a", 3306, wantDirect),
	}},
	// istio-cni takes single ports only here (NewRedirect refuses
	// "8000:8100", so its ADD fails; past it Istio's nftables backend
	// would hand nft a range it refuses). sidelane accepts first:last
	// ranges, as Istio's istio-init iptables (which gets this annotation
	// unvalidated) does: the probes are that behaviour.
	{name: "include-outbound-port-range", istioCNIRefuses: "includeOutboundPorts range 8000:8100", pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationIncludeOutboundIPRanges: "",
		capture.AnnotationIncludeOutboundPorts:    "3306,8000:8100",
	}}, probes: []capProbe{
		out(false, appUID, "a", 3306, wantOut),
		out(false, appUID, "b", 8080, wantOut), // inside the 8000:8100 range
		out(false, appUID, "a", 80, wantDirect),
		out(false, proxyUID, "a", 3306, wantDirect),
	}},
	{name: "exclude-outbound-ports", pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationExcludeOutboundPorts: "5432,3306",
	}}, probes: []capProbe{
		out(false, appUID, "a", 5432, wantDirect),
		out(false, appUID, "a", 3306, wantDirect),
		out(false, appUID, "a", 15020, wantOut), // the annotation replaces the default 15020
		out(false, appUID, "a", 80, wantOut),
		self(false, proxyUID, 5432, wantDirect),
	}},
	{name: "include-inbound-ports", pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationIncludeInboundPorts: "8080,9090",
	}}, probes: []capProbe{
		in(false, 8080, wantIn),
		in(false, 9090, wantIn),
		in(false, 80, wantDirect),
		in(false, 7777, wantRefused), // not captured, nothing listens
		out(false, appUID, "a", 80, wantOut),
	}},
	{name: "exclude-inbound-ports", pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationExcludeInboundPorts: "9090",
	}}, probes: []capProbe{
		in(false, 9090, wantDirect),
		in(false, 80, wantIn),
		in(false, 15020, wantDirect),
		in(false, 15090, wantDirect),
	}},
	{name: "no-inbound", pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationIncludeInboundPorts: "",
	}}, probes: []capProbe{
		in(false, 80, wantDirect),
		out(false, appUID, "a", 80, wantOut),
		self(false, proxyUID, 80, wantIn), // the outbound rules still send it inbound
	}},
	{name: "dns-capture", pod: capture.Pod{ProxyEnv: map[string]string{capture.EnvDNSCapture: "true", capture.EnvDualStack: "true"}}, probes: []capProbe{
		out(false, appUID, "a", 53, wantDNS),
		out(true, appUID, "a", 53, wantDNS),
		out(false, proxyUID, "a", 53, wantDirect),
		outUDP(false, appUID, 53, wantDNS),
		outUDP(true, appUID, 53, wantDNS),
		outUDP(false, proxyUID, 53, wantDirect),
		outUDP(false, appUID, 5353, wantDirect),
		out(false, appUID, "a", 80, wantOut),
		self(false, appUID, 80, wantDirect),
		self(false, proxyUID, 80, wantIn),
	}},
	{name: "ipv6-only-dns", ipv6Only: true, pod: capture.Pod{ProxyEnv: map[string]string{capture.EnvDNSCapture: "true"}}, probes: []capProbe{
		out(true, appUID, "a", 53, wantDNS),
		outUDP(true, appUID, 53, wantDNS),
		// (No direct IPv6 UDP probe: the remote's unconnected socket may
		// answer from its second IPv6 address, which the client drops.)
		out(true, proxyUID, "a", 53, wantDirect),
		out(true, appUID, "a", 80, wantOut),
		self(true, proxyUID, 80, wantIn),
	}},
	{name: "dns-capture-from-proxy-config", pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationProxyConfig: "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n",
	}}, probes: []capProbe{
		out(false, appUID, "a", 53, wantDNS),
		out(false, proxyUID, "a", 53, wantDirect),
	}},
	{name: "custom-proxy-uid", pod: capture.Pod{ProxyUID: ptr64(2000), ProxyGID: ptr64(2000)}, probes: []capProbe{
		out(false, 2000, "a", 80, wantDirect),
		out(false, proxyUID, "a", 80, wantOut), // 1337 is just an app now
		self(false, 2000, 80, wantIn),
		in(false, 80, wantIn),
	}},
	{name: "exclude-interfaces", pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationExcludeInterfaces: "eth0",
	}}, probes: []capProbe{
		out(false, appUID, "a", 80, wantDirect),
		in(false, 80, wantDirect),
		self(false, proxyUID, 80, wantIn), // over lo, not eth0
	}},
	// A malformed annotation: Istio and sidelane fail the pod; the
	// fallback is Istio's defaults, never the valid half of the knobs.
	{name: "malformed-rejected", rejects: capture.AnnotationIncludeInboundPorts, pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationExcludeOutboundPorts: "5432",
		capture.AnnotationIncludeInboundPorts:  "80,http",
	}}, probes: []capProbe{
		out(false, appUID, "a", 5432, wantOut),
		out(false, appUID, "a", 15020, wantDirect),
		in(false, 80, wantIn),
		in(false, 9090, wantIn),
	}},
	// Rejected with a proxy running as 1500, dual-stack and DNS capture:
	// the fallback keeps all three (with 1337 the sidecar's own upstream
	// connections would be captured again).
	{name: "rejected-keeps-proxy-knobs", rejects: capture.AnnotationIncludeOutboundIPRanges, pod: capture.Pod{
		Annotations: map[string]string{capture.AnnotationIncludeOutboundIPRanges: "bad"},
		ProxyEnv:    map[string]string{capture.EnvDualStack: "true", capture.EnvDNSCapture: "true"},
		ProxyUID:    ptr64(1500), ProxyGID: ptr64(1500),
	}, probes: []capProbe{
		out(false, 1500, "a", 80, wantDirect),
		out(false, appUID, "a", 80, wantOut),
		out(true, appUID, "a", 80, wantOut),
		out(true, 1500, "a", 80, wantDirect),
		out(false, appUID, "a", 53, wantDNS),
		outUDP(false, appUID, 53, wantDNS),
		outUDP(false, 1500, 53, wantDirect),
		self(false, 1500, 80, wantIn),
		in(false, 80, wantIn),
	}},
	// istio-cni passes "*" in an outbound port list; istio-iptables refuses it.
	{name: "rejected-wildcard-outbound-ports", rejects: capture.AnnotationIncludeOutboundPorts, pod: capture.Pod{
		Annotations: map[string]string{capture.AnnotationIncludeOutboundPorts: "*"},
		ProxyUID:    ptr64(1500), ProxyGID: ptr64(1500),
	}, probes: []capProbe{
		out(false, 1500, "a", 80, wantDirect),
		out(false, appUID, "a", 80, wantOut),
	}},
	{name: "rejected-wildcard-exclude-inbound", rejects: capture.AnnotationExcludeInboundPorts, pod: capture.Pod{
		Annotations: map[string]string{capture.AnnotationExcludeInboundPorts: "*"},
	}, probes: []capProbe{
		in(false, 80, wantIn),
	}},
	{name: "rejected-cidr-with-space", rejects: capture.AnnotationExcludeOutboundIPRanges, pod: capture.Pod{
		Annotations: map[string]string{capture.AnnotationExcludeOutboundIPRanges: "{A4}/32, {B4}/32"},
	}, probes: []capProbe{
		out(false, appUID, "a", 80, wantOut),
	}},
	// Istio returns only 15008 before an explicit include list: the
	// excludes, Istio's own 15020 among them, apply only with "*".
	{name: "include-and-exclude-same-inbound-port", pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationIncludeInboundPorts: "80,15008,15020",
		capture.AnnotationExcludeInboundPorts: "80,9090",
	}}, probes: []capProbe{
		in(false, 80, wantIn),
		in(false, 15020, wantIn),
		in(false, 15008, wantDirect),
		in(false, 9090, wantDirect),
		in(false, 8080, wantDirect),
	}},
	// A "*" in excludeInboundPorts is harmless with an include list.
	{name: "exclude-inbound-wildcard-with-list", pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationIncludeInboundPorts: "80",
		capture.AnnotationExcludeInboundPorts: "*",
	}}, probes: []capProbe{
		in(false, 80, wantIn),
		in(false, 9090, wantDirect),
	}},
	// Nothing included: Istio still sends the sidecar's calls to its own
	// pod address to 15006.
	{name: "nothing-captured", pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationIncludeOutboundIPRanges: "",
		capture.AnnotationIncludeOutboundPorts:    "",
		capture.AnnotationIncludeInboundPorts:     "",
	}}, probes: []capProbe{
		out(false, appUID, "a", 80, wantDirect),
		in(false, 80, wantDirect),
		self(false, appUID, 80, wantDirect),
		self(false, proxyUID, 80, wantIn),
		self(false, proxyUID, 15008, wantDirect),
	}},
	// A /0 is every address of its own family.
	{name: "outbound-ranges-slash-zero", pod: capture.Pod{
		Annotations: map[string]string{
			capture.AnnotationIncludeOutboundIPRanges: "0.0.0.0/0,::/0",
			capture.AnnotationExcludeOutboundIPRanges: "{B4}/32,{B6}/128",
		},
		ProxyEnv: dualStack,
	}, probes: []capProbe{
		out(false, appUID, "a", 80, wantOut),
		out(false, appUID, "b", 80, wantDirect),
		out(true, appUID, "a", 80, wantOut),
		out(true, appUID, "b", 80, wantDirect),
	}},
	{name: "exclude-all-ipv4", pod: capture.Pod{
		Annotations: map[string]string{capture.AnnotationExcludeOutboundIPRanges: "0.0.0.0/0"},
		ProxyEnv:    dualStack,
	}, probes: []capProbe{
		out(false, appUID, "a", 80, wantDirect),
		out(true, appUID, "a", 80, wantOut),
		self(false, proxyUID, 80, wantIn),
		in(false, 80, wantIn),
	}},
	// An IPv6 range covers IPv6 only (issue 19, bug 1: the eBPF tries store
	// IPv4 v4-mapped, and "::/0" used to cover every IPv4 address too, so
	// excluding "::/0" sent all of the pod's IPv4 around the sidecar).
	{name: "exclude-all-ipv6-keeps-ipv4-captured", pod: capture.Pod{
		Annotations: map[string]string{capture.AnnotationExcludeOutboundIPRanges: "::/0"},
		ProxyEnv:    dualStack,
	}, probes: []capProbe{
		out(false, appUID, "a", 80, wantOut),
		out(false, appUID, "b", 443, wantOut),
		out(true, appUID, "a", 80, wantDirect),
	}},
	{name: "include-only-ipv6-leaves-ipv4-direct", pod: capture.Pod{
		Annotations: map[string]string{capture.AnnotationIncludeOutboundIPRanges: "::/0"},
		ProxyEnv:    dualStack,
	}, probes: []capProbe{
		out(false, appUID, "a", 80, wantDirect),
		out(true, appUID, "a", 80, wantOut),
		in(false, 80, wantIn),
	}},
	// Lists with spaces: Istio trims port lists (istio-iptables gets them
	// as written, and iptables-restore splits on the spaces).
	{name: "whitespace-in-port-lists", pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationIncludeInboundPorts:  "8080, 9090",
		capture.AnnotationExcludeOutboundPorts: " 5432, 3306",
	}}, probes: []capProbe{
		in(false, 8080, wantIn),
		in(false, 9090, wantIn),
		in(false, 80, wantDirect),
		out(false, appUID, "a", 5432, wantDirect),
		out(false, appUID, "a", 3306, wantDirect),
		out(false, appUID, "a", 15020, wantOut),
		out(false, appUID, "a", 80, wantOut),
	}},
	// Empty values: no exclusions at all beyond Istio's own inbound ports.
	{name: "empty-values", pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationExcludeOutboundPorts:    "",
		capture.AnnotationExcludeInboundPorts:     "",
		capture.AnnotationExcludeOutboundIPRanges: "",
		capture.AnnotationExcludeInterfaces:       "",
	}}, probes: []capProbe{
		out(false, appUID, "a", 15020, wantOut),
		out(false, appUID, "b", 80, wantOut),
		in(false, 80, wantIn),
		in(false, 15020, wantDirect),
		in(false, 15021, wantDirect),
	}},
	// Include and exclude of the same CIDR or port: the exclusion wins.
	{name: "include-and-exclude-same-cidr", pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationIncludeOutboundIPRanges: "{A4}/32,{B4}/32",
		capture.AnnotationExcludeOutboundIPRanges: "{A4}/32",
	}}, probes: []capProbe{
		out(false, appUID, "a", 80, wantDirect),
		out(false, appUID, "b", 80, wantOut),
	}},
	{name: "include-and-exclude-same-outbound-port", pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationIncludeOutboundIPRanges: "",
		capture.AnnotationIncludeOutboundPorts:    "3306,5432",
		capture.AnnotationExcludeOutboundPorts:    "3306",
	}}, probes: []capProbe{
		out(false, appUID, "a", 3306, wantDirect),
		out(false, appUID, "a", 5432, wantOut),
		out(false, appUID, "a", 80, wantDirect),
	}},
	// INVALID_DROP: conntrack INVALID TCP packets are dropped (iptables,
	// nftables); valid traffic is captured as without it. The eBPF
	// backend NATs nothing, so no packet can escape a reverse NAT there
	// (see the README); TestInvalidDrop* checks the drop itself.
	{name: "invalid-drop", pod: capture.Pod{ProxyEnv: map[string]string{capture.EnvInvalidDrop: "true", capture.EnvDualStack: "true"}}, probes: []capProbe{
		out(false, appUID, "a", 80, wantOut),
		out(true, appUID, "a", 80, wantOut),
		out(false, proxyUID, "a", 80, wantDirect),
		self(false, proxyUID, 80, wantIn),
		in(false, 80, wantIn),
		in(true, 8080, wantIn),
		in(false, 15021, wantDirect),
		inOOW(80, wantIn), // the INVALID segment is dropped
	}},
	// From Istio's own tests (cni/pkg/plugin, istio-iptables goldens):
	// istio-cni trims interface names when it validates them, then hands
	// the list on as written.
	{name: "exclude-interfaces-with-space", pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationExcludeInterfaces: "net1, eth0",
	}}, probes: []capProbe{
		out(false, appUID, "a", 80, wantDirect),
		in(false, 80, wantDirect),
		self(false, proxyUID, 80, wantIn),
	}},
	{name: "rejected-wildcard-exclude-outbound-ports", rejects: capture.AnnotationExcludeOutboundPorts, pod: capture.Pod{
		Annotations: map[string]string{capture.AnnotationExcludeOutboundPorts: "*"},
	}, probes: []capProbe{
		out(false, appUID, "a", 80, wantOut),
		out(false, appUID, "a", 15020, wantDirect), // the default 15020, not "*"
	}},
	// A custom uid and a different gid, and a knob Istio rejects: the
	// defaults keep both ids exempt.
	{name: "rejected-custom-uid-gid", rejects: capture.AnnotationIncludeOutboundIPRanges, pod: capture.Pod{
		Annotations: map[string]string{capture.AnnotationIncludeOutboundIPRanges: "10.0.0.0/33"},
		ProxyUID:    ptr64(1500), ProxyGID: ptr64(1600),
	}, probes: []capProbe{
		out(false, 1500, "a", 80, wantDirect),
		withGID(out(false, appUID, "a", 80, wantDirect), 1600),
		out(false, appUID, "a", 80, wantOut),
		out(false, proxyUID, "a", 80, wantOut),
		self(false, 1500, 80, wantIn),
	}},
	{name: "dns-custom-uid-gid", pod: capture.Pod{
		ProxyEnv: map[string]string{capture.EnvDNSCapture: "true"},
		ProxyUID: ptr64(1500), ProxyGID: ptr64(1600),
	}, probes: []capProbe{
		out(false, appUID, "a", 53, wantDNS),
		outUDP(false, appUID, 53, wantDNS),
		outUDP(false, 1500, 53, wantDirect),
		out(false, 1500, "a", 53, wantDirect),
		out(false, proxyUID, "a", 53, wantDNS),
	}},
	{name: "ipv6-only-include-ranges", ipv6Only: true, pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationIncludeOutboundIPRanges: "{A6}/128",
	}}, probes: []capProbe{
		out(true, appUID, "a", 80, wantOut),
		out(true, appUID, "b", 80, wantDirect),
		in(true, 80, wantIn),
	}},
	{name: "no-inbound-dual-stack", pod: capture.Pod{
		Annotations: map[string]string{capture.AnnotationIncludeInboundPorts: ""},
		ProxyEnv:    dualStack,
	}, probes: []capProbe{
		in(true, 80, wantDirect),
		in(false, 80, wantDirect),
		out(true, appUID, "a", 80, wantOut),
		self(true, proxyUID, 80, wantIn),
	}},
	{name: "include-and-exclude-same-cidr-ipv6", pod: capture.Pod{
		Annotations: map[string]string{
			capture.AnnotationIncludeOutboundIPRanges: "{A6}/128,{B6}/128",
			capture.AnnotationExcludeOutboundIPRanges: "{A6}/128",
		},
		ProxyEnv: dualStack,
	}, probes: []capProbe{
		out(true, appUID, "a", 80, wantDirect),
		out(true, appUID, "b", 80, wantOut),
		out(false, appUID, "a", 80, wantDirect),
	}},
	// istio-cni's NewRedirect refuses NONE ("interceptionMode invalid",
	// it accepts REDIRECT and TPROXY only), so with istio-cni such a pod
	// fails its ADD. sidelane captures nothing for it instead, like
	// Istio's injector without istio-cni (no istio-init for NONE): the
	// annotation's documented meaning, and what the pod asks for.
	{name: "interception-none", istioCNIRefuses: "interceptionMode NONE", pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationInterceptionMode: capture.ModeNone,
	}}, probes: []capProbe{
		out(false, appUID, "a", 80, wantDirect),
		in(false, 80, wantDirect),
		self(false, proxyUID, 80, wantDirect),
	}},
}

func ptr64(v int64) *int64 { return &v }

// proxyID is the uid/gid the injected pod runs istio-proxy as.
func proxyID(id *int64) uint32 {
	if id == nil || *id <= 0 {
		return capture.DefaultProxyUID
	}
	return uint32(*id)
}

// remotePorts and podPorts are where the test's listeners are.
var (
	remotePorts = []uint16{53, 80, 443, 3306, 5432, 8080, 15020}
	podPorts    = []uint16{80, 5432, 8080, 9090, 15008, 15020, 15021, 15090}
)

// captureWorld is the network every case runs in: a remote namespace with
// two addresses per family ("a" and "b") and listeners, and pods.
type captureWorld struct {
	net    *podnet.Net
	remote *podnet.NS
	a4, b4 netip.Addr
	a6, b6 netip.Addr
}

func newCaptureWorld(t *testing.T) *captureWorld {
	w := &captureWorld{net: podnet.New(t)}
	w.remote = w.net.Add("pnd")
	w.a4, w.a6 = w.remote.IP4, w.remote.IP6
	w.b4, w.b6 = w.net.Addr(false, 200), w.net.Addr(true, 200)
	w.remote.AddAddr(t, w.b4, 24)
	w.remote.AddAddr(t, w.b6, 64)
	for _, p := range remotePorts {
		go serveEcho(w.remote.Listen(t, "tcp", fmt.Sprintf(":%d", p)))
	}
	for _, p := range []uint16{53, 5353} {
		go serveUDP(w.remote.ListenPacket(t, "udp", fmt.Sprintf(":%d", p)), wantDirect)
	}
	return w
}

func (w *captureWorld) expand(s string) string {
	return strings.NewReplacer("{A4}", w.a4.String(), "{B4}", w.b4.String(), "{A6}", w.a6.String(), "{B6}", w.b6.String()).Replace(s)
}

// capPod is one pod of a case: its namespace, its Istio knobs, and the
// sidecar's uid/gid.
type capPod struct {
	ns              *podnet.NS
	spec            capture.Pod
	kube            *corev1.Pod // the injected pod
	rejects         string      // capCase.rejects
	istioCNIRefuses string      // capCase.istioCNIRefuses
	proxyUID        uint32
	proxyGID        uint32
}

// newPod makes a pod for c: namespace, app listeners, the haproxy sidecar
// (IPv4) and the oracle listeners (IPv6 outbound/inbound, DNS), with no
// capture yet.
func (w *captureWorld) newPod(t *testing.T, c capCase, sidecar bool) *capPod {
	ns := w.net.Add
	if c.ipv6Only {
		ns = w.net.AddIPv6Only
	}
	p := &capPod{ns: ns("pnp"), rejects: c.rejects, istioCNIRefuses: c.istioCNIRefuses}
	spec := c.pod
	spec.Annotations = map[string]string{}
	for k, v := range c.pod.Annotations {
		spec.Annotations[k] = w.expand(v)
	}
	kube, err := istiocni.Inject(spec)
	if err != nil {
		t.Fatal(err)
	}
	// Both sides read the injected pod: istio-cni with ExtractPodInfo,
	// sidelane with what its agent reads (capture/kube.Pod).
	p.kube, p.spec = kube, capturekube.Pod(kube)
	p.proxyUID, p.proxyGID = proxyID(p.spec.ProxyUID), proxyID(p.spec.ProxyGID)
	for _, port := range podPorts {
		go serveEcho(p.ns.Listen(t, "tcp", fmt.Sprintf(":%d", port)))
	}
	if sidecar {
		p.ns.StartHAProxy(t, p.proxyUID, p.proxyGID, capture.OutboundPort, capture.InboundPort)
		go serveOracle(p.ns.Listen(t, "tcp6", fmt.Sprintf("[::]:%d", capture.OutboundPort)), wantOut)
		go serveOracle(p.ns.Listen(t, "tcp6", fmt.Sprintf("[::]:%d", capture.InboundPort)), wantIn)
		go serveOracle(p.ns.Listen(t, "tcp4", fmt.Sprintf("0.0.0.0:%d", capture.DNSPort)), wantDNS)
		go serveOracle(p.ns.Listen(t, "tcp6", fmt.Sprintf("[::]:%d", capture.DNSPort)), wantDNS)
		// Like istio-agent's DNS proxy: bound to loopback (where REDIRECT
		// delivers, so answers leave from the redirected-to address) and
		// owned by the proxy user (Istio's conntrack zones rely on it).
		for _, lo := range []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()} {
			go serveUDP(p.ns.ListenUDPAs(t, p.proxyUID, p.proxyGID, netip.AddrPortFrom(lo, capture.DNSPort)), wantDNS)
		}
	}
	return p
}

// serveEcho answers each connection with "<via> <original destination>":
// a connection proxied by haproxy starts with a PROXY v1 line naming the
// original destination, and comes from 127.0.0.6 when it was inbound.
func serveEcho(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			line, err := podnet.ReadLine(c, 10*time.Second)
			if err != nil {
				return
			}
			via, orig := wantDirect, c.LocalAddr().String()
			if f := strings.Fields(line); len(f) == 6 && f[0] == "PROXY" {
				via, orig = wantOut, net.JoinHostPort(f[3], f[5])
				if h, _, _ := net.SplitHostPort(c.RemoteAddr().String()); h == "127.0.0.6" {
					via = wantIn
				}
			}
			fmt.Fprintf(c, "%s %s\n", via, orig)
		}()
	}
}

// serveOracle stands in for the sidecar where haproxy cannot (IPv6: it
// does not read IP6T_SO_ORIGINAL_DST) and for istio-agent's DNS port: it
// answers "<via> <original destination>" from getsockopt itself.
func serveOracle(l net.Listener, via string) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			orig, err := originalDst(c.(*net.TCPConn))
			if err != nil {
				fmt.Fprintf(c, "error %v\n", err)
				return
			}
			fmt.Fprintf(c, "%s %s\n", via, orig)
		}()
	}
}

// serveUDP answers each datagram with "<via>". (UDP has no
// SO_ORIGINAL_DST; the client's connected socket only accepts the answer
// from the address it sent to, which conntrack restores for a redirect.)
func serveUDP(c net.PacketConn, via string) {
	buf := make([]byte, 512)
	for {
		_, from, err := c.ReadFrom(buf)
		if err != nil {
			return
		}
		_, _ = c.WriteTo([]byte(via+"\n"), from)
	}
}

// originalDst reads SO_ORIGINAL_DST (IPv4) or IP6T_SO_ORIGINAL_DST (IPv6).
func originalDst(c *net.TCPConn) (netip.AddrPort, error) {
	const soOriginalDst = 80 // same number for IPv4 and IPv6
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	local := c.LocalAddr().(*net.TCPAddr)
	var out netip.AddrPort
	var serr error
	err = rc.Control(func(fd uintptr) {
		var buf [28]byte // sockaddr_in6
		size := uint32(len(buf))
		level := syscall.SOL_IP
		if local.IP.To4() == nil {
			level = syscall.SOL_IPV6
		}
		_, _, e := syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, uintptr(level), soOriginalDst,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&size)), 0)
		if e != 0 {
			serr = e
			return
		}
		port := uint16(buf[2])<<8 | uint16(buf[3])
		if level == syscall.SOL_IP {
			out = netip.AddrPortFrom(netip.AddrFrom4([4]byte(buf[4:8])), port)
		} else {
			out = netip.AddrPortFrom(netip.AddrFrom16([16]byte(buf[8:24])), port)
		}
	})
	if err == nil {
		err = serr
	}
	return out, err
}

// dialTarget is where probe p connects, and from which namespace.
func (w *captureWorld) dialTarget(p capProbe, pod *capPod) (from *podnet.NS, uid uint32, dst netip.AddrPort) {
	pick := func(v4, v6 netip.Addr) netip.Addr {
		if p.ipv6 {
			return v6
		}
		return v4
	}
	switch p.dir {
	case toPod:
		return w.remote, 0, netip.AddrPortFrom(pick(pod.ns.IP4, pod.ns.IP6), p.port)
	case podToSelf:
		return pod.ns, p.uid, netip.AddrPortFrom(pick(pod.ns.IP4, pod.ns.IP6), p.port)
	case podToLocal:
		return pod.ns, p.uid, netip.AddrPortFrom(pick(netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()), p.port)
	}
	if p.dst == "b" {
		return pod.ns, p.uid, netip.AddrPortFrom(pick(w.b4, w.b6), p.port)
	}
	return pod.ns, p.uid, netip.AddrPortFrom(pick(w.a4, w.a6), p.port)
}

// probe makes p's connection and returns its outcome, "<via> <orig>" or
// "refused".
func (w *captureWorld) probe(p capProbe, pod *capPod) (string, netip.AddrPort, error) {
	if p.dir == toPodOOW {
		return w.probeOOW(p, pod)
	}
	from, uid, dst := w.dialTarget(p, pod)
	gid := uid
	if p.gid != 0 && p.dir != toPod {
		gid = p.gid
	}
	sotype := syscall.SOCK_STREAM
	if p.udp {
		sotype = syscall.SOCK_DGRAM
	}
	c, err := from.DialAsProto(uid, gid, sotype, dst, 5*time.Second)
	if errors.Is(err, syscall.ECONNREFUSED) {
		return wantRefused, dst, nil
	}
	if err != nil {
		return "", dst, err
	}
	defer c.Close()
	if _, err := fmt.Fprintf(c, "hello\n"); err != nil {
		return "", dst, fmt.Errorf("write: %w", err)
	}
	line, err := podnet.ReadLine(c, 10*time.Second)
	if err != nil {
		return "", dst, fmt.Errorf("read reply (accepted, then no answer): %w", err)
	}
	return line, dst, nil
}

// captureBackend is one capture implementation under test. Adding the eBPF
// backend is one more entry in captureBackends.
type captureBackend interface {
	name() string
	// setup runs once per test before any pod (build or find tools).
	setup(t *testing.T)
	// install captures pod's traffic as Istio would for pod.spec; it must
	// leave nothing behind at test cleanup.
	install(t *testing.T, pod *capPod)
}

func captureBackends() []captureBackend {
	return []captureBackend{
		&istioCNIReference{backend: istiocni.IPTables}, &istioCNIReference{backend: istiocni.NFTables},
		&sidelaneIPTables{}, &sidelaneNFTables{}, &sidelaneEBPF{},
		&sidelaneFallback{}, &sidelaneAutoNFTables{},
	}
}

// validationFlagger is a backend whose Istio validation runs with extra
// flags (the nftables ones: --native-nftables, as Istio's
// istio-validation init container of an nftables install runs it).
type validationFlagger interface{ validationFlags() []string }

func TestCapture(t *testing.T) {
	testenv.Privileged(t)
	testenv.RequireTool(t, "haproxy")
	for _, b := range captureBackends() {
		t.Run(b.name(), func(t *testing.T) {
			// A network of its own per backend: every case makes a pod,
			// and one /24 holds the pods of a few backends only (past
			// that they would take the remote's second address).
			w := newCaptureWorld(t)
			b.setup(t)
			for _, c := range captureCases {
				t.Run(c.name, func(t *testing.T) {
					pod := w.newPod(t, c, true)
					b.install(t, pod)
					ref, _ := b.(*istioCNIReference)
					nftRef := ref != nil && ref.backend == istiocni.NFTables
					_, isEBPF := b.(*sidelaneEBPF)
					if ref != nil && c.istioCNIRefuses != "" {
						return // install checked that Istio refuses the pod
					}
					for _, p := range c.probes {
						got, dst, err := w.probe(p, pod)
						if err != nil {
							t.Errorf("%s: %v", p, err)
							continue
						}
						want := p.want
						if nftRef && p.istioNFT != "" {
							want = p.istioNFT
						}
						if isEBPF && p.ebpf != "" {
							want = p.ebpf
						}
						if want != wantRefused && want != wantReset && !p.udp {
							want += " " + dst.String()
						}
						if got != want {
							t.Errorf("%s to %s: got %q, want %q", p, dst, got, want)
						}
					}
				})
			}
			t.Run("istio-validation", func(t *testing.T) {
				// What Istio's istio-validation init container runs, as the
				// proxy user, in a pod captured with the defaults.
				pod := w.newPod(t, capCase{name: "validation"}, false)
				b.install(t, pod)
				var extra []string
				if v, ok := b.(validationFlagger); ok {
					extra = v.validationFlags()
				}
				runIstioValidation(t, pod, extra...)
			})
		})
	}
}

func runIstioValidation(t *testing.T, pod *capPod, extra ...string) {
	t.Helper()
	pa := testenv.RequireTool(t, "pilot-agent")
	// The injected istio-validation init container's args.
	args := append([]string{"--reuid", strconv.Itoa(int(pod.proxyUID)), "--regid", strconv.Itoa(int(pod.proxyGID)), "--clear-groups",
		pa}, istiocni.ValidationArgs(pod.kube)...)
	args = append(args, extra...)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := pod.ns.Command(ctx, "setpriv", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("istio-iptables --run-validation failed (%v):\n%s", err, testenv.LastLines(string(out), 15))
	}
	if !strings.Contains(string(out), "Validation passed") {
		t.Fatalf("istio-iptables --run-validation did not report success:\n%s", testenv.LastLines(string(out), 15))
	}
}
