// Package netnsgroup lets one datapath serve several CNI attachments of
// one network namespace. Multus (and any meta-plugin that delegates) makes
// one CNI ADD per network of a sandbox: eth0, net1, ... with the same
// container ID and netns path. The backends key a pod by its netns (the
// eBPF maps by netns cookie, the iptables rules live in the netns), so an
// Enroll of one attachment would replace the pod's state with that
// attachment's IPs, and an Unenroll of one would stop capturing the pod
// while its other attachments are still there.
//
// Datapath wraps a backend so that what it enrolls for a netns is always
// the union of the attachments of that netns (the settings of the one being
// changed, the IPs of all), and the netns's state is removed only when its
// last captured attachment goes.
package netnsgroup

import (
	"context"
	"net/netip"
	"slices"
	"strings"

	"github.com/sidelane/sidelane/agent/datapath"
	"github.com/sidelane/sidelane/agent/store"
)

// modeNone is agent.ModeNone (not imported: the agent imports this).
const modeNone = "none"

// Entries lists the agent's recorded attachments of one sandbox (container
// ID; store.Store.Container), so finding an attachment's siblings costs
// the same whatever the node's pod count.
type Entries func(containerID string) []store.Entry

// Datapath is a datapath.Datapath (and datapath.CounterReader when the
// backend is one) over a backend that keys pods by netns. The agent
// serializes the calls of one sandbox (its per-sandbox lock: siblings share
// the container ID), and the entries it lists are the store
// as it is before the call: the attachment being added is not in it yet,
// the one being removed still is.
type Datapath struct {
	inner   datapath.Datapath
	entries Entries
	// gone reports that a netns path no longer names a network namespace.
	gone func(netnsPath string) bool
}

// New wraps inner.
func New(inner datapath.Datapath, entries Entries) *Datapath {
	return &Datapath{inner: inner, entries: entries, gone: netnsGone}
}

// Name implements datapath.Datapath.
func (d *Datapath) Name() string { return d.inner.Name() }

// siblings are the other captured attachments of e's netns: same sandbox
// (container ID) and netns path, another CNI key, a mode other than none.
func (d *Datapath) siblings(e store.Entry) []store.Entry {
	var out []store.Entry
	for _, o := range d.entries(e.ContainerID) {
		if o.Key != e.Key && o.ContainerID == e.ContainerID && o.Netns == e.Netns && o.Mode != modeNone {
			out = append(out, o)
		}
	}
	return out
}

// union is base with the IPs of every attachment of its netns, in the
// order of the attachments' keys (so every attachment of a netns yields the
// same list).
func union(base store.Entry, others []store.Entry) store.Entry {
	all := append([]store.Entry{base}, others...)
	slices.SortFunc(all, func(a, b store.Entry) int { return strings.Compare(a.Key.String(), b.Key.String()) })
	var ips []netip.Prefix
	for _, o := range all {
		for _, ip := range o.IPs {
			if !slices.Contains(ips, ip) {
				ips = append(ips, ip)
			}
		}
	}
	base.IPs = ips
	return base
}

// enrollRest enrolls the remaining attachments of a netns (at least one)
// as one.
func (d *Datapath) enrollRest(ctx context.Context, rest []store.Entry) error {
	m := union(rest[0], rest[1:])
	return d.inner.Enroll(ctx, &m)
}

// Enroll implements datapath.Datapath. With other captured attachments in
// the netns, the backend gets e's settings with the IPs of all; an e moving
// to none leaves the netns to the others.
func (d *Datapath) Enroll(ctx context.Context, e *store.Entry) error {
	sibs := d.siblings(*e)
	if len(sibs) == 0 {
		return d.inner.Enroll(ctx, e)
	}
	if e.Mode == modeNone {
		if err := d.enrollRest(ctx, sibs); err != nil {
			return err
		}
		e.NetnsCookie = 0
		return nil
	}
	m := union(*e, sibs)
	if err := d.inner.Enroll(ctx, &m); err != nil {
		return err
	}
	e.NetnsCookie = m.NetnsCookie
	return nil
}

// Unenroll implements datapath.Datapath: the netns's state goes with its
// last captured attachment; before that, the others are enrolled again
// without e's IPs. If that fails because the netns is gone (every
// attachment of it is dead), the state is removed all the same; any other
// failure is returned and the netns stays captured (fail closed).
func (d *Datapath) Unenroll(ctx context.Context, e store.Entry) error {
	sibs := d.siblings(e)
	if len(sibs) == 0 {
		return d.inner.Unenroll(ctx, e)
	}
	if e.Mode == modeNone {
		return nil // e has no state of its own
	}
	err := d.enrollRest(ctx, sibs)
	if err != nil && d.gone(e.Netns) {
		return d.inner.Unenroll(ctx, e)
	}
	return err
}

// Move implements datapath.Datapath. With other captured attachments in
// the netns, the backend moves the netns's union in one step: from the
// union under old's settings (the others' alone when old was none) to the
// union under next's (the others' alone when next is none), so the netns
// is never uncaptured in between and stays captured for the others.
func (d *Datapath) Move(ctx context.Context, old store.Entry, next *store.Entry) error {
	sibs := d.siblings(old)
	if len(sibs) == 0 {
		return d.inner.Move(ctx, old, next)
	}
	rest := union(sibs[0], sibs[1:])
	from, to := rest, rest
	if old.Mode != modeNone {
		from = union(old, sibs)
	}
	if next.Mode != modeNone {
		to = union(*next, sibs)
	}
	if err := d.inner.Move(ctx, from, &to); err != nil {
		return err
	}
	next.NetnsCookie = 0
	if next.Mode != modeNone {
		next.NetnsCookie = to.NetnsCookie
	}
	return nil
}

// Verify implements datapath.Datapath against the netns's union.
func (d *Datapath) Verify(ctx context.Context, e store.Entry) error {
	sibs := d.siblings(e)
	switch {
	case len(sibs) == 0:
		return d.inner.Verify(ctx, e)
	case e.Mode == modeNone:
		return nil // the netns is the others' to verify
	}
	return d.inner.Verify(ctx, union(e, sibs))
}

// Counters implements datapath.CounterReader when the backend does: the
// counters are the netns's, shared by its attachments.
func (d *Datapath) Counters(ctx context.Context, e store.Entry) (map[string]uint64, error) {
	cr, ok := d.inner.(datapath.CounterReader)
	if !ok {
		return nil, nil
	}
	return cr.Counters(ctx, e)
}
