//go:build linux

package iptables

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/internal/istiocni"
	"github.com/sidelane/sidelane/internal/podnet"
	"github.com/sidelane/sidelane/internal/testenv"
	"github.com/sidelane/sidelane/istio/capture"
)

// save returns the namespace's iptables-save output for one family,
// without comments and counters, so two dumps compare exactly.
func save(t *testing.T, ns *podnet.NS, ipv6 bool) string {
	t.Helper()
	bin := "iptables-save"
	if ipv6 {
		bin = "ip6tables-save"
	}
	out := podnet.Run(t, "ip", "netns", "exec", ns.Name, bin)
	var lines []string
	for _, l := range strings.Split(out, "\n") {
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		if strings.HasPrefix(l, ":") {
			l = strings.Fields(l)[0] // drop policy and counters
		}
		lines = append(lines, l)
	}
	return strings.Join(lines, "\n")
}

// istioRules is a dump reduced to what Istio owns: each ISTIO_* chain's
// rules, and the built-in chains' rules, per table.
func istioRules(dump string) map[string][]string {
	out := map[string][]string{}
	table := ""
	for _, l := range strings.Split(dump, "\n") {
		switch {
		case strings.HasPrefix(l, "*"):
			table = l[1:]
		case strings.HasPrefix(l, ":ISTIO_"):
			key := table + " " + l[1:]
			if _, ok := out[key]; !ok {
				out[key] = []string{}
			}
		case strings.HasPrefix(l, "-A "):
			chain := strings.Fields(l)[1]
			out[table+" "+chain] = append(out[table+" "+chain], l)
		}
	}
	return out
}

func entryFor(t *testing.T, ns *podnet.NS, pod capture.Pod) store.Entry {
	t.Helper()
	s, _, err := capture.Parse(pod)
	if err != nil {
		t.Fatal(err)
	}
	return store.Entry{
		Key:     store.Key{Network: "t", ContainerID: ns.Name, IfName: "eth0"},
		Netns:   ns.Path,
		IPs:     []netip.Prefix{netip.PrefixFrom(ns.IP4, 24), netip.PrefixFrom(ns.IP6, 64)},
		Mode:    modeSidecar,
		Capture: &s,
	}
}

// TestSameRulesAsIstio applies istio-cni's own iptables rules (its
// rule manager, in process) in one namespace and the
// backend in another, for each case, and compares the installed rules
// chain by chain, both families. It then checks that enrolling again
// changes nothing, that Verify passes, and that Unenroll leaves the
// namespace as it found it.
func TestSameRulesAsIstio(t *testing.T) {
	testenv.Privileged(t)
	testenv.RequireTool(t, "iptables-restore")
	n := podnet.New(t)
	b := New(nil)
	ctx := context.Background()
	for _, tc := range ruleCases {
		t.Run(tc.name, func(t *testing.T) {
			ref, ours := n.Add("ipr"), n.Add("ipo")
			// istio-cni's own code: its ADD, in process.
			err := istiocni.Apply(istiocni.IPTables, tc.pod, ref.Name, ref.Path)
			why, refused := istioCNIRefuses[tc.name]
			switch {
			case refused && !errors.Is(err, istiocni.ErrRefused):
				t.Fatalf("istio-cni should refuse the pod (%s): %v", why, err)
			case refused:
				// Its ADD fails, leaving the namespace as it was: the
				// comparison then checks that sidelane's rules are not
				// Istio's, which says nothing; compare nothing.
				t.Logf("istio-cni refuses the pod (%s): %v", why, err)
			case err != nil:
				t.Fatal(err)
			}
			e := entryFor(t, ours, tc.pod)
			if err := b.Enroll(ctx, &e); err != nil {
				t.Fatalf("enroll: %v", err)
			}
			for _, v6 := range []bool{false, true} {
				if refused {
					break
				}
				want, got := istioRules(save(t, ref, v6)), istioRules(save(t, ours, v6))
				for _, k := range union(want, got) {
					if !slices.Equal(want[k], got[k]) {
						t.Errorf("ipv6=%v %s:\n istio:    %q\n sidelane: %q", v6, k, want[k], got[k])
					}
				}
			}
			// Istio's capture puts ::6 (its IPv6 passthrough source) on lo
			// when it captures IPv6; so must sidelane's.
			if i, o := ref.LoHas(t, "::6/128"), ours.LoHas(t, "::6/128"); !refused && i != o {
				t.Errorf("::6 on lo: istio %v, sidelane %v", i, o)
			}
			if err := b.Verify(ctx, e); err != nil {
				t.Errorf("verify: %v", err)
			}
			before4, before6 := save(t, ours, false), save(t, ours, true)
			if err := b.Enroll(ctx, &e); err != nil {
				t.Fatalf("enroll again: %v", err)
			}
			if after := save(t, ours, false); after != before4 {
				t.Errorf("enrolling twice changed IPv4 rules:\n%s\n---\n%s", before4, after)
			}
			if after := save(t, ours, true); after != before6 {
				t.Errorf("enrolling twice changed IPv6 rules")
			}
			if err := b.Unenroll(ctx, e); err != nil {
				t.Fatalf("unenroll: %v", err)
			}
			// Unenroll also removes what istio-iptables itself installed
			// (a pod moving from istio-cni to sidelane).
			refEntry := e
			refEntry.Netns = ref.Path
			if err := b.Unenroll(ctx, refEntry); err != nil {
				t.Fatalf("unenroll istio's rules: %v", err)
			}
			for _, ns := range []*podnet.NS{ours, ref} {
				for _, v6 := range []bool{false, true} {
					if got := istioRules(save(t, ns, v6)); len(got) != 0 {
						t.Errorf("unenroll left rules in %s (ipv6=%v): %q", ns.Name, v6, got)
					}
				}
			}
		})
	}
}

func union(a, b map[string][]string) []string {
	var keys []string
	for k := range a {
		keys = append(keys, k)
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	return keys
}

// TestVerifyDetectsDrift deletes one rule and one chain behind the
// backend's back; Verify must notice and Enroll must repair.
func TestVerifyDetectsDrift(t *testing.T) {
	testenv.Privileged(t)
	n := podnet.New(t)
	b := New(nil)
	ctx := context.Background()
	ns := n.Add("ipd")
	e := entryFor(t, ns, capture.Pod{})
	if err := b.Enroll(ctx, &e); err != nil {
		t.Fatal(err)
	}
	want := save(t, ns, false)
	for _, drift := range [][]string{
		{"-t", "nat", "-D", "ISTIO_OUTPUT", "-j", "ISTIO_REDIRECT"},
		{"-t", "nat", "-D", "OUTPUT", "-j", "ISTIO_OUTPUT"},
		{"-t", "nat", "-A", "ISTIO_INBOUND", "-p", "tcp", "--dport", "1234", "-j", "RETURN"},
	} {
		podnet.Run(t, "ip", append([]string{"netns", "exec", ns.Name, "iptables"}, drift...)...)
		if err := b.Verify(ctx, e); err == nil {
			t.Errorf("verify passed after iptables %s", strings.Join(drift, " "))
		}
		if err := b.Enroll(ctx, &e); err != nil {
			t.Fatalf("re-enroll: %v", err)
		}
		if got := save(t, ns, false); got != want {
			t.Errorf("re-enroll after %v did not restore the rules:\n%s", drift, got)
		}
	}
}

// TestEnrollFailureLeavesNothing makes the last rule fail (an interface
// name iptables rejects; the parser would never produce it) and checks the
// namespace is left without any Istio rule.
func TestEnrollFailureLeavesNothing(t *testing.T) {
	testenv.Privileged(t)
	n := podnet.New(t)
	b := New(nil)
	ctx := context.Background()
	ns := n.Add("ipf")
	s := capture.Defaults()
	s.ExcludeInterfaces = []string{"this-name-is-far-too-long-for-linux"}
	e := store.Entry{Netns: ns.Path, Mode: modeSidecar, Capture: &s}
	if err := b.Enroll(ctx, &e); err == nil {
		t.Fatal("enroll accepted a bad interface name")
	}
	if got := istioRules(save(t, ns, false)); len(got) != 0 {
		t.Errorf("failed enroll left rules behind: %q", got)
	}
}

func TestGoneNetns(t *testing.T) {
	testenv.Privileged(t)
	b := New(nil)
	ctx := context.Background()
	e := store.Entry{Netns: "/run/netns/" + testenv.UniqueName("gone"), Mode: modeSidecar}
	if err := b.Unenroll(ctx, e); err != nil {
		t.Errorf("unenroll of a gone netns: %v", err)
	}
	if err := b.Verify(ctx, e); err == nil {
		t.Error("verify of a sidecar pod whose netns is gone passed")
	}
	if err := b.Enroll(ctx, &e); err == nil {
		t.Error("enroll into a gone netns passed")
	}
	e.Mode = "none"
	if err := b.Verify(ctx, e); err != nil {
		t.Errorf("verify of a mode-none pod whose netns is gone: %v", err)
	}
}

// TestModeNoneRemovesRules: a pod switched out of sidecar mode loses its
// rules on the next Enroll.
func TestModeNoneRemovesRules(t *testing.T) {
	testenv.Privileged(t)
	n := podnet.New(t)
	b := New(nil)
	ctx := context.Background()
	ns := n.Add("ipn")
	e := entryFor(t, ns, capture.Pod{})
	if err := b.Enroll(ctx, &e); err != nil {
		t.Fatal(err)
	}
	e.Mode = "none"
	if err := b.Enroll(ctx, &e); err != nil {
		t.Fatal(err)
	}
	if got := istioRules(save(t, ns, false)); len(got) != 0 {
		t.Errorf("mode none kept rules: %q", got)
	}
	if err := b.Verify(ctx, e); err != nil {
		t.Errorf("verify in mode none: %v", err)
	}
}
