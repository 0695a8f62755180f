//go:build linux

package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/sidelane/sidelane/internal/passthrough"
)

func (c *Capture) inboundPin(netns uint64, ifname string) string {
	return filepath.Join(c.cfg.PinDir, "inbound_"+strconv.FormatUint(netns, 10)+"_"+ifname)
}

func (c *Capture) twLookupPin(netns uint64) string {
	return filepath.Join(c.cfg.PinDir, "twlookup_"+strconv.FormatUint(netns, 10))
}

func (c *Capture) inLookupPin(netns uint64) string {
	return filepath.Join(c.cfg.PinDir, "inlookup_"+strconv.FormatUint(netns, 10))
}

// AttachInbound attaches inbound capture for interface ifname inside the
// netns at netnsPath, whose cookie is netns. How depends on the pod's
// config (Put first):
//
//   - A sidecar pod gets its copy of sidelane_in_lookup (sk_lookup) on its
//     netns, and ifname's ifindex in in_ifaces: no tc program, no rtnl
//     (a tcx attach costs 12-14 ms of rtnl-held RCU wait, which serializes
//     every CNI ADD on the node; a netns link attaches in tens of
//     microseconds). The proxy's listener, opened after ADD, is recorded
//     by sock_ops at listen(2).
//   - A per-node pod (its in-pod listener is the node proxy's, opened
//     outside the pods' cgroup, so sock_ops never sees it), a netns with no
//     config and an interface that has a tc link already (pods enrolled by
//     an older agent, a pod that moved from per-node mode) get tc ingress
//     (tcx) and the time-wait lookup (sidelane_tw_lookup), as before.
//
// The links are pinned, so they outlive the agent; they go away with the
// netns or on Delete. Attaching again updates the pinned links in place.
// Attaches into different netns run in parallel (see Capture.pods).
func (c *Capture) AttachInbound(netnsPath string, netns uint64, ifname string) error {
	defer c.lockPod(netns)()
	return c.attachInbound(netnsPath, netns, ifname)
}

func (c *Capture) attachInbound(netnsPath string, netns uint64, ifname string) error {
	if c.beforeAttach != nil {
		c.beforeAttach(netns)
	}
	c.setNetnsPath(netns, netnsPath)
	var cfg capturePodConfig
	sidecar := !c.cfg.tcInbound && c.objs.Pods.Lookup(&netns, &cfg) == nil && cfg.Flags&flagNode == 0
	if sidecar {
		if _, err := os.Stat(c.inboundPin(netns, ifname)); errors.Is(err, os.ErrNotExist) {
			return c.attachLookupCapture(netnsPath, netns, ifname, cfg.Flags&flagNoIPv6 == 0)
		}
	}
	if err := c.attachTWLookup(netnsPath, netns); err != nil {
		return err
	}
	if err := c.attachTC(netnsPath, netns, ifname); err != nil {
		return err
	}
	if !sidecar {
		// Moved to tc capture (per-node mode): tc decides from now on.
		return c.detachLookupCapture(netns)
	}
	return nil
}

// attachTC attaches (or updates) sidelane_inbound on ifname's tcx ingress.
func (c *Capture) attachTC(netnsPath string, netns uint64, ifname string) error {
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

// attachLookupCapture is a sidecar pod's inbound capture by sk_lookup:
// ifname's ifindex into in_ifaces, the pod's sidelane_in_lookup on its
// netns, and whatever already listens on the inbound port recorded (a
// proxy that started before the pod was enrolled, or before this agent
// version; one that starts later is recorded by sock_ops at listen(2)).
// With IPv6 capture it puts ::6 on the pod's lo (passthrough.AddIPv6).
//
// It enters the pod's netns once, for all three things that run there:
// each entry is a goroutine on a locked OS thread and two setns calls,
// and in a burst of ADDs every such hand-off waits for a CPU.
func (c *Capture) attachLookupCapture(netnsPath string, netns uint64, ifname string, v6 bool) error {
	target, err := ns.GetNS(netnsPath)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", netnsPath, err)
	}
	defer target.Close()
	var ifindex int
	if err := target.Do(func(ns.NetNS) error {
		iface, err := net.InterfaceByName(ifname)
		if err != nil {
			return fmt.Errorf("interface %s in %s: %w", ifname, netnsPath, err)
		}
		ifindex = iface.Index
		if v6 {
			if err := passthrough.AddIPv6(); err != nil {
				return err
			}
		}
		// Recording needs only the pod's config (Put), not the link below:
		// until the link is attached nothing reads in_listeners for netns.
		return c.recordListeners()
	}); err != nil {
		return err
	}
	if err := c.addInIface(netns, ifname, uint32(ifindex)); err != nil {
		return err
	}
	return c.attachInLookup(netnsPath, netns)
}

// recordListeners runs sidelane_in_record from the calling thread, which
// must be in the pod's netns, for each family and slot: the pod's
// listeners on its inbound port go into in_listeners.
func (c *Capture) recordListeners() error {
	for _, v6 := range []bool{false, true} {
		for slot := range uint16(inSlots) {
			if _, err := c.objs.SidelaneInRecord.Run(&ebpf.RunOptions{Data: recordPacket(v6, recordPort+slot)}); err != nil {
				return fmt.Errorf("record inbound listeners: %w", err)
			}
		}
	}
	return nil
}

// recordPort is the first source port of sidelane_in_record's packets
// (its remainder by inSlots is the slot).
const recordPort = 40000

// recordPacket is a TCP SYN from sport to loopback, with an Ethernet
// header, as tc programs see packets.
func recordPacket(v6 bool, sport uint16) []byte {
	eth := make([]byte, 14)
	var ip []byte
	if v6 {
		binary.BigEndian.PutUint16(eth[12:], unix.ETH_P_IPV6)
		ip = make([]byte, 40)
		ip[0] = 0x60
		binary.BigEndian.PutUint16(ip[4:], 20)
		ip[6], ip[7] = unix.IPPROTO_TCP, 64
		ip[23], ip[39] = 1, 1 // ::1 -> ::1
	} else {
		binary.BigEndian.PutUint16(eth[12:], unix.ETH_P_IP)
		ip = make([]byte, 20)
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:], 40)
		ip[8], ip[9] = 64, unix.IPPROTO_TCP
		copy(ip[12:], []byte{127, 0, 0, 1, 127, 0, 0, 1})
	}
	tcp := make([]byte, 20)
	binary.BigEndian.PutUint16(tcp[0:], sport)
	binary.BigEndian.PutUint16(tcp[2:], 1)
	tcp[12], tcp[13] = 5<<4, 0x02 // data offset, SYN
	return append(append(eth, ip...), tcp...)
}

// addInIface records ifname (ifindex) as a captured interface of netns.
func (c *Capture) addInIface(netns uint64, ifname string, ifindex uint32) error {
	var set captureInIfaceSet
	if err := c.objs.InIfaces.Lookup(&netns, &set); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("read captured interfaces of netns %d: %w", netns, err)
	}
	name := ifName(ifname)
	free := -1
	for i := range set.Ifindex {
		switch {
		case set.Name[i] == name:
			free = i
		case set.Ifindex[i] == 0 && free < 0:
			free = i
		}
		if set.Name[i] == name {
			break
		}
	}
	if free < 0 {
		return fmt.Errorf("interface %s: netns %d has %d captured interfaces already, the most sk_lookup capture takes", ifname, netns, len(set.Ifindex))
	}
	set.Ifindex[free], set.Name[free] = ifindex, name
	if err := c.objs.InIfaces.Update(&netns, &set, ebpf.UpdateAny); err != nil {
		return mapErr(c.objs.InIfaces, "pods", fmt.Errorf("write captured interface %s: %w", ifname, err))
	}
	return nil
}

// removeInIface forgets ifname as a captured interface of netns; found is
// false when it was not one.
func (c *Capture) removeInIface(netns uint64, ifname string) (found bool, err error) {
	var set captureInIfaceSet
	if err := c.objs.InIfaces.Lookup(&netns, &set); err != nil {
		return false, nil
	}
	name := ifName(ifname)
	for i := range set.Ifindex {
		if set.Ifindex[i] != 0 && set.Name[i] == name {
			set.Ifindex[i], set.Name[i] = 0, [16]uint8{}
			found = true
		}
	}
	if !found {
		return false, nil
	}
	if err := c.objs.InIfaces.Update(&netns, &set, ebpf.UpdateExist); err != nil {
		return true, fmt.Errorf("remove captured interface %s: %w", ifname, err)
	}
	return true, nil
}

func (c *Capture) hasInIface(netns uint64, ifname string) bool {
	var set captureInIfaceSet
	if err := c.objs.InIfaces.Lookup(&netns, &set); err != nil {
		return false
	}
	for i := range set.Ifindex {
		if set.Ifindex[i] != 0 && set.Name[i] == ifName(ifname) {
			return true
		}
	}
	return false
}

func ifName(s string) (b [16]uint8) {
	copy(b[:15], s)
	return b
}

// setInCapture puts this version's sidelane_in_capture in in_progs, where
// every sidecar pod's stub tail-calls it (pods of an earlier agent too:
// the map is pinned).
func (c *Capture) setInCapture() error {
	if err := c.objs.InProgs.Update(uint32(0), c.objs.SidelaneInCapture, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("set sidecar inbound capture program: %w", err)
	}
	return nil
}

// inSlots is capture.c's IN_SLOTS; inNetnsMagic its IN_NETNS_MAGIC.
const (
	inSlots      = 4
	inNetnsMagic = 0x5ce1a4e0c00c1e00
)

// newInLookupSpec keeps the pod-independent part of every pod's stub:
// sidelane_in_lookup with this Capture's maps associated.
func (c *Capture) newInLookupSpec(spec *ebpf.CollectionSpec) error {
	ps, ok := spec.Programs["sidelane_in_lookup"]
	if !ok {
		return errors.New("no sidelane_in_lookup program in the BPF object")
	}
	ps = ps.Copy()
	maps := c.pinnedMaps()
	for i := range ps.Instructions {
		ins := &ps.Instructions[i]
		// No BTF func or line info: with it every pod's load also builds
		// and loads a BTF blob (BPF_BTF_LOAD), which doubled the stub's
		// load time (192 against ~95 us here); the stub has one function
		// and needs none.
		*ins = btf.WithFuncMetadata(ins.WithSource(nil), nil)
		if !ins.IsLoadFromMap() {
			continue
		}
		m, ok := maps[ins.Reference()]
		if !ok {
			return fmt.Errorf("sidelane_in_lookup: map %q is not one of the pinned maps", ins.Reference())
		}
		if err := ins.AssociateMap(m); err != nil {
			return fmt.Errorf("sidelane_in_lookup: map %q: %w", ins.Reference(), err)
		}
	}
	c.inSpec = ps
	return nil
}

// inLookupProgSpec is netns's stub: sidelane_in_lookup with netns's cookie.
func (c *Capture) inLookupProgSpec(netns uint64) (*ebpf.ProgramSpec, error) {
	ps := c.inSpec.Copy()
	n := 0
	for i := range ps.Instructions {
		ins := &ps.Instructions[i]
		if ins.IsConstantLoad(asm.DWord) && uint64(ins.Constant) == inNetnsMagic {
			ins.Constant = int64(netns)
			n++
		}
	}
	if n == 0 {
		return nil, errors.New("sidelane_in_lookup: no netns cookie to patch")
	}
	return ps, nil
}

// inLookupProgram loads netns's copy of sidelane_in_lookup and remembers
// its ID as the one netns's link must run (see inProgs).
func (c *Capture) inLookupProgram(netns uint64) (*ebpf.Program, error) {
	ps, err := c.inLookupProgSpec(netns)
	if err != nil {
		return nil, err
	}
	p, err := ebpf.NewProgram(ps)
	if err != nil {
		return nil, fmt.Errorf("load inbound lookup of netns %d: %w", netns, err)
	}
	id, err := progID(p)
	if err != nil {
		p.Close()
		return nil, fmt.Errorf("inbound lookup of netns %d: %w", netns, err)
	}
	c.inProgs.set(netns, id)
	return p, nil
}

// progIDs maps each sidecar pod's netns cookie to the ID of the
// sidelane_in_lookup copy this process loaded for it (Load loads every
// pinned pod's anew), for Repair to tell it from another program: the
// kernel's tag of a program cannot be computed from its instructions
// here.
type progIDs struct {
	mu  sync.Mutex
	ids map[uint64]ebpf.ProgramID
}

func (p *progIDs) set(netns uint64, id ebpf.ProgramID) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ids == nil {
		p.ids = map[uint64]ebpf.ProgramID{}
	}
	p.ids[netns] = id
}

func (p *progIDs) get(netns uint64) (ebpf.ProgramID, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	id, ok := p.ids[netns]
	return id, ok
}

func (p *progIDs) forget(netns uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.ids, netns)
}

// attachInLookup attaches netns's sidelane_in_lookup to the netns at
// netnsPath, or moves the pinned link to this version's program.
func (c *Capture) attachInLookup(netnsPath string, netns uint64) error {
	prog, err := c.inLookupProgram(netns)
	if err != nil {
		return err
	}
	defer prog.Close()
	pin := c.inLookupPin(netns)
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		defer l.Close()
		if err := l.Update(prog); err != nil {
			return fmt.Errorf("update inbound lookup link of netns %d: %w", netns, err)
		}
		return nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("load pinned inbound lookup link %s: %w", pin, err)
	}
	f, err := os.Open(netnsPath)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", netnsPath, err)
	}
	defer f.Close()
	l, err := link.AttachNetNs(int(f.Fd()), prog)
	if err != nil {
		return fmt.Errorf("attach inbound lookup to %s: %w", netnsPath, err)
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		l.Detach()
		return fmt.Errorf("pin inbound lookup link: %w", err)
	}
	return nil
}

// detachLookupCapture removes netns's sk_lookup capture: its link, its
// captured interfaces and its recorded listeners.
func (c *Capture) detachLookupCapture(netns uint64) error {
	c.inProgs.forget(netns)
	var errs []error
	pin := c.inLookupPin(netns)
	if _, err := os.Stat(pin); err == nil {
		errs = append(errs, detachPin(pin))
	}
	errs = append(errs, ignoreNotExist(c.objs.InIfaces.Delete(&netns)))
	for _, fam := range []uint16{unix.AF_INET, unix.AF_INET6} {
		for slot := range uint16(inSlots) {
			k := captureInKey{Netns: netns, Family: fam, Slot: slot}
			errs = append(errs, ignoreNotExist(c.objs.InListeners.Delete(&k)))
		}
	}
	return errors.Join(errs...)
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

// inLookupPins lists every pod's pinned inbound lookup link.
func (c *Capture) inLookupPins() ([]string, error) {
	pins, err := filepath.Glob(filepath.Join(c.cfg.PinDir, "inlookup_*"))
	if err != nil {
		return nil, fmt.Errorf("list inbound lookup pins: %w", err)
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
	if _, err := c.removeInIface(netns, ifname); err != nil {
		return err
	}
	pin := c.inboundPin(netns, ifname)
	if _, err := os.Stat(pin); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return detachPin(pin)
}

// detachInbound removes netns's inbound, inbound lookup and time-wait
// lookup links, captured interfaces and recorded listeners (0: every
// pod's links; the maps' entries go with their pins on Uninstall).
func (c *Capture) detachInbound(netns uint64) error {
	pins, err := c.inboundPins(netns)
	if err != nil {
		return err
	}
	tw, err := c.twLookupPins(netns)
	if err != nil {
		return err
	}
	in, err := c.inLookupPins()
	if err != nil {
		return err
	}
	pins = append(pins, tw...)
	if netns != 0 {
		in = nil
		if err := c.detachLookupCapture(netns); err != nil {
			return err
		}
	}
	pins = append(pins, in...)
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
	in, err := c.inLookupPins()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, pin := range in {
		errs = append(errs, c.updateInLookup(pin))
	}
	return errors.Join(errs...)
}

// updateInLookup moves the pinned inbound lookup link at pin to this
// version's program for its netns (the cookie is in the pin's name).
func (c *Capture) updateInLookup(pin string) error {
	netns, err := strconv.ParseUint(strings.TrimPrefix(filepath.Base(pin), "inlookup_"), 10, 64)
	if err != nil {
		return fmt.Errorf("pin %s: not inlookup_<netns cookie>", pin)
	}
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return fmt.Errorf("load %s: %w", pin, err)
	}
	defer l.Close()
	prog, err := c.inLookupProgram(netns)
	if err != nil {
		return err
	}
	defer prog.Close()
	return l.Update(prog)
}
