//go:build linux

package iptables

import (
	"fmt"
	"os/exec"
	"slices"
	"strings"

	goipt "github.com/coreos/go-iptables/iptables"
)

// restoreOrder is the order replace commits tables in: the raw table's
// conntrack zones just before the nat table's redirects.
var restoreOrder = []string{"raw", "nat"}

// replace swaps every Istio rule of ipt's family for rules in one
// iptables-restore --noflush run, in which each table is one transaction
// (one nf_tables batch, or one table replace with legacy iptables): the
// Istio chains rules needs are declared (created, or flushed if they
// exist), the built-in chains' hooks that jump to an Istio chain (or are
// Istio's interface exclusions) deleted, rules appended, and the Istio
// chains rules no longer needs deleted. Other rules in the built-in chains
// stay. go-iptables has no restore, hence the exec: the family's
// iptables-restore, from the same PATH as the iptables go-iptables runs
// (and so the same nft or legacy variant).
func replace(ipt *goipt.IPTables, rules []Rule) error {
	input, err := restoreInput(ipt, rules)
	if err != nil || input == "" {
		return err
	}
	bin := "iptables-restore"
	if ipt.Proto() == goipt.ProtocolIPv6 {
		bin = "ip6tables-restore"
	}
	cmd := exec.Command(bin, "--noflush", "-w", "10")
	cmd.Stdin = strings.NewReader(input)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %w: %s", bin, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// restoreInput is replace's iptables-restore input ("" when there is
// nothing to do). The Istio chains and hooks in place are found by
// listing, so rules installed for other settings (or by istio-iptables)
// are replaced too.
func restoreInput(ipt *goipt.IPTables, rules []Rule) (string, error) {
	want := Chains(rules)
	var sb strings.Builder
	for _, table := range restoreOrder {
		chains, err := ipt.ListChains(table)
		if err != nil {
			return "", fmt.Errorf("list chains of %s: %w", table, err)
		}
		var have, drop, hooks, add []string
		for _, c := range chains {
			if strings.HasPrefix(c, "ISTIO_") {
				have = append(have, c)
				if !slices.Contains(want[table], c) {
					drop = append(drop, c)
				}
			}
		}
		for _, r := range rules {
			if r.Table == table {
				add = append(add, "-A "+r.Chain+" "+strings.Join(r.Spec, " "))
			}
		}
		if len(have) == 0 && len(add) == 0 {
			continue
		}
		// Hooks are looked for only in a table with Istio chains: a
		// lone "-i X -j RETURN" may be someone else's.
		for _, c := range chains {
			if len(have) == 0 || !builtin(c) {
				continue
			}
			lines, err := ipt.List(table, c)
			if err != nil {
				return "", fmt.Errorf("list %s/%s: %w", table, c, err)
			}
			for _, l := range lines {
				if spec, ok := ruleSpec(l, c); ok && (jumpsToIstio(spec) || isInterfaceReturn(spec)) {
					hooks = append(hooks, "-D"+strings.TrimPrefix(l, "-A"))
				}
			}
		}
		fmt.Fprintf(&sb, "*%s\n", table)
		for _, c := range append(slices.Clone(want[table]), drop...) {
			fmt.Fprintf(&sb, ":%s - [0:0]\n", c) // created, or flushed
		}
		for _, l := range append(hooks, add...) {
			sb.WriteString(l + "\n")
		}
		for _, c := range drop {
			fmt.Fprintf(&sb, "-X %s\n", c)
		}
		sb.WriteString("COMMIT\n")
	}
	return sb.String(), nil
}
