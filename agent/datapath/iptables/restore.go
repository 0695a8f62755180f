package iptables

import (
	"fmt"
	"slices"
	"strings"
)

// restoreOrder is the order a replacement commits tables in: the raw
// table's conntrack zones just before the nat table's redirects, the
// mangle table's INVALID drop before both.
var restoreOrder = []string{"mangle", "raw", "nat"}

// tableState is what a replacement needs to know of one table in the pod:
// its chains, and the rules (iptables -S lines) of its built-in chains.
type tableState struct {
	chains  []string
	builtin map[string][]string
}

// restoreScript is the iptables-restore --noflush input that swaps every
// Istio rule in state for rules ("" when there is nothing to do). Each
// table is one transaction: the Istio chains rules needs are declared
// (created, or flushed if they exist), the built-in chains' hooks that
// jump to an Istio chain (or are Istio's interface exclusions) deleted,
// rules appended, and the Istio chains rules no longer needs deleted.
// Other rules of the built-in chains stay.
func restoreScript(state map[string]tableState, rules []Rule) string {
	want := Chains(rules)
	var sb strings.Builder
	for _, table := range restoreOrder {
		st := state[table]
		var have, drop, hooks, add []string
		for _, c := range st.chains {
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
		// Hooks count only in a table with Istio chains: a lone
		// "-i X -j RETURN" may be someone else's.
		for _, c := range st.chains {
			if len(have) == 0 || !builtin(c) {
				continue
			}
			for _, l := range st.builtin[c] {
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
	return sb.String()
}

// ruleSpec turns a `-A CHAIN ...` line of iptables -S into its spec.
// Specs in our rules never hold quoted strings, so splitting on spaces is
// exact for them.
func ruleSpec(line, chain string) ([]string, bool) {
	prefix := "-A " + chain + " "
	if !strings.HasPrefix(line, prefix) {
		return nil, false
	}
	return strings.Fields(strings.TrimPrefix(line, prefix)), true
}

func jumpsToIstio(spec []string) bool {
	n := len(spec)
	return n >= 2 && spec[n-2] == "-j" && strings.HasPrefix(spec[n-1], "ISTIO_")
}

// isInterfaceReturn matches Istio's excludeInterfaces rules exactly.
func isInterfaceReturn(spec []string) bool {
	return len(spec) == 4 && (spec[0] == "-i" || spec[0] == "-o") && spec[2] == "-j" && spec[3] == "RETURN"
}
