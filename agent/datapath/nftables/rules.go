// Package nftables is the native nftables capture backend: it installs the
// rule set of Istio's nftables backend (`pilot-agent istio-iptables
// --native-nftables`: inet tables istio-proxy-nat, istio-proxy-mangle and
// istio-proxy-raw) inside a pod's network namespace through knftables, one
// transaction per pod. It needs neither iptables binaries nor the x_tables
// kernel modules, only nf_tables and the nft binary (hosts such as RHEL 10
// without legacy iptables).
//
// The rules are computed by pure code (Tables) from capture.Settings, each
// rule in the form `nft -s list table` prints it, so Verify compares the
// installed tables with the wanted ones as text.
package nftables

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/sidelane/sidelane/istio/capture"
)

// Istio's table and chain names (tools/istio-nftables/pkg/constants).
const (
	TableNat    = "istio-proxy-nat"
	TableMangle = "istio-proxy-mangle"
	TableRaw    = "istio-proxy-raw"

	ChainPrerouting = "prerouting"
	ChainOutput     = "output"

	ChainInbound    = "istio-inbound"
	ChainRedirect   = "istio-redirect"
	ChainInRedirect = "istio-in-redirect"
	ChainIstioOut   = "istio-output"
	ChainOutputDNS  = "istio-output-dns"
	ChainDrop       = "istio-drop"
)

// TableNames are the tables this backend owns, in transaction order: the
// mangle table's INVALID drop and the raw table's DNS conntrack zones
// before the nat table's redirects (all in one transaction anyway).
var TableNames = []string{TableNat, TableMangle, TableRaw}

// BaseChain is a chain hooked into the stack: its header line as nft
// prints it.
type BaseChain struct {
	Type, Hook, Priority string
}

// chainOrder is the order Istio creates each table's chains in, which is
// the order nft lists them; hooks of the base chains.
var chainOrder = map[string][]string{
	TableNat:    {ChainPrerouting, ChainOutput, ChainInbound, ChainRedirect, ChainInRedirect, ChainIstioOut, ChainOutputDNS},
	TableMangle: {ChainPrerouting, ChainOutput, ChainDrop},
	TableRaw:    {ChainPrerouting, ChainOutput, ChainInbound, ChainOutputDNS},
}

// baseChains are the hooks of each table's base chains, with the priority
// as nft prints it (the nat output hook's dstnat prints as -100).
var baseChains = map[string]map[string]BaseChain{
	TableNat: {
		ChainPrerouting: {Type: "nat", Hook: "prerouting", Priority: "dstnat"},
		ChainOutput:     {Type: "nat", Hook: "output", Priority: "-100"},
	},
	TableMangle: {
		ChainPrerouting: {Type: "filter", Hook: "prerouting", Priority: "mangle"},
		ChainOutput:     {Type: "route", Hook: "output", Priority: "mangle"},
	},
	TableRaw: {
		ChainPrerouting: {Type: "filter", Hook: "prerouting", Priority: "raw"},
		ChainOutput:     {Type: "filter", Hook: "output", Priority: "raw"},
	},
}

// Table is one inet table's wanted content: its chains in listing order,
// each with its rules in order. Only chains with rules exist (as with
// Istio).
type Table struct {
	Name   string
	Chains []Chain
}

// Chain is one chain and its rules, each as `nft -s list` prints it.
type Chain struct {
	Name  string
	Base  *BaseChain
	Rules []string
}

// Tables returns the tables Istio's nftables backend installs for s (in
// TableNames order, only those with rules). With ipv6 false, IPv6 is not
// captured: every base chain returns IPv6 packets first. That is where
// sidelane follows Istio's iptables backend, which installs no ip6tables
// rules then, rather than Istio's nftables backend, whose inet rules also
// redirect IPv6 to listeners Envoy only opens with ISTIO_DUAL_STACK (see
// capture.Settings.CaptureIPv6).
func Tables(s capture.Settings, ipv6 bool) []Table {
	if !s.CapturesAnything() {
		return nil
	}
	b := builder{ipv6Guard: !ipv6}
	hbone := strconv.Itoa(int(capture.HBONEPort))
	dnsPort := strconv.Itoa(int(s.DNSPort))

	for _, iface := range s.ExcludeInterfaces {
		b.add(TableNat, ChainPrerouting, "iifname "+strconv.Quote(iface)+" counter return")
		b.add(TableNat, ChainOutput, "oifname "+strconv.Quote(iface)+" counter return")
	}
	if s.DropInvalid {
		b.add(TableMangle, ChainPrerouting, "meta l4proto tcp ct state invalid counter jump "+ChainDrop)
		b.add(TableMangle, ChainDrop, "counter drop")
	}

	// Inbound. HBONE first.
	b.add(TableNat, ChainInbound, "tcp dport "+hbone+" counter return")
	b.add(TableNat, ChainRedirect, "meta l4proto tcp counter redirect to :"+strconv.Itoa(int(s.OutboundPort)))
	b.add(TableNat, ChainInRedirect, "meta l4proto tcp counter redirect to :"+strconv.Itoa(int(s.InboundPort)))
	if s.InboundAllPorts || len(s.IncludeInboundPorts) > 0 {
		b.add(TableNat, ChainPrerouting, "meta l4proto tcp counter jump "+ChainInbound)
	}
	if s.InboundAllPorts {
		for _, p := range s.ExcludeInboundPorts {
			if p.First == capture.HBONEPort && p.Last == capture.HBONEPort {
				continue
			}
			b.add(TableNat, ChainInbound, "tcp dport "+port(p)+" counter return")
		}
		b.add(TableNat, ChainInbound, "meta l4proto tcp counter jump "+ChainInRedirect)
	} else {
		for _, p := range s.IncludeInboundPorts {
			b.add(TableNat, ChainInbound, "tcp dport "+port(p)+" counter jump "+ChainInRedirect)
		}
	}

	// Outbound.
	b.add(TableNat, ChainOutput, "counter jump "+ChainIstioOut)
	for _, p := range s.ExcludeOutboundPorts {
		b.add(TableNat, ChainIstioOut, "tcp dport "+port(p)+" counter return")
		b.add(TableNat, ChainIstioOut, "udp dport "+port(p)+" counter return")
	}
	b.add(TableNat, ChainIstioOut, `oifname "lo" ip saddr 127.0.0.6 counter return`)
	if ipv6 {
		b.add(TableNat, ChainIstioOut, `oifname "lo" ip6 saddr ::6 counter return`)
	}
	owners := func(key string, ids []uint32, dnsAware bool) {
		for _, id := range ids {
			n := strconv.FormatUint(uint64(id), 10)
			// The sidecar calling its own pod's address goes inbound.
			notPorts := hbone
			if s.DNSCapture && dnsAware {
				notPorts = "{ 53, " + hbone + " }"
			}
			b.add(TableNat, ChainIstioOut, `oifname "lo" ip daddr != 127.0.0.1 tcp dport != `+notPorts+" meta "+key+" "+n+" counter jump "+ChainInRedirect)
			if ipv6 {
				b.add(TableNat, ChainIstioOut, `oifname "lo" ip6 daddr != ::1 tcp dport != `+notPorts+" meta "+key+" "+n+" counter jump "+ChainInRedirect)
			}
			// The app calling its own pod's address over lo is left alone
			// unless a loopback range is included.
			if !s.IncludesLoopback() {
				if s.DNSCapture {
					b.add(TableNat, ChainIstioOut, `oifname "lo" tcp dport != 53 meta `+key+" != "+n+" counter return")
				} else {
					b.add(TableNat, ChainIstioOut, `oifname "lo" meta `+key+" != "+n+" counter return")
				}
			}
			b.add(TableNat, ChainIstioOut, "meta "+key+" "+n+" counter return")
		}
	}
	owners("skuid", s.ProxyUIDs, true)
	owners("skgid", s.ProxyGIDs, false)

	if s.DNSCapture {
		b.add(TableRaw, ChainOutput, "counter jump "+ChainOutputDNS)
		b.add(TableNat, ChainIstioOut, "counter jump "+ChainOutputDNS)
		b.add(TableNat, ChainOutputDNS, "tcp dport 53 counter redirect to :"+dnsPort)
		b.add(TableNat, ChainOutputDNS, "udp dport 53 counter redirect to :"+dnsPort)
		// Separate conntrack zones for app<->agent and agent<->upstream
		// DNS, against UDP conntrack races.
		for _, o := range []struct {
			key string
			ids []uint32
		}{{"skuid", s.ProxyUIDs}, {"skgid", s.ProxyGIDs}} {
			for _, id := range o.ids {
				n := strconv.FormatUint(uint64(id), 10)
				b.add(TableRaw, ChainOutputDNS, "udp dport 53 meta "+o.key+" "+n+" counter ct zone set 1")
				b.add(TableRaw, ChainOutputDNS, "udp sport "+dnsPort+" meta "+o.key+" "+n+" counter ct zone set 2")
			}
		}
		b.add(TableRaw, ChainPrerouting, "counter jump "+ChainInbound)
		b.add(TableRaw, ChainOutputDNS, "udp dport 53 counter ct zone set 2")
		b.add(TableRaw, ChainInbound, "udp sport 53 counter ct zone set 1")
	}

	b.add(TableNat, ChainIstioOut, "ip daddr 127.0.0.1 counter return")
	if ipv6 {
		b.add(TableNat, ChainIstioOut, "ip6 daddr ::1 counter return")
	}
	for _, p := range s.ExcludeOutboundCIDRs {
		if m, ok := daddr(p, ipv6); ok {
			b.add(TableNat, ChainIstioOut, m+" counter return")
		}
	}
	for _, p := range s.IncludeOutboundPorts {
		b.add(TableNat, ChainIstioOut, "tcp dport "+port(p)+" counter jump "+ChainRedirect)
	}
	if s.OutboundAllCIDRs {
		b.add(TableNat, ChainIstioOut, "counter jump "+ChainRedirect)
	} else {
		for _, p := range s.IncludeOutboundCIDRs {
			if m, ok := daddr(p, ipv6); ok {
				b.add(TableNat, ChainIstioOut, m+" counter jump "+ChainRedirect)
			}
		}
	}
	return b.tables()
}

// port is a port or range as nft prints it ("8000-8100"). Istio's
// nftables backend passes includeOutboundPorts ranges as "8000:8100",
// which nft refuses; sidelane follows Istio's iptables backend there.
func port(p capture.PortRange) string {
	if p.First == p.Last {
		return strconv.Itoa(int(p.First))
	}
	return fmt.Sprintf("%d-%d", p.First, p.Last)
}

// daddr is the destination match for p as nft prints it (a single address
// without its /32 or /128); IPv6 ranges only when IPv6 is captured.
func daddr(p netip.Prefix, ipv6 bool) (string, bool) {
	key := "ip daddr "
	if p.Addr().Is6() {
		if !ipv6 {
			return "", false
		}
		key = "ip6 daddr "
	}
	if p.IsSingleIP() {
		return key + p.Addr().String(), true
	}
	return key + p.String(), true
}

type builder struct {
	rules map[string]map[string][]string
	// ipv6Guard: every base chain with rules returns IPv6 first.
	ipv6Guard bool
}

// ipv6Guard is the rule that leaves IPv6 uncaptured.
const ipv6Guard = "meta nfproto ipv6 counter return"

func (b *builder) add(table, chain, rule string) {
	if b.rules == nil {
		b.rules = map[string]map[string][]string{}
	}
	if b.rules[table] == nil {
		b.rules[table] = map[string][]string{}
	}
	b.rules[table][chain] = append(b.rules[table][chain], rule)
}

// tables returns the tables with rules, their chains with rules in
// listing order (as Istio creates only those).
func (b *builder) tables() []Table {
	var out []Table
	for _, name := range TableNames {
		t := Table{Name: name}
		for _, c := range chainOrder[name] {
			rules := b.rules[name][c]
			if len(rules) == 0 {
				continue
			}
			ch := Chain{Name: c, Rules: rules}
			if bc, ok := baseChains[name][c]; ok {
				ch.Base = &bc
				if b.ipv6Guard {
					ch.Rules = append([]string{ipv6Guard}, rules...)
				}
			}
			t.Chains = append(t.Chains, ch)
		}
		if len(t.Chains) > 0 {
			out = append(out, t)
		}
	}
	return out
}

// Render prints t the way `nft -s list table inet <name>` does; Verify
// compares the two, and golden files hold it.
func (t Table) Render() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "table inet %s {\n", t.Name)
	for i, c := range t.Chains {
		if i > 0 {
			sb.WriteString("\n")
		}
		fmt.Fprintf(&sb, "\tchain %s {\n", c.Name)
		if c.Base != nil {
			fmt.Fprintf(&sb, "\t\ttype %s hook %s priority %s; policy accept;\n", c.Base.Type, c.Base.Hook, c.Base.Priority)
		}
		for _, r := range c.Rules {
			fmt.Fprintf(&sb, "\t\t%s\n", r)
		}
		sb.WriteString("\t}\n")
	}
	sb.WriteString("}\n")
	return sb.String()
}

// Render prints every table of ts, in order.
func Render(ts []Table) string {
	var sb strings.Builder
	for _, t := range ts {
		sb.WriteString(t.Render())
	}
	return sb.String()
}
