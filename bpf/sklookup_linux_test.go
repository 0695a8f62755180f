//go:build linux

package bpf

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
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
	return exchangeIn(t, "/var/run/netns/"+e.remNS, net.Dialer{Timeout: 2 * time.Second}, "tcp", dst, 5*time.Second)
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
	// As Istio's capture: ::6 (the proxy's IPv6 passthrough source, exempt
	// from capture) is the pod's own, so a SYN-ACK to it stays inside.
	if out, err := exec.Command("ip", "-n", e.podNS, "-6", "addr", "show", "dev", "lo").CombinedOutput(); err != nil || !strings.Contains(string(out), "inet6 ::6/128") {
		t.Errorf("lo lacks ::6/128 (%v): %s", err, out)
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
	// The app calling its own pod IP stays inside the pod: the connect
	// hooks leave it alone (Istio's "-o lo ! owner: RETURN"), and so does
	// sk_lookup (the stack reports eth0 as its ingress interface).
	if r := e.dial(ap(podIP, 8080), false); r.sha == "" {
		t.Errorf("app to its own pod IP went through the proxy (peer %s), want the app", r.peer)
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

// fragmentedSYN sends, from the netns at path, a TCP SYN from src to dst
// split into two IP fragments (raw sockets), and returns the TCP flags of
// the first answer from dst (0x12 SYN-ACK, 0x14 RST; 0 when none came).
func fragmentedSYN(t *testing.T, path string, src, dst netip.AddrPort) byte {
	t.Helper()
	netns, err := ns.GetNS(path)
	if err != nil {
		t.Fatal(err)
	}
	defer netns.Close()
	var flags byte
	err = netns.Do(func(ns.NetNS) error {
		v6 := dst.Addr().Is6()
		af := unix.AF_INET
		if v6 {
			af = unix.AF_INET6
		}
		rx, err := unix.Socket(af, unix.SOCK_RAW, unix.IPPROTO_TCP)
		if err != nil {
			return err
		}
		defer unix.Close(rx)
		tv := unix.NsecToTimeval(int64(2 * time.Second))
		if err := unix.SetsockoptTimeval(rx, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			return err
		}
		tx, err := unix.Socket(af, unix.SOCK_RAW, unix.IPPROTO_RAW)
		if err != nil {
			return err
		}
		defer unix.Close(tx)
		// The SYN: 20 bytes of header and 12 of options (MSS, NOPs). IPv4
		// in fragments of 16 and 16 bytes: the first carries the ports
		// but not the flags. IPv6 of 24 and 8 (Linux drops a first
		// fragment without the whole TCP header, RFC 7112).
		tcp := make([]byte, 32)
		binary.BigEndian.PutUint16(tcp[0:], src.Port())
		binary.BigEndian.PutUint16(tcp[2:], dst.Port())
		binary.BigEndian.PutUint32(tcp[4:], 12345)
		tcp[12], tcp[13] = 8<<4, 0x02
		binary.BigEndian.PutUint16(tcp[14:], 65535)
		copy(tcp[20:], []byte{2, 4, 0x05, 0x00, 1, 1, 1, 1, 1, 1, 1, 0})
		cut := 16
		if v6 {
			cut = 24
		}
		binary.BigEndian.PutUint16(tcp[16:], tcpChecksum(src.Addr(), dst.Addr(), tcp))
		const id = 0x5151
		var frags [][]byte
		var to unix.Sockaddr
		if v6 {
			if err := unix.SetsockoptInt(tx, unix.IPPROTO_IPV6, unix.IPV6_HDRINCL, 1); err != nil {
				return err
			}
			for i, part := range [][]byte{tcp[:cut], tcp[cut:]} {
				h := make([]byte, 48)
				h[0] = 0x60
				binary.BigEndian.PutUint16(h[4:], uint16(8+len(part)))
				h[6], h[7] = 44, 64 // next: fragment header
				s, d := src.Addr().As16(), dst.Addr().As16()
				copy(h[8:], s[:])
				copy(h[24:], d[:])
				h[40] = unix.IPPROTO_TCP
				off := uint16(i*cut/8) << 3
				if i == 0 {
					off |= 1 // more fragments
				}
				binary.BigEndian.PutUint16(h[42:], off)
				binary.BigEndian.PutUint32(h[44:], id)
				frags = append(frags, append(h, part...))
			}
			to = &unix.SockaddrInet6{Addr: dst.Addr().As16()}
		} else {
			for i, part := range [][]byte{tcp[:cut], tcp[cut:]} {
				h := make([]byte, 20)
				h[0] = 0x45
				binary.BigEndian.PutUint16(h[2:], uint16(20+len(part)))
				binary.BigEndian.PutUint16(h[4:], id)
				off := uint16(i * cut / 8)
				if i == 0 {
					off |= 0x2000 // more fragments
				}
				binary.BigEndian.PutUint16(h[6:], off)
				h[8], h[9] = 64, unix.IPPROTO_TCP
				s, d := src.Addr().As4(), dst.Addr().As4()
				copy(h[12:], s[:])
				copy(h[16:], d[:])
				frags = append(frags, append(h, part...))
			}
			to = &unix.SockaddrInet4{Addr: dst.Addr().As4()}
		}
		for _, f := range frags {
			if err := unix.Sendto(tx, f, 0, to); err != nil {
				return fmt.Errorf("send fragment: %w", err)
			}
		}
		buf := make([]byte, 2048)
		for {
			n, _, err := unix.Recvfrom(rx, buf, 0)
			if err != nil {
				return nil // timeout: no answer
			}
			p := buf[:n]
			if !v6 {
				p = p[int(p[0]&0xf)*4:] // IPv4 raw sockets get the IP header
			}
			if len(p) >= 14 && binary.BigEndian.Uint16(p[0:]) == dst.Port() && binary.BigEndian.Uint16(p[2:]) == src.Port() {
				flags = p[13] & 0x3f
				return nil
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return flags
}

func tcpChecksum(src, dst netip.Addr, tcp []byte) uint16 {
	var sum uint32
	add := func(b []byte) {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(b[i:]))
		}
		if len(b)%2 == 1 {
			sum += uint32(b[len(b)-1]) << 8
		}
	}
	if src.Is4() {
		s, d := src.As4(), dst.As4()
		add(s[:])
		add(d[:])
		sum += unix.IPPROTO_TCP + uint32(len(tcp))
	} else {
		s, d := src.As16(), dst.As16()
		add(s[:])
		add(d[:])
		sum += uint32(len(tcp)) + unix.IPPROTO_TCP
	}
	add(tcp)
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// dialExtHeaders connects from the remote netns to dst with a hop-by-hop
// and a destination options header on every packet and returns what the
// server said.
func (e *env) dialExtHeaders(t *testing.T, dst netip.AddrPort) (string, error) {
	// One PadN option filling each 8-byte header.
	opts := []byte{0, 0, 1, 4, 0, 0, 0, 0}
	d := net.Dialer{Timeout: 2 * time.Second, Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = errors.Join(
				unix.SetsockoptString(int(fd), unix.IPPROTO_IPV6, unix.IPV6_HOPOPTS, string(opts)),
				unix.SetsockoptString(int(fd), unix.IPPROTO_IPV6, unix.IPV6_DSTOPTS, string(opts)))
		})
		return errors.Join(err, serr)
	}}
	return exchangeIn(t, "/var/run/netns/"+e.remNS, d, "tcp6", dst, 5*time.Second)
}

// TestSkLookupParseDifferentials: a sidecar pod's inbound capture is the
// kernel's listener lookup, after reassembly and extension headers, so
// the packets tc had to parse itself (and once let through to the app)
// reach the proxy like any other: a SYN in two IP fragments (the first
// without the TCP flags), IPv4 and IPv6, and a connection whose every
// packet carries IPv6 hop-by-hop and destination options headers. Port
// 7777 has no app listener: a SYN-ACK from it is the proxy's.
func TestSkLookupParseDifferentials(t *testing.T) {
	e := newEnv(t)
	e.enroll(defaultSettings())
	if err := e.cap.AttachInbound(e.podPath, e.cookie, "eth0"); err != nil {
		t.Fatal(err)
	}
	proxy := e.startReuseHelper(t)
	e.waitRecorded(t, 1)
	rem := "/var/run/netns/" + e.remNS
	for _, tt := range []struct {
		name     string
		src, dst netip.AddrPort
		want     byte
	}{
		{"IPv4 fragmented SYN to a captured port", ap(remoteIP, 40001), ap(podIP, 7777), 0x12},
		{"IPv6 fragmented SYN to a captured port", ap(remoteIP6, 40002), ap(podIP6, 7777), 0x12},
		{"IPv4 fragmented SYN to an excluded port (no listener)", ap(remoteIP, 40003), ap(podIP, 15021), 0x14},
	} {
		if got := fragmentedSYN(t, rem, tt.src, tt.dst); got != tt.want {
			t.Errorf("%s: answered with flags %#x, want %#x", tt.name, got, tt.want)
		}
	}
	out, err := e.dialExtHeaders(t, ap(podIP6, 8080))
	if err != nil || field(out, "orig") != ap(podIP6, 8080).String() {
		t.Errorf("IPv6 with extension headers: %v, %q: want the proxy, original destination %s", err, out, ap(podIP6, 8080))
	}

	proxy.Process.Kill()
	proxy.Wait()
	e.waitRecorded(t, 0)
	before, _ := e.cap.Counters(e.cookie)
	if got := fragmentedSYN(t, rem, ap(remoteIP, 40004), ap(podIP, 8080)); got == 0x12 {
		t.Error("fragmented SYN with no proxy: accepted (by the app)")
	}
	if after, _ := e.cap.Counters(e.cookie); after.DroppedInbound == before.DroppedInbound {
		t.Error("fragmented SYN with no proxy: dropped_in not counted")
	}
}
