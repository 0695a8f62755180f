//go:build linux

package nftables

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
	"sigs.k8s.io/knftables"

	"github.com/sidelane/sidelane/agent/datapath"
	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/internal/passthrough"
)

// Enroll installs e's tables in its netns. When they are already exactly
// in place it changes nothing; otherwise one nft transaction replaces
// every Istio table there (see replace), so nothing is ever half-applied.
func (b *Backend) Enroll(ctx context.Context, e *store.Entry) error {
	want, v6 := desired(*e)
	return ignoreGoneIfEmpty(want, inNetns(*e, func() error {
		if err := passthroughIPv6(want, v6); err != nil {
			return err
		}
		if verify(ctx, want) == nil {
			return nil
		}
		if err := replace(ctx, want); err != nil {
			return fmt.Errorf("install nftables rules in %s: %w", e.Netns, err)
		}
		b.log.Debug("installed capture tables", logNetns, e.Netns, logTables, len(want))
		return nil
	}))
}

// Move replaces old's tables with next's in one nft transaction: the
// kernel switches every table at once, so each new connection sees old's
// rules or next's, never none or a mix. A failed transaction changes
// nothing, so old's rules stay in place (datapath.ErrNotRestored never
// happens here).
func (b *Backend) Move(ctx context.Context, _ store.Entry, next *store.Entry) error {
	want, v6 := desired(*next)
	return ignoreGoneIfEmpty(want, inNetns(*next, func() error {
		if err := passthroughIPv6(want, v6); err != nil {
			return err
		}
		if verify(ctx, want) == nil {
			return nil
		}
		if err := replace(ctx, want); err != nil {
			return fmt.Errorf("replace nftables rules in %s: %w", next.Netns, err)
		}
		b.log.Debug("replaced capture tables", logNetns, next.Netns, logTables, len(want))
		return nil
	}))
}

// Unenroll deletes every Istio table in one transaction. A netns that is
// gone has nothing left to remove.
func (b *Backend) Unenroll(ctx context.Context, e store.Entry) error {
	err := inNetns(e, func() error {
		if err := replace(ctx, nil); err != nil {
			return fmt.Errorf("remove nftables rules in %s: %w", e.Netns, err)
		}
		return nil
	})
	var missing ns.NSPathNotExistErr
	if errors.As(err, &missing) || errors.Is(err, store.ErrNetnsReplaced) {
		return nil
	}
	return err
}

// Verify reports the first difference between the installed Istio tables
// and e's.
func (b *Backend) Verify(ctx context.Context, e store.Entry) error {
	want := Desired(e)
	return ignoreGoneIfEmpty(want, inNetns(e, func() error {
		if err := verify(ctx, want); err != nil {
			return fmt.Errorf("nftables rules in %s: %w", e.Netns, err)
		}
		return nil
	}))
}

// Probe reports whether the nftables backend can run here: the nft
// binary (v1.0.1 or later), the permission and a kernel with nf_tables,
// checked with a dry-run (nft -c) transaction that changes nothing.
func Probe(context.Context) error {
	if _, err := knftables.New(knftables.InetFamily, "sidelane-probe"); err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	return nil
}

// Transaction fills tx with what replaces every Istio table by want:
// each table is created if missing and deleted (which clears chains and
// rules no longer wanted), then the wanted ones are created with their
// chains and rules. Run as one transaction, the kernel applies it
// atomically or not at all.
func Transaction(tx *knftables.Transaction, want []Table) {
	for _, name := range TableNames {
		tx.Add(&knftables.Table{Family: knftables.InetFamily, Name: name})
		tx.Delete(&knftables.Table{Family: knftables.InetFamily, Name: name})
	}
	for _, t := range want {
		tx.Add(&knftables.Table{Family: knftables.InetFamily, Name: t.Name})
		for _, c := range t.Chains {
			ch := &knftables.Chain{Family: knftables.InetFamily, Table: t.Name, Name: c.Name}
			if c.Base != nil {
				ch.Type = knftables.PtrTo(knftables.BaseChainType(c.Base.Type))
				ch.Hook = knftables.PtrTo(knftables.BaseChainHook(c.Base.Hook))
				ch.Priority = knftables.PtrTo(knftables.BaseChainPriority(c.Base.Priority))
			}
			tx.Add(ch)
		}
		for _, c := range t.Chains {
			for _, r := range c.Rules {
				tx.Add(&knftables.Rule{Family: knftables.InetFamily, Table: t.Name, Chain: c.Name, Rule: r})
			}
		}
	}
}

// replace runs Transaction for want in the current netns.
func replace(ctx context.Context, want []Table) error {
	nft, err := knftables.New("", "")
	if err != nil {
		return err
	}
	tx := nft.NewTransaction()
	Transaction(tx, want)
	return nft.Run(ctx, tx)
}

// verify compares the Istio tables in the current netns with want, as
// `nft -s list table` prints them (knftables lists rules without their
// text, hence the exec).
func verify(ctx context.Context, want []Table) error {
	bin, err := exec.LookPath("nft")
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	out, err := exec.CommandContext(ctx, bin, "list", "tables", "inet").CombinedOutput()
	if err != nil {
		return fmt.Errorf("nft list tables: %w: %s", err, strings.TrimSpace(string(out)))
	}
	var have []string
	for _, l := range strings.Split(string(out), "\n") {
		if name, ok := strings.CutPrefix(strings.TrimSpace(l), "table inet "); ok && slices.Contains(TableNames, name) {
			have = append(have, name)
		}
	}
	for _, name := range have {
		if !slices.ContainsFunc(want, func(t Table) bool { return t.Name == name }) {
			return fmt.Errorf("unexpected table inet %s", name)
		}
	}
	for _, t := range want {
		if !slices.Contains(have, t.Name) {
			return fmt.Errorf("table inet %s missing", t.Name)
		}
		got, err := exec.CommandContext(ctx, bin, "-s", "list", "table", "inet", t.Name).CombinedOutput()
		if err != nil {
			return fmt.Errorf("nft list table inet %s: %w: %s", t.Name, err, strings.TrimSpace(string(got)))
		}
		if w := t.Render(); strings.TrimSpace(string(got)) != strings.TrimSpace(w) {
			return fmt.Errorf("table inet %s holds\n%s\nwant\n%s", t.Name, got, w)
		}
	}
	return nil
}

// ignoreGoneIfEmpty treats a vanished netns as fine when no tables are
// wanted there (a pod not in sidecar mode, e.g. after its deletion).
func ignoreGoneIfEmpty(want []Table, err error) error {
	var missing ns.NSPathNotExistErr
	if len(want) == 0 && errors.As(err, &missing) {
		return nil
	}
	return err
}

// inNetns runs fn on a locked OS thread inside e's netns; the nft commands
// knftables starts inherit that thread's netns. A path that now names
// another netns than at ADD is refused (store.Entry.CheckNetns).
func inNetns(e store.Entry, fn func() error) error {
	if e.Netns == "" {
		return errors.New("entry has no netns")
	}
	if err := e.CheckNetns(); errors.Is(err, store.ErrNetnsReplaced) {
		return err
	}
	return ns.WithNetNSPath(e.Netns, func(ns.NetNS) error { return fn() })
}

var _ datapath.Datapath = (*Backend)(nil)

// passthroughIPv6 puts ::6 on the pod's lo when its IPv6 is captured, as
// istio-iptables does (also with --native-nftables); it stays after
// Unenroll, as Istio's.
func passthroughIPv6(want []Table, v6 bool) error {
	if len(want) == 0 || !v6 {
		return nil
	}
	return passthrough.AddIPv6()
}
