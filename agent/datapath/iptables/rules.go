// Package iptables is the fallback capture backend: it installs Istio's own
// rule set (the chains and rules `pilot-agent istio-iptables` installs in
// REDIRECT mode) inside a pod's network namespace, through go-iptables.
//
// The rules are computed by pure code (Rules) from capture.Settings, in
// the exact form `iptables -S` prints them, so Verify can compare what is
// installed with what should be, line by line.
package iptables

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/sidelane/sidelane/istio/capture"
)

// Istio's chain names.
const (
	ChainOutput     = "ISTIO_OUTPUT"
	ChainOutputDNS  = "ISTIO_OUTPUT_DNS"
	ChainRedirect   = "ISTIO_REDIRECT"
	ChainInRedirect = "ISTIO_IN_REDIRECT"
	ChainInbound    = "ISTIO_INBOUND"
	ChainDrop       = "ISTIO_DROP"
)

// Family is one IP family's addresses as istio-iptables uses them.
type Family struct {
	IPv6        bool
	Loopback    string // the host loopback CIDR apps talk to directly
	Passthrough string // Envoy's inbound passthrough source (127.0.0.6)
}

var (
	IPv4 = Family{Loopback: "127.0.0.1/32", Passthrough: "127.0.0.6/32"}
	IPv6 = Family{IPv6: true, Loopback: "::1/128", Passthrough: "::6/128"}
)

// Rule is one rule: table, chain and the match/target as `iptables -S`
// prints it after "-A <chain>".
type Rule struct {
	Table string
	Chain string
	Spec  []string
}

func (r Rule) String() string {
	return "-t " + r.Table + " -A " + r.Chain + " " + strings.Join(r.Spec, " ")
}

// builtin reports whether chain is one of the kernel's, which we never
// create or delete.
func builtin(chain string) bool {
	switch chain {
	case "PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING":
		return true
	}
	return false
}

// Rules returns the rules istio-iptables installs for s in family f, in
// order. Rules in built-in chains come last so that applying them in order
// hooks the Istio chains in only once they are complete.
func Rules(s capture.Settings, f Family) []Rule {
	var b builder
	if !s.CapturesAnything() {
		return nil
	}
	lo := f.Loopback
	port := func(p capture.PortRange) string {
		if p.First == p.Last {
			return strconv.Itoa(int(p.First))
		}
		return fmt.Sprintf("%d:%d", p.First, p.Last)
	}
	hbone := strconv.Itoa(int(capture.HBONEPort))
	dnsPort := strconv.Itoa(int(s.DNSPort))

	// INVALID_DROP: TCP packets conntrack calls INVALID (e.g. out of
	// window) are dropped before the nat table, so they cannot slip past
	// REDIRECT's reverse NAT and make the app reset the connection.
	if s.DropInvalid {
		b.add("mangle", ChainDrop, "-j", "DROP")
	}

	// Inbound. HBONE first, as istio-iptables does.
	b.add("nat", ChainInbound, "-p", "tcp", "-m", "tcp", "--dport", hbone, "-j", "RETURN")
	inbound := false
	if s.InboundAllPorts {
		inbound = true
		for _, p := range s.ExcludeInboundPorts {
			if p.First == capture.HBONEPort && p.Last == capture.HBONEPort {
				continue
			}
			b.add("nat", ChainInbound, "-p", "tcp", "-m", "tcp", "--dport", port(p), "-j", "RETURN")
		}
		b.add("nat", ChainInbound, "-p", "tcp", "-j", ChainInRedirect)
	} else {
		for _, p := range s.IncludeInboundPorts {
			inbound = true
			b.add("nat", ChainInbound, "-p", "tcp", "-m", "tcp", "--dport", port(p), "-j", ChainInRedirect)
		}
	}
	b.add("nat", ChainRedirect, "-p", "tcp", "-j", "REDIRECT", "--to-ports", strconv.Itoa(int(s.OutboundPort)))
	b.add("nat", ChainInRedirect, "-p", "tcp", "-j", "REDIRECT", "--to-ports", strconv.Itoa(int(s.InboundPort)))

	// Outbound.
	for _, p := range s.ExcludeOutboundPorts {
		b.add("nat", ChainOutput, "-p", "tcp", "-m", "tcp", "--dport", port(p), "-j", "RETURN")
		b.add("nat", ChainOutput, "-p", "udp", "-m", "udp", "--dport", port(p), "-j", "RETURN")
	}
	b.add("nat", ChainOutput, "-s", f.Passthrough, "-o", "lo", "-j", "RETURN")
	owners := func(flag string, ids []uint32, dnsAwareRedirect bool) {
		for _, id := range ids {
			n := strconv.FormatUint(uint64(id), 10)
			// The sidecar calling its own pod's address (app -> Envoy ->
			// VIP resolving to this pod) goes to the inbound listener.
			if s.DNSCapture && dnsAwareRedirect {
				b.add("nat", ChainOutput, "!", "-d", lo, "-o", "lo", "-p", "tcp", "-m", "multiport", "!", "--dports", "53,"+hbone,
					"-m", "owner", flag, n, "-j", ChainInRedirect)
			} else {
				b.add("nat", ChainOutput, "!", "-d", lo, "-o", "lo", "-p", "tcp", "-m", "tcp", "!", "--dport", hbone,
					"-m", "owner", flag, n, "-j", ChainInRedirect)
			}
			// The app calling its own pod address over lo is left alone,
			// unless a loopback range is explicitly included.
			if !s.IncludesLoopback() {
				if s.DNSCapture {
					b.add("nat", ChainOutput, "-o", "lo", "-p", "tcp", "-m", "tcp", "!", "--dport", "53", "-m", "owner", "!", flag, n, "-j", "RETURN")
				} else {
					b.add("nat", ChainOutput, "-o", "lo", "-m", "owner", "!", flag, n, "-j", "RETURN")
				}
			}
			b.add("nat", ChainOutput, "-m", "owner", flag, n, "-j", "RETURN")
		}
	}
	owners("--uid-owner", s.ProxyUIDs, true)
	owners("--gid-owner", s.ProxyGIDs, false)

	if s.DNSCapture {
		b.add("nat", ChainOutput, "-j", ChainOutputDNS)
		b.add("nat", ChainOutputDNS, "-p", "tcp", "-m", "tcp", "--dport", "53", "-j", "REDIRECT", "--to-ports", dnsPort)
		b.add("nat", ChainOutputDNS, "-p", "udp", "-m", "udp", "--dport", "53", "-j", "REDIRECT", "--to-ports", dnsPort)
		// Separate conntrack zones for app<->agent and agent<->upstream
		// DNS, as Istio does, against UDP conntrack races.
		for _, o := range []struct {
			flag string
			ids  []uint32
		}{{"--uid-owner", s.ProxyUIDs}, {"--gid-owner", s.ProxyGIDs}} {
			for _, id := range o.ids {
				n := strconv.FormatUint(uint64(id), 10)
				b.add("raw", ChainOutputDNS, "-p", "udp", "-m", "udp", "--dport", "53", "-m", "owner", o.flag, n, "-j", "CT", "--zone", "1")
				b.add("raw", ChainOutputDNS, "-p", "udp", "-m", "udp", "--sport", dnsPort, "-m", "owner", o.flag, n, "-j", "CT", "--zone", "2")
			}
		}
		b.add("raw", ChainOutputDNS, "-p", "udp", "-m", "udp", "--dport", "53", "-j", "CT", "--zone", "2")
		b.add("raw", ChainInbound, "-p", "udp", "-m", "udp", "--sport", "53", "-j", "CT", "--zone", "1")
	}

	b.add("nat", ChainOutput, "-d", lo, "-j", "RETURN")
	for _, p := range s.ExcludeOutboundCIDRs {
		if inFamily(p, f) {
			b.add("nat", ChainOutput, append(dst(p), "-j", "RETURN")...)
		}
	}
	for _, p := range s.IncludeOutboundPorts {
		b.add("nat", ChainOutput, "-p", "tcp", "-m", "tcp", "--dport", port(p), "-j", ChainRedirect)
	}
	if s.OutboundAllCIDRs {
		b.add("nat", ChainOutput, "-j", ChainRedirect)
	} else {
		for _, p := range s.IncludeOutboundCIDRs {
			if inFamily(p, f) {
				b.add("nat", ChainOutput, append(dst(p), "-j", ChainRedirect)...)
			}
		}
	}

	// Hooks into the built-in chains, last.
	for _, iface := range s.ExcludeInterfaces {
		b.add("nat", "PREROUTING", "-i", iface, "-j", "RETURN")
		b.add("nat", "OUTPUT", "-o", iface, "-j", "RETURN")
	}
	if inbound {
		b.add("nat", "PREROUTING", "-p", "tcp", "-j", ChainInbound)
	}
	b.add("nat", "OUTPUT", "-j", ChainOutput)
	if s.DNSCapture {
		b.add("raw", "OUTPUT", "-j", ChainOutputDNS)
		b.add("raw", "PREROUTING", "-j", ChainInbound)
	}
	if s.DropInvalid {
		b.add("mangle", "PREROUTING", "-m", "conntrack", "--ctstate", "INVALID", "-j", ChainDrop)
	}
	return b.rules
}

func inFamily(p netip.Prefix, f Family) bool { return p.Addr().Is6() == f.IPv6 }

// dst is the "-d" match for p as iptables -S prints it: none for a /0,
// which matches every address of the family (istio-iptables passes
// "-d 0.0.0.0/0", and iptables drops it).
func dst(p netip.Prefix) []string {
	if p.Bits() == 0 {
		return nil
	}
	return []string{"-d", p.String()}
}

type builder struct{ rules []Rule }

func (b *builder) add(table, chain string, spec ...string) {
	b.rules = append(b.rules, Rule{Table: table, Chain: chain, Spec: spec})
}

// Chains returns the Istio chains rules use, per table, in first-use order.
func Chains(rules []Rule) map[string][]string {
	out := map[string][]string{}
	seen := map[string]bool{}
	add := func(table, chain string) {
		if builtin(chain) || !strings.HasPrefix(chain, "ISTIO_") || seen[table+"/"+chain] {
			return
		}
		seen[table+"/"+chain] = true
		out[table] = append(out[table], chain)
	}
	for _, r := range rules {
		add(r.Table, r.Chain)
		if len(r.Spec) >= 2 && r.Spec[len(r.Spec)-2] == "-j" {
			add(r.Table, r.Spec[len(r.Spec)-1])
		}
	}
	return out
}

// Render prints rules the way iptables-save groups them: per table (nat,
// raw), the chains, then each chain's rules in order. Golden files hold it.
func Render(rules []Rule) string {
	var sb strings.Builder
	chains := Chains(rules)
	for _, table := range []string{"mangle", "nat", "raw"} {
		var lines []string
		for _, r := range rules {
			if r.Table == table {
				lines = append(lines, "-A "+r.Chain+" "+strings.Join(r.Spec, " "))
			}
		}
		if len(lines) == 0 {
			continue
		}
		fmt.Fprintf(&sb, "*%s\n", table)
		for _, c := range chains[table] {
			fmt.Fprintf(&sb, ":%s\n", c)
		}
		// iptables-save lists built-in chains' rules first, then the
		// others; keep each chain's own order.
		byChain := map[string][]string{}
		var order []string
		for _, r := range rules {
			if r.Table != table {
				continue
			}
			if _, ok := byChain[r.Chain]; !ok {
				order = append(order, r.Chain)
			}
			byChain[r.Chain] = append(byChain[r.Chain], "-A "+r.Chain+" "+strings.Join(r.Spec, " "))
		}
		for _, pass := range []bool{true, false} {
			for _, c := range order {
				if builtin(c) == pass {
					for _, l := range byChain[c] {
						sb.WriteString(l + "\n")
					}
				}
			}
		}
		sb.WriteString("COMMIT\n")
	}
	return sb.String()
}
