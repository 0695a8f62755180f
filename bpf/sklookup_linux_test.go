//go:build linux

package bpf

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/sidelane/sidelane/istio/capture"
)

// reuseHelper listens on addr with SO_REUSEPORT (an Envoy worker) and
// answers every connection with "peer=<client> local=<accepted socket's
// local address> orig=<SO_ORIGINAL_DST> pid=<pid>".
func reuseHelper(addr string) int {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) })
		if err != nil {
			return err
		}
		return serr
	}}
	lc.SetMultipathTCP(false) // as Envoy (see TestMain)
	l, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	for {
		c, err := l.Accept()
		if err != nil {
			return 1
		}
		c.Read(make([]byte, 1))
		raw, _ := c.(*net.TCPConn).SyscallConn()
		orig := "error"
		raw.Control(func(fd uintptr) {
			level := unix.SOL_IP
			if a := netip.MustParseAddrPort(c.LocalAddr().String()).Addr(); a.Is6() && !a.Is4In6() {
				level = unix.SOL_IPV6
			}
			if a, err := getOrigDst(fd, level); err == nil {
				orig = a.String()
			}
		})
		fmt.Fprintf(c, "peer=%s local=%s orig=%s pid=%d\n", c.RemoteAddr(), c.LocalAddr(), orig, os.Getpid())
		c.Close()
	}
}

// startReuseHelper runs reuseHelper on [::]:15006 in the pod's netns and
// the test cgroup (as the pod's proxy, started after CNI ADD).
func (e *env) startReuseHelper(t *testing.T) *exec.Cmd {
	t.Helper()
	l := exec.Command("ip", "netns", "exec", e.podNS, os.Args[0], "-test.run=^$", "[::]:15006")
	l.Env = append(os.Environ(), helperEnv+"=reuse")
	l.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: e.cgfd}
	l.Stderr = os.Stderr
	if err := l.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Process.Kill(); l.Wait() })
	return l
}

// waitRecorded waits until n of the pod's listeners are in in_listeners.
func (e *env) waitRecorded(t *testing.T, n int) {
	t.Helper()
	for range 100 {
		if e.recorded() == n {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%d listeners recorded for the pod, want %d", e.recorded(), n)
}

func (e *env) recorded() int {
	n := 0
	var v uint64
	for _, fam := range []uint16{unix.AF_INET, unix.AF_INET6} {
		for slot := range uint16(inSlots) {
			k := captureInKey{Netns: e.cookie, Family: fam, Slot: slot}
			if e.cap.objs.InListeners.Lookup(&k, &v) == nil {
				n++
			}
		}
	}
	return n
}

// rawDial connects from the remote netns (another node: outside the test
// cgroup) and returns what the server said.
func (e *env) rawDial(t *testing.T, dst netip.AddrPort) (string, error) {
	netns, err := ns.GetNS("/var/run/netns/" + e.remNS)
	if err != nil {
		t.Fatal(err)
	}
	defer netns.Close()
	var out []byte
	err = netns.Do(func(ns.NetNS) error {
		c, err := net.DialTimeout("tcp", dst.String(), 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write([]byte("D"))
		out, err = io.ReadAll(c)
		return err
	})
	return string(out), err
}

func field(out, key string) string {
	for _, f := range strings.Fields(out) {
		if k, v, ok := strings.Cut(f, "="); ok && k == key {
			return v
		}
	}
	return ""
}

// TestInboundBySkLookup: a sidecar pod's inbound capture is sk_lookup,
// with no tc program on its interface (a tcx attach costs 12-14 ms under
// rtnl); the proxy, started after the attach (as after CNI ADD), gets
// captured connections with their original destination; no listener fails
// closed; SO_REUSEPORT listeners stay captured while one of them is left.
// Failed before sk_lookup capture: AttachInbound attached tcx.
func TestInboundBySkLookup(t *testing.T) {
	e := newEnv(t)
	s := defaultSettings()
	s.ExcludeInboundPorts = append(s.ExcludeInboundPorts, capture.PortRange{First: 9090, Last: 9090})
	e.enroll(s)
	if err := e.cap.AttachInbound(e.podPath, e.cookie, "eth0"); err != nil {
		t.Fatal(err)
	}
	if err := e.cap.VerifyInbound(e.cookie, "eth0"); err != nil {
		t.Fatal(err)
	}
	if ids := tcxLinkIDs(t, e.podPath, "eth0"); len(ids) != 0 {
		t.Errorf("sidecar pod: %d tcx links on eth0, want none", len(ids))
	}
	if _, err := os.Stat(e.cap.inboundPin(e.cookie, "eth0")); err == nil {
		t.Error("sidecar pod: a tc inbound link is pinned")
	}

	t.Run("no listener fails closed", func(t *testing.T) {
		before, _ := e.cap.Counters(e.cookie)
		if out, err := e.rawDial(t, ap(podIP, 8080)); err == nil {
			t.Errorf("captured port with no proxy listening reached %q", out)
		}
		after, _ := e.cap.Counters(e.cookie)
		if after.DroppedInbound <= before.DroppedInbound {
			t.Errorf("dropped_in %d -> %d, want it counted", before.DroppedInbound, after.DroppedInbound)
		}
	})

	a := e.startReuseHelper(t)
	e.waitRecorded(t, 1)
	b := e.startReuseHelper(t)
	e.waitRecorded(t, 2)
	pids := map[string]bool{}
	for _, dst := range []netip.AddrPort{ap(podIP, 8080), ap(podIP6, 8080)} {
		for range 20 {
			out, err := e.rawDial(t, dst)
			if err != nil {
				t.Fatalf("captured %s: %v", dst, err)
			}
			if got := netip.MustParseAddrPort(field(out, "local")); got.Addr().Unmap() != dst.Addr() || got.Port() != dst.Port() {
				t.Errorf("captured %s: proxy's accepted socket is at %s", dst, got)
			}
			if got := field(out, "orig"); got == "error" || netip.MustParseAddrPort(got).Port() != dst.Port() {
				t.Errorf("captured %s: SO_ORIGINAL_DST %s", dst, got)
			}
			pids[field(out, "pid")] = true
		}
	}
	t.Logf("connections spread over %d reuseport listeners", len(pids))
	if out, err := e.rawDial(t, ap(podIP, 9090)); err != nil || field(out, "orig") != "" {
		t.Errorf("excluded port 9090: %v, %q: want the app", err, out)
	}
	if got, _ := e.cap.Counters(e.cookie); got.RedirectedInbound < 40 {
		t.Errorf("redirected_in %d, want at least 40", got.RedirectedInbound)
	}

	// One reuseport listener closes (a worker, a hot restart): the other
	// still gets every connection, whichever slot it had.
	for _, p := range []*exec.Cmd{a, b} {
		p.Process.Kill()
		p.Wait()
		if p == a {
			e.waitRecorded(t, 1)
			for range 10 {
				if out, err := e.rawDial(t, ap(podIP, 8080)); err != nil || field(out, "orig") == "" {
					t.Fatalf("one of two listeners closed: %v, %q", err, out)
				}
			}
		}
	}
	e.waitRecorded(t, 0)
	if out, err := e.rawDial(t, ap(podIP, 8080)); err == nil {
		t.Errorf("every listener closed: reached %q", out)
	}

	if err := e.cap.Delete(e.cookie); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(e.cap.inLookupPin(e.cookie)); err == nil {
		t.Error("inbound lookup link still pinned after Delete")
	}
	if n := countEntries(t, e.cap.objs.InIfaces); n != 0 {
		t.Errorf("in_ifaces has %d entries after Delete", n)
	}
	if out, err := e.rawDial(t, ap(podIP, 8080)); err != nil || field(out, "orig") != "" {
		t.Errorf("after Delete: %v, %q: want the app", err, out)
	}
}

// TestUpgradeKeepsTCPods: a pod enrolled by an older agent (tcx link and
// time-wait lookup pinned, its proxy listening before this version's
// sock_ops could record it) stays captured by tc after the new objects are
// loaded and the agent attaches it again, and the new sk_lookup programs
// never drop its traffic for want of a recorded listener.
func TestUpgradeKeepsTCPods(t *testing.T) {
	e := newEnv(t)
	e.startSidecar()
	e.enroll(defaultSettings())
	// The old AttachInbound: time-wait lookup and tcx.
	if err := e.cap.attachTWLookup(e.podPath, e.cookie); err != nil {
		t.Fatal(err)
	}
	if err := e.cap.attachTC(e.podPath, e.cookie, "eth0"); err != nil {
		t.Fatal(err)
	}
	if err := e.cap.Close(); err != nil {
		t.Fatal(err)
	}
	e.load()
	if err := e.cap.AttachInbound(e.podPath, e.cookie, "eth0"); err != nil {
		t.Fatal(err)
	}
	if ids := tcxLinkIDs(t, e.podPath, "eth0"); len(ids) != 1 {
		t.Errorf("old pod after upgrade: %d tcx links, want its 1", len(ids))
	}
	if _, err := os.Stat(e.cap.inLookupPin(e.cookie)); err == nil {
		t.Error("old pod after upgrade: got an inbound lookup link")
	}
	passthrough := netip.MustParseAddr("127.0.0.6")
	r, err := e.dialFromRemote(ap(podIP, 8080))
	if err != nil || r.peer.Addr().Unmap() != passthrough || r.local != ap(podIP, 8080) {
		t.Errorf("old pod after upgrade, captured port: %v, app saw %s at %s; want via the sidecar", err, r.peer, r.local)
	}
	r, err = e.dialFromRemote(ap(podIP, 15020))
	if err != nil || r.peer.Addr().Unmap() != remoteIP {
		t.Errorf("old pod after upgrade, excluded port: %v, app saw %s; want direct", err, r.peer)
	}

	// Its tc link gone, Repair gives it sk_lookup capture instead, with
	// the listener that was open before (never seen by sock_ops) recorded.
	byID(t, tcxLinkIDs(t, e.podPath, "eth0")[0], func(l link.Link) error { return l.Detach() })
	if _, err := e.cap.Repair([]Inbound{{NetnsPath: e.podPath, Netns: e.cookie, IfName: "eth0"}}); err != nil {
		t.Fatal(err)
	}
	if ids := tcxLinkIDs(t, e.podPath, "eth0"); len(ids) != 0 {
		t.Errorf("tc link detached and repaired: %d tcx links, want sk_lookup capture", len(ids))
	}
	if err := e.cap.VerifyInbound(e.cookie, "eth0"); err != nil || !e.cap.hasInIface(e.cookie, "eth0") {
		t.Errorf("tc link detached and repaired: %v, captured interface recorded %v", err, e.cap.hasInIface(e.cookie, "eth0"))
	}
	r, err = e.dialFromRemote(ap(podIP, 8080))
	if err != nil || r.peer.Addr().Unmap() != passthrough || r.local != ap(podIP, 8080) {
		t.Errorf("after repair: %v, app saw %s at %s; want via the sidecar", err, r.peer, r.local)
	}
	r, err = e.dialFromRemote(ap(podIP, 15020))
	if err != nil || r.peer.Addr().Unmap() != remoteIP {
		t.Errorf("after repair, excluded port: %v, app saw %s; want direct", err, r.peer)
	}
}

// TestSkLookupRepairAndRestart: a sidecar pod's inbound lookup link is
// updated in place on agent restart, re-attached by Repair when detached,
// and moved back when pointed at another program.
func TestSkLookupRepairAndRestart(t *testing.T) {
	e := newEnv(t)
	e.enroll(defaultSettings())
	if err := e.cap.AttachInbound(e.podPath, e.cookie, "eth0"); err != nil {
		t.Fatal(err)
	}
	e.startReuseHelper(t)
	e.waitRecorded(t, 1)
	in := []Inbound{{NetnsPath: e.podPath, Netns: e.cookie, IfName: "eth0"}}
	captured := func(when string) {
		t.Helper()
		if out, err := e.rawDial(t, ap(podIP, 8080)); err != nil || field(out, "orig") == "" {
			t.Errorf("%s: %v, %q: want the proxy", when, err, out)
		}
	}
	captured("attached")
	if r, err := e.cap.Repair(in); err != nil || len(r) != 0 {
		t.Errorf("healthy pod: Repair did %v, %v", r, err)
	}
	if err := e.cap.Close(); err != nil {
		t.Fatal(err)
	}
	e.load()
	captured("after restart")
	if err := e.cap.AttachInbound(e.podPath, e.cookie, "eth0"); err != nil {
		t.Fatal(err)
	}
	if r, err := e.cap.Repair(in); err != nil || len(r) != 0 {
		t.Errorf("after restart: Repair did %v, %v", r, err)
	}

	l, err := link.LoadPinnedLink(e.cap.inLookupPin(e.cookie), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Update(e.cap.objs.SidelaneTwLookup); err != nil {
		t.Fatal(err)
	}
	if out, err := e.rawDial(t, ap(podIP, 8080)); err == nil && field(out, "orig") != "" {
		t.Fatal("link on another program still captures: the test shows nothing")
	}
	r, err := e.cap.Repair(in)
	if err != nil || len(r) != 1 || r[0].Reason != "replaced" {
		t.Errorf("replaced program: Repair did %v, %v", r, err)
	}
	captured("after repairing a replaced program")
	if err := l.Detach(); err != nil {
		t.Fatal(err)
	}
	l.Close()
	r, err = e.cap.Repair(in)
	if err != nil || len(r) != 1 || r[0].Reason != "detached" {
		t.Errorf("detached link: Repair did %v, %v", r, err)
	}
	captured("after repairing a detached link")
	if ids := tcxLinkIDs(t, e.podPath, "eth0"); len(ids) != 0 {
		t.Errorf("repair attached %d tcx links to a sidecar pod", len(ids))
	}
}
