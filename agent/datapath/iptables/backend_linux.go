//go:build linux

package iptables

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
	goipt "github.com/coreos/go-iptables/iptables"

	"github.com/sidelane/sidelane/agent/datapath"
	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/internal/passthrough"
)

// tables are the tables Istio's REDIRECT-mode rules use (mangle only for
// INVALID_DROP).
var tables = []string{"mangle", "nat", "raw"}

// Enroll installs e's rules in its netns. When they are already exactly in
// place it changes nothing. Otherwise it replaces any Istio rules there
// with the new set in one iptables-restore per family (see replace), so
// re-installing a drifted or changed set leaves no moment without
// capture. On error everything is removed again, so the pod never keeps a
// half-applied set.
func (b *Backend) Enroll(_ context.Context, e *store.Entry) error {
	v4, v6 := Desired(*e)
	return ignoreGoneIfEmpty(v4, v6, inNetns(*e, func() error {
		if err := passthroughIPv6(v6); err != nil {
			return err
		}
		return perFamily(v4, v6, func(ipt *goipt.IPTables, fam string, rules []Rule) error {
			if verify(ipt, rules) == nil {
				return nil
			}
			if err := replace(ipt, rules); err != nil {
				if rerr := replace(ipt, nil); rerr != nil {
					err = errors.Join(err, fmt.Errorf("roll back: %w", rerr))
				}
				return fmt.Errorf("install %s rules in %s: %w", fam, e.Netns, err)
			}
			b.log.Debug("installed capture rules", logNetns, e.Netns, logFamily, fam, logRules, len(rules))
			return nil
		})
	}))
}

// Move replaces old's rules with next's in place (see replace): each table
// of each family switches in one transaction, so a new connection sees
// either the old or the new set, never none. What stays: the families
// switch one after the other (IPv4 first), and within a family the raw
// table (DNS conntrack zones) commits just before the nat table (the
// redirects) in the same iptables-restore run, so for that instant a DNS
// packet can meet next's zones with old's redirects; no connection is
// left uncaptured by both. A move to a mode without rules (node, none)
// removes them the same way. On error every family already switched is
// switched back to old's rules (datapath.ErrNotRestored if that fails).
func (b *Backend) Move(_ context.Context, old store.Entry, next *store.Entry) error {
	v4, v6 := Desired(*next)
	o4, o6 := Desired(old)
	return ignoreGoneIfEmpty(v4, v6, inNetns(*next, func() error {
		if err := passthroughIPv6(v6); err != nil {
			return err
		}
		type switched struct {
			ipt *goipt.IPTables
			old []Rule
		}
		var done []switched
		err := perFamily(v4, v6, func(ipt *goipt.IPTables, fam string, rules []Rule) error {
			if verify(ipt, rules) == nil {
				return nil
			}
			prev := o4
			if ipt.Proto() == goipt.ProtocolIPv6 {
				prev = o6
			}
			done = append(done, switched{ipt, prev})
			if err := replace(ipt, rules); err != nil {
				return fmt.Errorf("replace %s rules in %s: %w", fam, next.Netns, err)
			}
			b.log.Debug("replaced capture rules", logNetns, next.Netns, logFamily, fam, logRules, len(rules))
			return nil
		})
		if err == nil {
			return nil
		}
		var rerrs []error
		for _, s := range done {
			rerrs = append(rerrs, replace(s.ipt, s.old))
		}
		if rerr := errors.Join(rerrs...); rerr != nil {
			return fmt.Errorf("%w (restore: %w: %w)", err, datapath.ErrNotRestored, rerr)
		}
		return err
	}))
}

// perFamily runs fn for IPv4 and then IPv6 with that family's iptables and
// wanted rules, stopping at the first error.
func perFamily(v4, v6 []Rule, fn func(ipt *goipt.IPTables, fam string, rules []Rule) error) error {
	for _, f := range []struct {
		proto goipt.Protocol
		rules []Rule
	}{{goipt.ProtocolIPv4, v4}, {goipt.ProtocolIPv6, v6}} {
		ipt, err := goipt.New(goipt.IPFamily(f.proto), goipt.Timeout(10))
		if err != nil {
			return fmt.Errorf("iptables for %s: %w", family(f.proto), err)
		}
		if err := fn(ipt, family(f.proto), f.rules); err != nil {
			return err
		}
	}
	return nil
}

// ignoreGoneIfEmpty treats a vanished netns as fine when no rules are
// wanted there (a pod not in sidecar mode, e.g. after its deletion).
func ignoreGoneIfEmpty(v4, v6 []Rule, err error) error {
	var missing ns.NSPathNotExistErr
	if len(v4) == 0 && len(v6) == 0 && errors.As(err, &missing) {
		return nil
	}
	return err
}

// Unenroll removes every Istio chain and every jump to one, one
// iptables-restore per family. A netns that is gone has nothing left to
// remove.
func (b *Backend) Unenroll(_ context.Context, e store.Entry) error {
	err := inNetns(e, func() error {
		var errs []error
		for _, proto := range []goipt.Protocol{goipt.ProtocolIPv4, goipt.ProtocolIPv6} {
			ipt, err := goipt.New(goipt.IPFamily(proto), goipt.Timeout(10))
			if err != nil {
				errs = append(errs, fmt.Errorf("iptables for %s: %w", family(proto), err))
				continue
			}
			if err := replace(ipt, nil); err != nil {
				errs = append(errs, fmt.Errorf("remove %s rules in %s: %w", family(proto), e.Netns, err))
			}
		}
		return errors.Join(errs...)
	})
	var missing ns.NSPathNotExistErr
	if errors.As(err, &missing) || errors.Is(err, store.ErrNetnsReplaced) {
		// The pod's netns is gone (its path may name another one now,
		// whose rules are not ours to remove).
		return nil
	}
	return err
}

// Verify reports the first difference between the installed rules and e's.
func (b *Backend) Verify(_ context.Context, e store.Entry) error {
	v4, v6 := Desired(e)
	return ignoreGoneIfEmpty(v4, v6, inNetns(e, func() error {
		return perFamily(v4, v6, func(ipt *goipt.IPTables, fam string, rules []Rule) error {
			if err := verify(ipt, rules); err != nil {
				return fmt.Errorf("%s rules in %s: %w", fam, e.Netns, err)
			}
			return nil
		})
	}))
}

func family(p goipt.Protocol) string {
	if p == goipt.ProtocolIPv6 {
		return "IPv6"
	}
	return "IPv4"
}

// inNetns runs fn on a locked OS thread inside e's netns; the iptables
// commands go-iptables starts inherit that thread's netns. A path that now
// names another netns than at ADD is refused (store.Entry.CheckNetns).
func inNetns(e store.Entry, fn func() error) error {
	if e.Netns == "" {
		return errors.New("entry has no netns")
	}
	if err := e.CheckNetns(); errors.Is(err, store.ErrNetnsReplaced) {
		return err
	}
	return ns.WithNetNSPath(e.Netns, func(ns.NetNS) error { return fn() })
}

// verify compares the installed rules with want: every Istio chain holds
// exactly want's rules in order, no other Istio chain exists, and the
// built-in chains hold want's hooks in order.
func verify(ipt *goipt.IPTables, want []Rule) error {
	wantChains := Chains(want)
	for _, table := range tables {
		chains, err := ipt.ListChains(table)
		if err != nil {
			return fmt.Errorf("list chains of %s: %w", table, err)
		}
		for _, c := range chains {
			if strings.HasPrefix(c, "ISTIO_") && !slices.Contains(wantChains[table], c) {
				return fmt.Errorf("unexpected chain %s/%s", table, c)
			}
		}
		for _, c := range wantChains[table] {
			if !slices.Contains(chains, c) {
				return fmt.Errorf("chain %s/%s missing", table, c)
			}
		}
		byChain := map[string][]string{}
		for _, r := range want {
			if r.Table == table {
				byChain[r.Chain] = append(byChain[r.Chain], "-A "+r.Chain+" "+strings.Join(r.Spec, " "))
			}
		}
		for _, c := range chains {
			if !builtin(c) && !strings.HasPrefix(c, "ISTIO_") {
				continue
			}
			lines, err := ipt.List(table, c)
			if err != nil {
				return fmt.Errorf("list %s/%s: %w", table, c, err)
			}
			var got []string
			for _, l := range lines {
				if strings.HasPrefix(l, "-A ") {
					got = append(got, l)
				}
			}
			if builtin(c) {
				// Only our hooks are ours to judge; other rules may share
				// the chain.
				var ours []string
				for _, l := range got {
					if spec, ok := ruleSpec(l, c); ok && (jumpsToIstio(spec) || isInterfaceReturn(spec)) {
						ours = append(ours, l)
					}
				}
				got = ours
			}
			if !slices.Equal(got, byChain[c]) {
				return fmt.Errorf("%s/%s holds %q, want %q", table, c, got, byChain[c])
			}
		}
	}
	return nil
}

// passthroughIPv6 puts ::6 on the pod's lo when its IPv6 is captured (v6
// rules), as istio-iptables does; it stays after Unenroll, as Istio's.
func passthroughIPv6(v6 []Rule) error {
	if len(v6) == 0 {
		return nil
	}
	return passthrough.AddIPv6()
}
