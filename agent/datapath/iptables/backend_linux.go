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

	"github.com/sidelane/sidelane/agent/store"
)

// tables are the tables Istio's REDIRECT-mode rules use.
var tables = []string{"nat", "raw"}

// Enroll installs e's rules in its netns. When they are already exactly in
// place it changes nothing. Otherwise it removes any Istio rules there and
// installs the new set: Istio chains first (inert until jumped to), the
// jumps from the built-in chains last. On error everything is removed
// again, so the pod never keeps a half-applied set. (Replacing a drifted
// or changed set leaves a window of milliseconds between removal and
// re-install in which new connections are not captured; go-iptables has
// no atomic restore.)
func (b *Backend) Enroll(_ context.Context, e *store.Entry) error {
	v4, v6 := Desired(*e)
	return ignoreGoneIfEmpty(v4, v6, inNetns(*e, func() error {
		return perFamily(v4, v6, func(ipt *goipt.IPTables, fam string, rules []Rule) error {
			if verify(ipt, rules) == nil {
				return nil
			}
			if err := remove(ipt); err != nil {
				return fmt.Errorf("clear %s rules in %s: %w", fam, e.Netns, err)
			}
			if err := apply(ipt, rules); err != nil {
				if rerr := remove(ipt); rerr != nil {
					err = errors.Join(err, fmt.Errorf("roll back: %w", rerr))
				}
				return fmt.Errorf("install %s rules in %s: %w", fam, e.Netns, err)
			}
			b.log.Debug("installed capture rules", logNetns, e.Netns, logFamily, fam, logRules, len(rules))
			return nil
		})
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

// Unenroll removes every Istio chain and every jump to one. A netns that
// is gone has nothing left to remove.
func (b *Backend) Unenroll(_ context.Context, e store.Entry) error {
	err := inNetns(e, func() error {
		var errs []error
		for _, proto := range []goipt.Protocol{goipt.ProtocolIPv4, goipt.ProtocolIPv6} {
			ipt, err := goipt.New(goipt.IPFamily(proto), goipt.Timeout(10))
			if err != nil {
				errs = append(errs, fmt.Errorf("iptables for %s: %w", family(proto), err))
				continue
			}
			if err := remove(ipt); err != nil {
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

func apply(ipt *goipt.IPTables, rules []Rule) error {
	for table, chains := range Chains(rules) {
		for _, c := range chains {
			if err := ipt.NewChain(table, c); err != nil {
				return fmt.Errorf("create chain %s/%s: %w", table, c, err)
			}
		}
	}
	for _, r := range rules {
		if err := ipt.Append(r.Table, r.Chain, r.Spec...); err != nil {
			return fmt.Errorf("append %s: %w", r, err)
		}
	}
	return nil
}

// remove deletes every rule in a built-in chain that jumps to an Istio
// chain or was one of Istio's interface exclusions, then every Istio
// chain. Rules in built-in chains are found by listing, so rules installed
// for other settings (or by istio-iptables) go too.
func remove(ipt *goipt.IPTables) error {
	for _, table := range tables {
		chains, err := ipt.ListChains(table)
		if err != nil {
			return fmt.Errorf("list chains of %s: %w", table, err)
		}
		var istio []string
		for _, c := range chains {
			if strings.HasPrefix(c, "ISTIO_") {
				istio = append(istio, c)
			}
		}
		if len(istio) == 0 {
			continue
		}
		for _, c := range chains {
			if !builtin(c) {
				continue
			}
			lines, err := ipt.List(table, c)
			if err != nil {
				return fmt.Errorf("list %s/%s: %w", table, c, err)
			}
			for _, l := range lines {
				spec, ok := ruleSpec(l, c)
				if !ok {
					continue
				}
				if !jumpsToIstio(spec) && !isInterfaceReturn(spec) {
					continue
				}
				if err := ipt.DeleteIfExists(table, c, spec...); err != nil {
					return fmt.Errorf("delete %s/%s %s: %w", table, c, strings.Join(spec, " "), err)
				}
			}
		}
		for _, c := range istio {
			if err := ipt.ClearChain(table, c); err != nil {
				return fmt.Errorf("flush %s/%s: %w", table, c, err)
			}
		}
		for _, c := range istio {
			if err := ipt.DeleteChain(table, c); err != nil {
				return fmt.Errorf("delete chain %s/%s: %w", table, c, err)
			}
		}
	}
	return nil
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
