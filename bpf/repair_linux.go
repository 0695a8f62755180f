//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// Repair checks that everything Load and AttachInbound set up is still in
// place, as another root process may have changed it (detached a link by
// its ID, attached another program to it, removed a pin), and puts back
// what is not: a detached cgroup link is attached again, one moved to
// another program is moved back, a missing pin is pinned again from this
// process's handle (so a later agent restart still finds the maps), the
// sk_msg program is re-attached to the sockhash, and the inbound tcx link
// of each pod interface in inbound is re-attached (only while the pod is
// enrolled; a pod whose netns is gone is skipped). It returns what it
// repaired; the error joins what it could not.
//
// A pod's check holds that pod's lock only (see Capture.pods), never one
// across the whole pass: a pod's ADD (AttachInbound) or DEL waits for its
// own pod's check at most, and not for the node-wide part.
func (c *Capture) Repair(inbound []Inbound) ([]Repaired, error) {
	done, errs, err := c.repairNode()
	if err != nil {
		return nil, err
	}
	for _, in := range inbound {
		r, err := c.repairOne(in)
		done = append(done, r...)
		errs = append(errs, err)
	}
	for _, r := range done {
		c.cfg.Log.Warn("repaired eBPF datapath", "what", r.What, "name", r.Name, "reason", r.Reason)
	}
	return done, errors.Join(errs...)
}

func (c *Capture) repairOne(in Inbound) ([]Repaired, error) {
	defer c.lockPod(in.Netns)()
	if c.atts == nil {
		return nil, errors.New("repair: capture closed")
	}
	c.setNetnsPath(in.Netns, in.NetnsPath)
	return c.repairInbound(in)
}

// repairNode repairs the cgroup links, map pins and sk_msg.
func (c *Capture) repairNode() ([]Repaired, []error, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	c.nodeMu.Lock()
	defer c.nodeMu.Unlock()
	if c.atts == nil {
		return nil, nil, errors.New("repair: capture closed")
	}
	var done []Repaired
	var errs []error
	for i, a := range c.atts {
		r, err := c.repairCgroup(i, a)
		done = append(done, r...)
		errs = append(errs, err)
	}
	for name, m := range c.pinnedMaps() {
		pin := filepath.Join(c.cfg.PinDir, name)
		if _, err := os.Stat(pin); !errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err := errors.Join(m.Unpin(), m.Pin(pin)); err != nil {
			errs = append(errs, fmt.Errorf("pin map %s: %w", name, err))
			continue
		}
		done = append(done, Repaired{RepairPin, name, "unpinned"})
	}
	r, err := c.repairSkMsg()
	done = append(done, r...)
	errs = append(errs, err)
	r, err = c.repairInCapture()
	done = append(done, r...)
	errs = append(errs, err)
	return done, errs, nil
}

func progID(p *ebpf.Program) (ebpf.ProgramID, error) {
	info, err := p.Info()
	if err != nil {
		return 0, err
	}
	id, ok := info.ID()
	if !ok {
		return 0, errors.New("program has no ID")
	}
	return id, nil
}

func (c *Capture) repairCgroup(i int, a attachment) ([]Repaired, error) {
	l := c.links[i]
	want, err := progID(a.prog)
	if err != nil {
		return nil, fmt.Errorf("%s program: %w", a.name, err)
	}
	info, err := l.Info()
	if err != nil {
		return nil, fmt.Errorf("inspect %s link: %w", a.name, err)
	}
	pin := c.linkPin(a.name)
	if cg := info.Cgroup(); cg == nil || cg.CgroupId != c.cgID {
		// Detached (BPF_LINK_DETACH leaves the link with no cgroup): drop
		// it and its pin, attach anew.
		_ = l.Close()
		if err := os.Remove(pin); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("remove pin of detached %s link: %w", a.name, err)
		}
		nl, err := c.attach(a, c.cgID)
		if err != nil {
			return nil, err
		}
		c.links[i] = nl
		return []Repaired{{RepairCgroupLink, a.name, "detached"}}, nil
	}
	var done []Repaired
	if info.Program != want {
		if err := l.Update(a.prog); err != nil {
			return nil, fmt.Errorf("move %s link back to sidelane's program: %w", a.name, err)
		}
		done = append(done, Repaired{RepairCgroupLink, a.name, "replaced"})
	}
	if _, err := os.Stat(pin); errors.Is(err, os.ErrNotExist) {
		if err := errors.Join(l.Unpin(), l.Pin(pin)); err != nil {
			return done, fmt.Errorf("pin %s link: %w", a.name, err)
		}
		done = append(done, Repaired{RepairPin, "link_" + a.name, "unpinned"})
	}
	return done, nil
}

func (c *Capture) repairSkMsg() ([]Repaired, error) {
	want, err := progID(c.objs.SidelaneMsg)
	if err != nil {
		return nil, fmt.Errorf("sk_msg program: %w", err)
	}
	res, err := link.QueryPrograms(link.QueryOptions{Target: c.objs.SockPairs.FD(), Attach: ebpf.AttachSkMsgVerdict})
	if err != nil {
		return nil, fmt.Errorf("query sock_pairs programs: %w", err)
	}
	if slices.ContainsFunc(res.Programs, func(p link.AttachedProgram) bool { return p.ID == want }) {
		return nil, nil
	}
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{
		Target: c.objs.SockPairs.FD(), Program: c.objs.SidelaneMsg, Attach: ebpf.AttachSkMsgVerdict,
	}); err != nil {
		return nil, fmt.Errorf("attach sk_msg to sock_pairs: %w", err)
	}
	return []Repaired{{RepairSkMsg, "sock_pairs", "detached"}}, nil
}

// repairInCapture keeps sidelane_in_capture in in_progs (without it every
// sidecar pod's stub drops its TCP lookups: closed, but broken).
func (c *Capture) repairInCapture() ([]Repaired, error) {
	want, err := progID(c.objs.SidelaneInCapture)
	if err != nil {
		return nil, fmt.Errorf("inbound capture program: %w", err)
	}
	var id uint32
	if err := c.objs.InProgs.Lookup(uint32(0), &id); err == nil && ebpf.ProgramID(id) == want {
		return nil, nil
	}
	if err := c.setInCapture(); err != nil {
		return nil, err
	}
	return []Repaired{{RepairProgArray, "in_progs", "replaced"}}, nil
}

func (c *Capture) repairInbound(in Inbound) ([]Repaired, error) {
	var cfg capturePodConfig
	if err := c.objs.Pods.Lookup(&in.Netns, &cfg); err != nil {
		return nil, nil // not enrolled (any more): nothing to keep attached
	}
	if _, err := os.Stat(in.NetnsPath); err != nil {
		return nil, nil // the pod is going away
	}
	if !c.cfg.tcInbound && cfg.Flags&flagNode == 0 && c.hasInIface(in.Netns, in.IfName) {
		return c.repairInLookup(in)
	}
	// tc capture. A sidecar pod whose tc link is gone gets sk_lookup
	// capture instead (attachInbound), when its listener is recorded.
	tw, err := c.repairTWLookup(in)
	if err != nil {
		return tw, err
	}
	tcx, err := c.repairTCX(in)
	return append(tw, tcx...), err
}

// repairTWLookup keeps the pod's time-wait lookup (sk_lookup) netns link
// attached and on sidelane's program.
func (c *Capture) repairTWLookup(in Inbound) ([]Repaired, error) {
	return c.repairLink(pinnedLink{
		kind: RepairNetnsLink, what: "time-wait lookup", name: strconv.FormatUint(in.Netns, 10),
		pin: c.twLookupPin(in.Netns), prog: c.objs.SidelaneTwLookup,
		attached: func(info *link.Info) bool { nsi := info.NetNs(); return nsi != nil && nsi.NetnsInode != 0 },
		attach:   func() error { return c.attachTWLookup(in.NetnsPath, in.Netns) },
	})
}

// repairInLookup keeps a sidecar pod's inbound lookup (sk_lookup) netns
// link attached and on the pod's copy of sidelane_in_lookup.
func (c *Capture) repairInLookup(in Inbound) ([]Repaired, error) {
	return c.repairLink(pinnedLink{
		kind: RepairNetnsLink, what: "inbound lookup", name: strconv.FormatUint(in.Netns, 10),
		pin: c.inLookupPin(in.Netns),
		ours: func(id ebpf.ProgramID) (bool, error) {
			want, ok := c.inProgs.get(in.Netns)
			return ok && id == want, nil
		},
		update: func(l link.Link) error {
			p, err := c.inLookupProgram(in.Netns)
			if err != nil {
				return err
			}
			defer p.Close()
			return l.Update(p)
		},
		attached: func(info *link.Info) bool { nsi := info.NetNs(); return nsi != nil && nsi.NetnsInode != 0 },
		attach:   func() error { return c.attachInLookup(in.NetnsPath, in.Netns) },
	})
}

// repairTCX keeps the pod interface's inbound tcx link attached and on
// sidelane's program.
func (c *Capture) repairTCX(in Inbound) ([]Repaired, error) {
	return c.repairLink(pinnedLink{
		kind: RepairTCLink, what: "inbound", name: inboundName(in.Netns, in.IfName),
		pin: c.inboundPin(in.Netns, in.IfName), prog: c.objs.SidelaneInbound,
		attached: func(info *link.Info) bool { tcx := info.TCX(); return tcx != nil && tcx.Ifindex != 0 },
		attach:   func() error { return c.attachInbound(in.NetnsPath, in.Netns, in.IfName) },
	})
}

// pinnedLink is one per-pod link repairLink keeps in place.
type pinnedLink struct {
	kind, what, name string
	pin              string
	// prog is the program the link must run; or ours says whether the
	// link's program is sidelane's, and update moves the link back to it.
	prog   *ebpf.Program
	ours   func(ebpf.ProgramID) (bool, error)
	update func(link.Link) error
	// attached says whether the link is still attached to its target
	// (a detached link's pin names a defunct link).
	attached func(*link.Info) bool
	attach   func() error
}

// repairLink moves a pinned link that another process pointed at another
// program back to sidelane's, and re-attaches one that is unpinned or
// detached.
func (c *Capture) repairLink(p pinnedLink) ([]Repaired, error) {
	if p.ours == nil {
		want, err := progID(p.prog)
		if err != nil {
			return nil, fmt.Errorf("%s program: %w", p.what, err)
		}
		p.ours = func(id ebpf.ProgramID) (bool, error) { return id == want, nil }
		p.update = func(l link.Link) error { return l.Update(p.prog) }
	}
	reason := "unpinned"
	l, err := link.LoadPinnedLink(p.pin, nil)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("load %s: %w", p.pin, err)
	default:
		info, ierr := l.Info()
		if ierr != nil {
			l.Close()
			return nil, fmt.Errorf("inspect %s link %s: %w", p.what, p.name, ierr)
		}
		if p.attached(info) {
			ours, uerr := p.ours(info.Program)
			if uerr == nil && !ours {
				uerr = p.update(l)
			}
			l.Close()
			if uerr != nil {
				return nil, fmt.Errorf("move %s link %s back to sidelane's program: %w", p.what, p.name, uerr)
			}
			if !ours {
				return []Repaired{{p.kind, p.name, "replaced"}}, nil
			}
			return nil, nil
		}
		reason = "detached"
		if err := errors.Join(l.Unpin(), l.Close()); err != nil {
			return nil, fmt.Errorf("unpin detached %s link %s: %w", p.what, p.name, err)
		}
	}
	if err := p.attach(); err != nil {
		return nil, err
	}
	return []Repaired{{p.kind, p.name, reason}}, nil
}

// pinnedMaps are the maps pinned by name under the pin dir.
func (c *Capture) pinnedMaps() map[string]*ebpf.Map {
	o := &c.objs
	return map[string]*ebpf.Map{
		"pods": o.Pods, "cidrs": o.Cidrs, "ports": o.Ports, "pod_ips": o.PodIps,
		"orig_by_cookie": o.OrigByCookie, "orig_by_tuple": o.OrigByTuple, "pod_counters": o.PodCounters,
		"settings": o.Settings, "sock_pairs": o.SockPairs, "pair_cookies": o.PairCookies, "pair_mode": o.PairMode, "pair_runs": o.PairRuns,
		"pair_seen": o.PairSeen, "pair_joins": o.PairJoins,
		"node_proxy_cfg": o.NodeProxyCfg, "node_counters": o.NodeCounters,
		"tw_pending": o.TwPending, "tw_listeners": o.TwListeners, "in_listeners": o.InListeners, "in_ifaces": o.InIfaces,
		"in_netns": o.InNetns, "in_progs": o.InProgs,
	}
}

// inboundName names a pod interface in repair reports: "<netns cookie>/<ifname>".
func inboundName(netns uint64, ifname string) string { return fmt.Sprintf("%d/%s", netns, ifname) }
