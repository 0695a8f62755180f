//go:build linux

package iptables

import (
	"fmt"
	"os/exec"
	"slices"
	"strings"

	goipt "github.com/coreos/go-iptables/iptables"
)

// replace swaps every Istio rule of ipt's family for rules in one
// iptables-restore --noflush run (see restoreScript), each table one
// transaction: one nf_tables batch, or one table replace with legacy
// iptables. go-iptables has no restore, hence the exec: the family's
// iptables-restore from the same PATH as the iptables go-iptables runs
// (and so the same nft or legacy variant).
func replace(ipt *goipt.IPTables, rules []Rule) error {
	state, err := readState(ipt)
	if err != nil {
		return err
	}
	input := restoreScript(state, rules)
	if input == "" {
		return nil
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

// readState lists what restoreScript needs: each table's chains, and the
// built-in chains' rules where Istio chains exist.
func readState(ipt *goipt.IPTables) (map[string]tableState, error) {
	state := map[string]tableState{}
	for _, table := range restoreOrder {
		chains, err := ipt.ListChains(table)
		if err != nil {
			return nil, fmt.Errorf("list chains of %s: %w", table, err)
		}
		st := tableState{chains: chains, builtin: map[string][]string{}}
		if slices.ContainsFunc(chains, func(c string) bool { return strings.HasPrefix(c, "ISTIO_") }) {
			for _, c := range chains {
				if !builtin(c) {
					continue
				}
				if st.builtin[c], err = ipt.List(table, c); err != nil {
					return nil, fmt.Errorf("list %s/%s: %w", table, c, err)
				}
			}
		}
		state[table] = st
	}
	return state, nil
}
