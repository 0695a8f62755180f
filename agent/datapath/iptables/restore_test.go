package iptables

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sidelane/sidelane/istio/capture"
)

// installed is the table state rules leave in a pod (plus one rule of
// someone else's in nat OUTPUT, which a replacement must keep).
func installed(rules []Rule) map[string]tableState {
	state := map[string]tableState{}
	for _, table := range restoreOrder {
		st := tableState{chains: []string{"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"}, builtin: map[string][]string{}}
		st.chains = append(st.chains, Chains(rules)[table]...)
		if table == "nat" {
			st.builtin["OUTPUT"] = []string{"-A OUTPUT -d 169.254.20.10/32 -j KUBE-LOCAL-DNS"}
		}
		for _, r := range rules {
			if r.Table == table && builtin(r.Chain) {
				st.builtin[r.Chain] = append(st.builtin[r.Chain], "-A "+r.Chain+" "+strings.Join(r.Spec, " "))
			}
		}
		state[table] = st
	}
	return state
}

// TestRestoreScriptGolden: what a move between two rule sets feeds
// iptables-restore, per family (golden files in testdata/restore;
// -update rewrites them). The privileged TestMove* tests apply such
// scripts for real.
func TestRestoreScriptGolden(t *testing.T) {
	parse := func(p capture.Pod) capture.Settings {
		s, _, err := capture.Parse(p)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	defaults := parse(capture.Pod{})
	dns := parse(capture.Pod{ProxyEnv: map[string]string{capture.EnvDNSCapture: "true", capture.EnvDualStack: "true"}})
	ifaces := parse(capture.Pod{Annotations: map[string]string{capture.AnnotationExcludeInterfaces: "net1"}})
	tests := []struct {
		name     string
		from, to *capture.Settings // nil: no rules
	}{
		{"none-to-defaults", nil, &defaults},
		{"defaults-to-dns", &defaults, &dns},
		{"dns-to-defaults", &dns, &defaults},
		{"defaults-to-exclude-interfaces", &defaults, &ifaces},
		{"exclude-interfaces-to-none", &ifaces, nil},
	}
	rulesOf := func(s *capture.Settings, f Family) []Rule {
		if s == nil {
			return nil
		}
		return Rules(*s, f)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got strings.Builder
			for _, f := range []Family{IPv4, IPv6} {
				got.WriteString(map[bool]string{false: "# IPv4\n", true: "# IPv6\n"}[f.IPv6])
				got.WriteString(restoreScript(installed(rulesOf(tt.from, f)), rulesOf(tt.to, f)))
			}
			path := filepath.Join("testdata", "restore", tt.name+".golden")
			if *update {
				if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, []byte(got.String()), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update)", err)
			}
			if got.String() != string(want) {
				t.Errorf("restore script differs from %s:\n%s", path, got.String())
			}
		})
	}
	if s := restoreScript(installed(nil), nil); s != "" {
		t.Errorf("nothing installed, nothing wanted: script %q, want none", s)
	}
}
