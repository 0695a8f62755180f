//go:build linux

package nftables

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/sidelane/sidelane/agent/datapath"
	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/internal/istiocni"
	"github.com/sidelane/sidelane/internal/podnet"
	"github.com/sidelane/sidelane/internal/testenv"
	"github.com/sidelane/sidelane/istio/capture"
)

// list is the namespace's Istio tables as `nft -s list table` prints
// them, per table ("" when absent).
func list(t *testing.T, ns *podnet.NS) map[string]string {
	t.Helper()
	out := map[string]string{}
	tables := podnet.Run(t, "ip", "netns", "exec", ns.Name, "nft", "list", "tables", "inet")
	for _, name := range TableNames {
		if strings.Contains(tables, "table inet "+name+"\n") {
			out[name] = podnet.Run(t, "ip", "netns", "exec", ns.Name, "nft", "-s", "list", "table", "inet", name)
		}
	}
	return out
}

// withoutIPv6Guard drops sidelane's "IPv6 is not captured" returns, the
// one place where it departs from Istio's nftables rules on purpose.
func withoutIPv6Guard(s string) string {
	var lines []string
	for _, l := range strings.Split(s, "\n") {
		if strings.TrimSpace(l) != "meta nfproto ipv6 counter return" {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines, "\n")
}

func entryFor(t *testing.T, ns *podnet.NS, pod capture.Pod) store.Entry {
	t.Helper()
	s := settings(t, pod)
	return store.Entry{
		Key:     store.Key{Network: "t", ContainerID: ns.Name, IfName: "eth0"},
		Netns:   ns.Path,
		IPs:     []netip.Prefix{netip.PrefixFrom(ns.IP4, 24), netip.PrefixFrom(ns.IP6, 64)},
		Mode:    modeSidecar,
		Capture: &s,
	}
}

// TestSameTablesAsIstio applies istio-cni's own nftables rules (its
// NftablesInterceptRuleMgr, in process) in one namespace and this backend in
// another, for each case, and compares the tables as nft lists them. It
// then checks that enrolling again changes nothing, that Verify passes,
// and that Unenroll removes both sets.
func TestSameTablesAsIstio(t *testing.T) {
	testenv.Privileged(t)
	testenv.RequireTool(t, "nft")
	n := podnet.New(t)
	b := New(nil)
	ctx := context.Background()
	for _, tc := range ruleCases {
		t.Run(tc.name, func(t *testing.T) {
			ref, ours := n.Add("nfr"), n.Add("nfo")
			// istio-cni refuses NONE (NewRedirect accepts REDIRECT and
			// TPROXY only); sidelane installs nothing for it.
			if tc.pod.Annotations[capture.AnnotationInterceptionMode] != capture.ModeNone {
				// istio-cni's own code: its ADD with its nftables rule
				// manager, in process.
				err := istiocni.Apply(istiocni.NFTables, tc.pod, ref.Name, ref.Path)
				switch {
				case tc.istioRefuses && err == nil:
					t.Fatalf("the case says Istio refuses this pod, but istio-cni accepted it")
				case tc.istioRefuses:
					t.Logf("istio-cni refuses the pod as the case says: %v", err)
					if got := list(t, ref); len(got) != 0 {
						t.Fatalf("istio-cni failed but left tables: %v", got)
					}
				case err != nil:
					t.Fatal(err)
				}
			}
			e := entryFor(t, ours, tc.pod)
			if err := b.Enroll(ctx, &e); err != nil {
				t.Fatalf("enroll: %v", err)
			}
			got := list(t, ours)
			// Istio's capture puts ::6 (its IPv6 passthrough source) on lo
			// when it captures IPv6; so must sidelane's.
			if i, o := ref.LoHas(t, "::6/128"), ours.LoHas(t, "::6/128"); !tc.istioRefuses && i != o {
				t.Errorf("::6 on lo: istio %v, sidelane %v", i, o)
			}
			if !tc.istioRefuses {
				want := list(t, ref)
				for _, name := range TableNames {
					if withoutIPv6Guard(got[name]) != want[name] {
						t.Errorf("table %s:\n istio:\n%s\n sidelane:\n%s", name, want[name], got[name])
					}
				}
			}
			if err := b.Verify(ctx, e); err != nil {
				t.Errorf("verify: %v", err)
			}
			if err := b.Enroll(ctx, &e); err != nil {
				t.Fatalf("enroll again: %v", err)
			}
			if again := list(t, ours); len(again) != len(got) || again[TableNat] != got[TableNat] {
				t.Errorf("enrolling twice changed the tables")
			}
			if err := b.Unenroll(ctx, e); err != nil {
				t.Fatalf("unenroll: %v", err)
			}
			refEntry := e
			refEntry.Netns = ref.Path
			if err := b.Unenroll(ctx, refEntry); err != nil {
				t.Fatalf("unenroll istio's tables: %v", err)
			}
			for _, ns := range []*podnet.NS{ours, ref} {
				if got := list(t, ns); len(got) != 0 {
					t.Errorf("unenroll left tables in %s: %v", ns.Name, got)
				}
			}
		})
	}
}

// TestVerifyDetectsDrift changes the tables behind the backend's back;
// Verify must notice and Enroll must repair.
func TestVerifyDetectsDrift(t *testing.T) {
	testenv.Privileged(t)
	n := podnet.New(t)
	b := New(nil)
	ctx := context.Background()
	for _, drift := range [][]string{
		{"flush", "chain", "inet", TableNat, ChainIstioOut},
		{"delete", "table", "inet", TableNat},
		{"add", "table", "inet", TableRaw},
		{"add", "rule", "inet", TableNat, ChainInbound, "tcp", "dport", "9999", "return"},
	} {
		t.Run(strings.Join(drift, "-"), func(t *testing.T) {
			ns := n.Add("nfd")
			e := entryFor(t, ns, capture.Pod{})
			if err := b.Enroll(ctx, &e); err != nil {
				t.Fatal(err)
			}
			podnet.Run(t, "ip", append([]string{"netns", "exec", ns.Name, "nft"}, drift...)...)
			if err := b.Verify(ctx, e); err == nil {
				t.Fatal("verify passed after drift")
			}
			if err := b.Enroll(ctx, &e); err != nil {
				t.Fatal(err)
			}
			if err := b.Verify(ctx, e); err != nil {
				t.Fatalf("verify after repair: %v", err)
			}
		})
	}
}

// TestMove switches a pod between capture settings and modes in place,
// and a move nft refuses leaves the old tables exactly as they were.
func TestMove(t *testing.T) {
	testenv.Privileged(t)
	n := podnet.New(t)
	b := New(nil)
	ctx := context.Background()
	ns := n.Add("nfm")
	old := entryFor(t, ns, capture.Pod{})
	if err := b.Enroll(ctx, &old); err != nil {
		t.Fatal(err)
	}
	steps := []capture.Pod{
		{ProxyEnv: map[string]string{capture.EnvDNSCapture: "true", capture.EnvInvalidDrop: "true"}},
		{Annotations: map[string]string{capture.AnnotationIncludeInboundPorts: "80"}},
		{},
	}
	for _, pod := range steps {
		next := entryFor(t, ns, pod)
		if err := b.Move(ctx, old, &next); err != nil {
			t.Fatalf("move: %v", err)
		}
		if err := b.Verify(ctx, next); err != nil {
			t.Fatalf("verify after move: %v", err)
		}
		old = next
	}
	before := list(t, ns)
	bad := entryFor(t, ns, capture.Pod{})
	s := *bad.Capture
	s.ExcludeInterfaces = []string{"an-interface-name-longer-than-nft-takes"}
	bad.Capture = &s
	if err := b.Move(ctx, old, &bad); err == nil {
		t.Fatal("nft accepted an over-long interface name; the test needs another refused rule")
	} else if errors.Is(err, datapath.ErrNotRestored) {
		t.Fatalf("move error says not restored: %v", err)
	}
	if after := list(t, ns); after[TableNat] != before[TableNat] || len(after) != len(before) {
		t.Errorf("a failed move changed the tables:\n%v\n---\n%v", before, after)
	}
	if err := b.Verify(ctx, old); err != nil {
		t.Errorf("old tables not in place after a failed move: %v", err)
	}
	none := old
	none.Mode = "none"
	if err := b.Move(ctx, old, &none); err != nil {
		t.Fatal(err)
	}
	if got := list(t, ns); len(got) != 0 {
		t.Errorf("move to mode none left %v", got)
	}
}

// TestGoneNetns: Unenroll of a vanished netns is not an error; Enroll is.
func TestGoneNetns(t *testing.T) {
	testenv.Privileged(t)
	b := New(nil)
	s := capture.Defaults()
	e := store.Entry{Netns: "/run/netns/sidelane-nft-gone-" + podnet.UniqueName(""), Mode: modeSidecar, Capture: &s}
	if err := b.Unenroll(context.Background(), e); err != nil {
		t.Errorf("unenroll: %v", err)
	}
	if err := b.Enroll(context.Background(), &e); err == nil {
		t.Error("enroll into a missing netns succeeded")
	}
}

func TestProbe(t *testing.T) {
	testenv.Privileged(t)
	if err := Probe(context.Background()); err != nil {
		t.Fatalf("probe on a host with nft: %v", err)
	}
}
