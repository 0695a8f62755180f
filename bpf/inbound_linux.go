//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
)

func (c *Capture) inboundPin(netns uint64, ifname string) string {
	return filepath.Join(c.cfg.PinDir, "inbound_"+strconv.FormatUint(netns, 10)+"_"+ifname)
}

func (c *Capture) twLookupPin(netns uint64) string {
	return filepath.Join(c.cfg.PinDir, "twlookup_"+strconv.FormatUint(netns, 10))
}

// AttachInbound attaches inbound capture (tc ingress, tcx) to interface
// ifname inside the netns at netnsPath, whose cookie is netns, and the
// TIME_WAIT reuse lookup (sk_lookup, see capture.c's tw_slot) to that
// netns. The links are pinned, so they outlive the agent; they go away
// with the netns or on Delete. Attaching again updates the pinned links in
// place.
//
// Attaches into different netns run in parallel (see Capture.pods).
func (c *Capture) AttachInbound(netnsPath string, netns uint64, ifname string) error {
	defer c.lockPod(netns)()
	return c.attachInbound(netnsPath, netns, ifname)
}

func (c *Capture) attachInbound(netnsPath string, netns uint64, ifname string) error {
	if c.beforeAttach != nil {
		c.beforeAttach(netns)
	}
	if err := c.attachTWLookup(netnsPath, netns); err != nil {
		return err
	}
	pin := c.inboundPin(netns, ifname)
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		defer l.Close()
		if err := l.Update(c.objs.SidelaneInbound); err != nil {
			return fmt.Errorf("update inbound link on %s: %w", ifname, err)
		}
		return nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("load pinned inbound link %s: %w", pin, err)
	}
	target, err := ns.GetNS(netnsPath)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", netnsPath, err)
	}
	defer target.Close()
	// The ifindex is resolved in the calling thread's netns, so attach from
	// inside the pod's.
	return target.Do(func(ns.NetNS) error {
		iface, err := net.InterfaceByName(ifname)
		if err != nil {
			return fmt.Errorf("interface %s in %s: %w", ifname, netnsPath, err)
		}
		l, err := link.AttachTCX(link.TCXOptions{Interface: iface.Index, Program: c.objs.SidelaneInbound, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return fmt.Errorf("attach inbound to %s in %s: %w", ifname, netnsPath, err)
		}
		defer l.Close()
		if err := l.Pin(pin); err != nil {
			l.Detach()
			return fmt.Errorf("pin inbound link: %w", err)
		}
		return nil
	})
}

// attachTWLookup attaches sidelane_tw_lookup to the netns at netnsPath
// (one netns link per pod, whatever its interfaces), or moves the pinned
// link to this version's program. Until it is attached, tc leaves a SYN
// that reuses a TIME_WAIT four-tuple on the proxy's listener (dropped by
// the kernel until TIME_WAIT ends), never on the app's.
func (c *Capture) attachTWLookup(netnsPath string, netns uint64) error {
	pin := c.twLookupPin(netns)
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		defer l.Close()
		if err := l.Update(c.objs.SidelaneTwLookup); err != nil {
			return fmt.Errorf("update time-wait lookup link of netns %d: %w", netns, err)
		}
		return nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("load pinned time-wait lookup link %s: %w", pin, err)
	}
	f, err := os.Open(netnsPath)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", netnsPath, err)
	}
	defer f.Close()
	l, err := link.AttachNetNs(int(f.Fd()), c.objs.SidelaneTwLookup)
	if err != nil {
		return fmt.Errorf("attach time-wait lookup to %s: %w", netnsPath, err)
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		l.Detach()
		return fmt.Errorf("pin time-wait lookup link: %w", err)
	}
	return nil
}

// twLookupPins lists pinned time-wait lookup links, for one netns or
// (netns 0) all.
func (c *Capture) twLookupPins(netns uint64) ([]string, error) {
	pattern := "twlookup_*"
	if netns != 0 {
		pattern = "twlookup_" + strconv.FormatUint(netns, 10)
	}
	pins, err := filepath.Glob(filepath.Join(c.cfg.PinDir, pattern))
	if err != nil {
		return nil, fmt.Errorf("list time-wait lookup pins: %w", err)
	}
	return pins, nil
}

// inboundPins lists pinned inbound links, for one netns or (netns 0) all.
func (c *Capture) inboundPins(netns uint64) ([]string, error) {
	pattern := "inbound_*"
	if netns != 0 {
		pattern = "inbound_" + strconv.FormatUint(netns, 10) + "_*"
	}
	pins, err := filepath.Glob(filepath.Join(c.cfg.PinDir, pattern))
	if err != nil {
		return nil, fmt.Errorf("list inbound pins: %w", err)
	}
	return pins, nil
}

// DetachInbound removes inbound capture from interface ifname of the pod
// with cookie netns (its settings now exclude that interface). Nothing
// attached there is not an error.
func (c *Capture) DetachInbound(netns uint64, ifname string) error {
	defer c.lockPod(netns)()
	pin := c.inboundPin(netns, ifname)
	if _, err := os.Stat(pin); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return detachPin(pin)
}

// detachInbound removes netns's inbound and time-wait lookup links (0:
// every pod's).
func (c *Capture) detachInbound(netns uint64) error {
	pins, err := c.inboundPins(netns)
	if err != nil {
		return err
	}
	tw, err := c.twLookupPins(netns)
	if err != nil {
		return err
	}
	pins = append(pins, tw...)
	var errs []error
	for _, pin := range pins {
		errs = append(errs, detachPin(pin))
	}
	return errors.Join(errs...)
}

// detachPin detaches and unpins the pinned link at pin.
func detachPin(pin string) error {
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return fmt.Errorf("load %s: %w", pin, err)
	}
	// A link whose netns is gone is already defunct; Detach may fail.
	_ = l.Detach()
	return errors.Join(l.Unpin(), l.Close())
}

// updateInbound moves every pinned inbound link to the freshly loaded
// program (agent restart or upgrade). Load runs it before it returns the
// Capture, so no attach of this process runs meanwhile.
func (c *Capture) updateInbound() error {
	pins, err := c.inboundPins(0)
	if err != nil {
		return err
	}
	var errs []error
	for _, pin := range pins {
		if !strings.HasPrefix(filepath.Base(pin), "inbound_") {
			continue
		}
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("load %s: %w", pin, err))
			continue
		}
		errs = append(errs, l.Update(c.objs.SidelaneInbound), l.Close())
	}
	tw, err := c.twLookupPins(0)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, pin := range tw {
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("load %s: %w", pin, err))
			continue
		}
		errs = append(errs, l.Update(c.objs.SidelaneTwLookup), l.Close())
	}
	return errors.Join(errs...)
}
