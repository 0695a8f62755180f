//go:build linux

package bpf

import (
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
)

// cgroupLinkIDs finds, the way another root process would (walking the
// kernel's links, as `bpftool link show` does), the IDs of the bpf_links
// of type at on the cgroup dir.
func cgroupLinkIDs(t *testing.T, dir string, at ebpf.AttachType) []link.ID {
	t.Helper()
	cg, err := cgroupID(dir)
	if err != nil {
		t.Fatal(err)
	}
	var ids []link.ID
	var it link.Iterator
	defer it.Close()
	for it.Next() {
		info, err := it.Link.Info()
		if err != nil {
			continue
		}
		if c := info.Cgroup(); c != nil && c.CgroupId == cg && ebpf.AttachType(c.AttachType) == at {
			ids = append(ids, it.ID)
		}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return ids
}

func tcxLinkIDs(t *testing.T, netnsPath, ifname string) []link.ID {
	t.Helper()
	target, err := ns.GetNS(netnsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	var ids []link.ID
	err = target.Do(func(ns.NetNS) error {
		ifc, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		res, err := link.QueryPrograms(link.QueryOptions{Target: ifc.Index, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return err
		}
		for _, p := range res.Programs {
			if id, ok := p.LinkID(); ok {
				ids = append(ids, id)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

// byID opens a link by its ID and runs f on it, as bpftool or another
// agent would.
func byID(t *testing.T, id link.ID, f func(link.Link) error) {
	t.Helper()
	l, err := link.NewFromID(id)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := f(l); err != nil {
		t.Fatal(err)
	}
}

// TestRepair breaks each kind of attachment from outside (by link ID, as
// another root process would), shows capture is gone, and that Repair
// brings it back and reports what it did.
func TestRepair(t *testing.T) {
	e := newEnvOpts(t, envOpts{tcInbound: true}) // tc links (per-node pods'); sk_lookup's: TestSkLookupRepairAndRestart
	e.startSidecar()
	e.enroll(defaultSettings())
	if err := e.cap.AttachInbound(e.podPath, e.cookie, "eth0"); err != nil {
		t.Fatal(err)
	}
	inbound := []Inbound{{NetnsPath: e.podPath, Netns: e.cookie, IfName: "eth0"}}
	outCaptured := func() bool {
		t.Helper()
		return e.dial(ap(remoteIP, 8080), false).peer.Addr() == sidecarSrc
	}
	inCaptured := func() bool {
		t.Helper()
		r, err := e.dialFromRemote(ap(podIP, 8080))
		if err != nil {
			t.Fatal(err)
		}
		return r.peer.Addr().Unmap() == netip.MustParseAddr("127.0.0.6")
	}
	repair := func(want ...Repaired) {
		t.Helper()
		got, err := e.cap.Repair(inbound)
		if err != nil {
			t.Fatal(err)
		}
		slices.SortFunc(got, func(a, b Repaired) int { return strings.Compare(a.String(), b.String()) })
		slices.SortFunc(want, func(a, b Repaired) int { return strings.Compare(a.String(), b.String()) })
		if !slices.Equal(got, want) {
			t.Errorf("Repair() = %v, want %v", got, want)
		}
	}
	if !outCaptured() || !inCaptured() {
		t.Fatal("not captured before anything was broken")
	}
	repair() // nothing to do

	t.Run("cgroup link detached", func(t *testing.T) {
		for _, id := range cgroupLinkIDs(t, e.cgroup, ebpf.AttachCGroupInet4Connect) {
			byID(t, id, link.Link.Detach)
		}
		if outCaptured() {
			t.Fatal("still captured after connect4's link was detached")
		}
		repair(Repaired{RepairCgroupLink, "connect4", "detached"})
		if !outCaptured() {
			t.Error("not captured after repair")
		}
	})
	t.Run("cgroup link moved to another program", func(t *testing.T) {
		n := newNeighbour(t)
		for _, id := range cgroupLinkIDs(t, e.cgroup, ebpf.AttachCGroupInet4Connect) {
			byID(t, id, func(l link.Link) error { return l.Update(n.connect4) })
		}
		if outCaptured() {
			t.Fatal("still captured after connect4's link was moved to another program")
		}
		repair(Repaired{RepairCgroupLink, "connect4", "replaced"})
		if !outCaptured() {
			t.Error("not captured after repair")
		}
	})
	t.Run("tc link detached", func(t *testing.T) {
		for _, id := range tcxLinkIDs(t, e.podPath, "eth0") {
			byID(t, id, link.Link.Detach)
		}
		if inCaptured() {
			t.Fatal("inbound still captured after the tcx link was detached")
		}
		repair(Repaired{RepairTCLink, "", "detached"}.withName(e.cookie, "eth0"))
		if !inCaptured() {
			t.Error("inbound not captured after repair")
		}
	})
	t.Run("tc link unpinned", func(t *testing.T) {
		// Removing the pin releases the link (the agent holds no handle),
		// a moment later: the kernel frees it from a work queue.
		if err := os.Remove(e.cap.inboundPin(e.cookie, "eth0")); err != nil {
			t.Fatal(err)
		}
		for i := 0; len(tcxLinkIDs(t, e.podPath, "eth0")) > 0; i++ {
			if i == 100 {
				t.Fatal("the tcx link outlived its pin")
			}
			time.Sleep(20 * time.Millisecond)
		}
		if inCaptured() {
			t.Fatal("inbound still captured after the tcx link's pin was removed")
		}
		repair(Repaired{RepairTCLink, "", "unpinned"}.withName(e.cookie, "eth0"))
		if !inCaptured() {
			t.Error("inbound not captured after repair")
		}
	})
	t.Run("time-wait lookup link detached", func(t *testing.T) {
		l, err := link.LoadPinnedLink(e.cap.twLookupPin(e.cookie), nil)
		if err != nil {
			t.Fatal(err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			t.Fatal(err)
		}
		byID(t, info.ID, link.Link.Detach)
		repair(Repaired{RepairNetnsLink, strconv.FormatUint(e.cookie, 10), "detached"})
		l, err = link.LoadPinnedLink(e.cap.twLookupPin(e.cookie), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		if info, err := l.Info(); err != nil || info.NetNs() == nil || info.NetNs().NetnsInode == 0 {
			t.Errorf("time-wait lookup link not attached after repair: %+v, %v", info, err)
		}
	})
	t.Run("sk_msg detached", func(t *testing.T) {
		if err := link.RawDetachProgram(link.RawDetachProgramOptions{
			Target: e.cap.objs.SockPairs.FD(), Program: e.cap.objs.SidelaneMsg, Attach: ebpf.AttachSkMsgVerdict,
		}); err != nil {
			t.Fatal(err)
		}
		repair(Repaired{RepairSkMsg, "sock_pairs", "detached"})
	})
	t.Run("pins removed", func(t *testing.T) {
		for _, name := range []string{"pods", "link_connect4"} {
			if err := os.Remove(filepath.Join(e.pinDir, name)); err != nil {
				t.Fatal(err)
			}
		}
		repair(Repaired{RepairPin, "pods", "unpinned"}, Repaired{RepairPin, "link_connect4", "unpinned"})
		// A restart finds the pod (the pods map pinned again, not a new
		// empty one) and the link (updated, not attached twice).
		if err := e.cap.Close(); err != nil {
			t.Fatal(err)
		}
		e.cap = nil
		e.load()
		if got, err := e.cap.Enrolled(); err != nil || !slices.Equal(got, []uint64{e.cookie}) {
			t.Errorf("after restart enrolled = %v, %v; want [%d]", got, err, e.cookie)
		}
		if n := len(cgroupLinkIDs(t, e.cgroup, ebpf.AttachCGroupInet4Connect)); n != 1 {
			t.Errorf("%d connect4 links after restart, want 1", n)
		}
		if !outCaptured() {
			t.Error("not captured after restart")
		}
	})
	repair() // everything back in place
}

func (r Repaired) withName(netns uint64, ifname string) Repaired {
	r.Name = inboundName(netns, ifname)
	return r
}
