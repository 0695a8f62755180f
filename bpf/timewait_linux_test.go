package bpf

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// dialFromPort connects from the remote netns from a fixed source port, so
// a second connection reuses the four-tuple of the first.
func dialFromPort(t *testing.T, path string, src, dst netip.AddrPort) (reply, error) {
	return dialWith(t, path, net.Dialer{
		Timeout:   3 * time.Second,
		LocalAddr: net.TCPAddrFromAddrPort(src),
		Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
			})
			if err != nil {
				return err
			}
			return serr
		},
	}, dst)
}

// serveSidecar6 listens on [::]:15006 in the pod's netns as an IPv6
// sidecar (haproxy's listener is IPv4 only) and answers like serveListener,
// marked "via=sidecar".
func serveSidecar6(t *testing.T, e *env) net.Listener {
	netns, err := ns.GetNS(e.podPath)
	if err != nil {
		t.Fatal(err)
	}
	defer netns.Close()
	var l net.Listener
	if err := netns.Do(func(ns.NetNS) error {
		// Plain TCP: an MPTCP listener (Go's default) cannot join a
		// sockhash, and tc then drops the reuse (see the README).
		var lc net.ListenConfig
		lc.SetMultipathTCP(false)
		l, err = lc.Listen(context.Background(), "tcp6", "[::]:15006")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			io.ReadFull(c, make([]byte, 1))
			fmt.Fprintf(c, "peer=%s local=%s via=sidecar\n", c.RemoteAddr(), c.LocalAddr())
			c.Close() // the pod's side closes first: its socket goes to TIME_WAIT
		}
	}()
	return l
}

// TestInboundTimeWaitReuse: the pod's side closes first, so its socket of
// a captured inbound connection sits in TIME_WAIT; a client that reuses
// the four-tuple (as clients with many short connections do) must get a
// new, captured connection, as it does without sidelane. The SYN that
// finds TIME_WAIT is the one inbound SYN the stack itself looks a listener
// up for (TCP_TW_SYN), so it must reach the proxy there too, never the
// app's listener, and nothing when the proxy is gone.
//
// With tc (per-node pods, pods of an older agent) tc records the SYN and
// sidelane_tw_lookup answers the TCP_TW_SYN lookup (timewait_reuse counts
// it); with sk_lookup capture (sidecar pods) that lookup is the capture
// itself, nothing is recorded and nothing counted.
func TestInboundTimeWaitReuse(t *testing.T) {
	for _, mode := range []string{"tc", "sk_lookup"} {
		t.Run(mode, func(t *testing.T) { testInboundTimeWaitReuse(t, mode == "tc") })
	}
}

func testInboundTimeWaitReuse(t *testing.T, tc bool) {
	e := newEnvOpts(t, envOpts{tcInbound: tc})
	wantReuse := func(n uint64) uint64 {
		if tc {
			return n
		}
		return 0
	}
	src := netip.AddrPortFrom(remoteIP, 41234)
	dst := ap(podIP, 8080)
	rem := "/var/run/netns/" + e.remNS

	// Without capture the kernel takes the SYN that finds TIME_WAIT.
	for i := 0; i < 2; i++ {
		if _, err := dialFromPort(t, rem, src, dst); err != nil {
			t.Fatalf("uncaptured connection %d from a reused tuple: %v", i, err)
		}
	}

	sidecar := e.startSidecar()
	e.enroll(defaultSettings())
	if err := e.cap.AttachInbound(e.podPath, e.cookie, "eth0"); err != nil {
		t.Fatal(err)
	}
	counters := func() Counters {
		c, err := e.cap.Counters(e.cookie)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	src = netip.AddrPortFrom(remoteIP, 41235)
	for i := 0; i < 3; i++ {
		r, err := dialFromPort(t, rem, src, dst)
		if err != nil {
			t.Fatalf("captured connection %d from a reused tuple: %v (counters %+v)", i, err, counters())
		}
		if r.peer.Addr().Unmap() != netip.MustParseAddr("127.0.0.6") {
			t.Errorf("connection %d reached the app from %s, not through the sidecar", i, r.peer)
		}
	}
	if c := counters(); c.TimeWaitReuse != wantReuse(2) {
		t.Errorf("timewait_reuse = %d after 3 connections from one tuple, want %d (counters %+v)", c.TimeWaitReuse, wantReuse(2), c)
	}

	t.Run("IPv6", func(t *testing.T) {
		serveSidecar6(t, e)
		if !tc {
			// A listener of a process outside the pod's cgroup (this
			// test's): sock_ops never sees it; attaching records it.
			if err := e.cap.AttachInbound(e.podPath, e.cookie, "eth0"); err != nil {
				t.Fatal(err)
			}
		}
		src6 := netip.AddrPortFrom(remoteIP6, 41236)
		before := counters().TimeWaitReuse
		for i := 0; i < 3; i++ {
			r, err := dialFromPort(t, rem, src6, ap(podIP6, 8080))
			if err != nil {
				t.Fatalf("IPv6 connection %d from a reused tuple: %v (counters %+v)", i, err, counters())
			}
			if r.local != ap(podIP6, 8080) {
				t.Errorf("IPv6 connection %d: accepted with local address %s, want the original destination", i, r.local)
			}
		}
		if got := counters().TimeWaitReuse - before; got != wantReuse(2) {
			t.Errorf("IPv6: timewait_reuse grew by %d, want %d", got, wantReuse(2))
		}
	})

	// The app must never get the reused tuple: not without the time-wait
	// lookup (tc then keeps the SYN on the proxy's listener, which the
	// kernel drops while TIME_WAIT lasts) ...
	t.Run("no lookup attached", func(t *testing.T) {
		if !tc {
			t.Skip("with sk_lookup capture the lookup is the capture (see TestSkLookupRepairAndRestart)")
		}
		src := netip.AddrPortFrom(remoteIP, 41237)
		if _, err := dialFromPort(t, rem, src, dst); err != nil {
			t.Fatal(err)
		}
		if err := detachPin(e.cap.twLookupPin(e.cookie)); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := e.cap.AttachInbound(e.podPath, e.cookie, "eth0"); err != nil {
				t.Error(err)
			}
		})
		before := counters()
		if r, err := dialFromPort(t, rem, src, dst); err == nil && r.peer.Addr().Unmap() != netip.MustParseAddr("127.0.0.6") {
			t.Errorf("reused tuple with no time-wait lookup reached the app from %s", r.peer)
		}
		if c := counters(); c.TimeWaitReuse != before.TimeWaitReuse {
			t.Errorf("timewait_reuse counted with no lookup attached: %+v", c)
		}
	})

	// ... nor with the sidecar gone (fails closed).
	t.Run("sidecar gone", func(t *testing.T) {
		src := netip.AddrPortFrom(remoteIP, 41238)
		if _, err := dialFromPort(t, rem, src, dst); err != nil {
			t.Fatal(err)
		}
		sidecar.Process.Kill()
		sidecar.Wait()
		if !e.waitListen(15006, false) {
			t.Fatal("haproxy still listens after being killed")
		}
		before := counters()
		if r, err := dialFromPort(t, rem, src, dst); err == nil {
			t.Errorf("reused tuple with no sidecar reached the app from %s", r.peer)
		}
		if c := counters(); c.DroppedInbound == before.DroppedInbound {
			t.Errorf("reused tuple with no sidecar: nothing dropped (counters %+v)", c)
		}
	})
}

// TestTimeWaitLookupProgram runs sidelane_tw_lookup (BPF_PROG_TEST_RUN):
// only the lookup tc recorded is changed, and it goes to the recorded
// listener or is dropped (fail closed), never left to the kernel's own
// lookup (the app's listener).
func TestTimeWaitLookupProgram(t *testing.T) {
	c := loadUnattached(t)
	// BPF_PROG_TEST_RUN leaves ingress_ifindex 0.
	const netns, ifindex = 77, 0
	client, pod := netip.MustParseAddr("10.77.0.1"), netip.MustParseAddr("10.77.0.2")
	ctx := func(dport uint32) []byte {
		// struct bpf_sk_lookup: cookie, family, protocol, remote_ip4,
		// remote_ip6[4], remote_port (be16) + pad, local_ip4,
		// local_ip6[4], local_port, ingress_ifindex (must be 0 here).
		b := make([]byte, 72)
		binary.LittleEndian.PutUint32(b[8:], unix.AF_INET)
		binary.LittleEndian.PutUint32(b[12:], unix.IPPROTO_TCP)
		copy(b[16:20], client.AsSlice())
		binary.BigEndian.PutUint16(b[36:], 41234)
		copy(b[40:44], pod.AsSlice())
		binary.LittleEndian.PutUint32(b[60:], dport)
		return b
	}
	record := func(at uint64) {
		t.Helper()
		k := captureTwKey{Src: client.As16(), Dst: pod.As16(), Sport: 41234, Dport: 8080, Ifindex: ifindex} // v4-mapped
		if err := c.objs.TwPending.Put(k, captureTwRec{Netns: netns, At: at}); err != nil {
			t.Fatal(err)
		}
	}
	now := func() uint64 {
		var ts unix.Timespec
		if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
			t.Fatal(err)
		}
		return uint64(ts.Nano())
	}
	run := func(dport uint32) uint32 {
		t.Helper()
		ret, err := c.objs.SidelaneTwLookup.Run(&ebpf.RunOptions{Context: ctx(dport)})
		if err != nil {
			t.Fatal(err)
		}
		return ret
	}
	const skDrop, skPass = 0, 1
	if got := run(8080); got != skPass {
		t.Errorf("no recorded reuse: %d, want SK_PASS (the kernel's lookup)", got)
	}
	record(now())
	if got := run(9090); got != skPass {
		t.Errorf("a lookup for another tuple: %d, want SK_PASS", got)
	}
	if got := run(8080); got != skDrop {
		t.Errorf("recorded reuse, no listener recorded: %d, want SK_DROP", got)
	}
	if got := run(8080); got != skDrop {
		t.Errorf("a record is kept for another SYN of the tuple: %d, want SK_DROP", got)
	}

	// With the listener recorded, the lookup selects it.
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	l, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	raw, err := l.(*net.TCPListener).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var want uint64
	var perr error
	if err := raw.Control(func(fd uintptr) {
		if perr = c.objs.TwListeners.Put(uint64(netns), uint64(fd)); perr != nil {
			return
		}
		want, perr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE)
	}); err != nil || perr != nil {
		t.Fatal(err, perr)
	}
	out := make([]byte, 72)
	ret, err := c.objs.SidelaneTwLookup.Run(&ebpf.RunOptions{Context: ctx(8080), ContextOut: out})
	if err != nil {
		t.Fatal(err)
	}
	if got := binary.LittleEndian.Uint64(out); ret != skPass || got != want {
		t.Errorf("recorded reuse with the listener recorded: %d selecting socket %d, want SK_PASS selecting the listener %d", ret, got, want)
	}
	if err := c.objs.TwListeners.Delete(uint64(netns)); err != nil {
		t.Fatal(err)
	}
	record(now() - 2*uint64(time.Second))
	if got := run(8080); got != skDrop {
		t.Errorf("stale record: %d, want SK_DROP", got)
	}
	if got := run(8080); got != skPass {
		t.Errorf("a stale record is removed when found: %d, want SK_PASS", got)
	}
}
