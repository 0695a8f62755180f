package bpf

import (
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// dialFromPort connects from the remote netns from a fixed source port, so
// a second connection reuses the four-tuple of the first.
func dialFromPort(t *testing.T, path string, src, dst netip.AddrPort) (reply, error) {
	netns, err := ns.GetNS(path)
	if err != nil {
		return reply{}, err
	}
	defer netns.Close()
	var out []byte
	err = netns.Do(func(ns.NetNS) error {
		d := net.Dialer{
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
		}
		c, err := d.Dial("tcp", dst.String())
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Write([]byte("D"))
		out, err = io.ReadAll(c)
		return err
	})
	if err != nil {
		return reply{}, err
	}
	return parseReply(t, string(out)), nil
}

// TestInboundTimeWaitReuse: the pod's side closes first, so its socket of
// a captured inbound connection sits in TIME_WAIT; a client that reuses
// the four-tuple (as clients with many short connections do) must get a
// new, captured connection, as it does without sidelane.
func TestInboundTimeWaitReuse(t *testing.T) {
	e := newEnv(t)
	src := netip.AddrPortFrom(remoteIP, 41234)
	dst := ap(podIP, 8080)

	// Without capture the kernel takes the SYN that finds TIME_WAIT.
	for i := 0; i < 2; i++ {
		if _, err := dialFromPort(t, "/var/run/netns/"+e.remNS, src, dst); err != nil {
			t.Fatalf("uncaptured connection %d from a reused tuple: %v", i, err)
		}
	}

	e.startSidecar()
	e.enroll(defaultSettings())
	if err := e.cap.AttachInbound(e.podPath, e.cookie, "eth0"); err != nil {
		t.Fatal(err)
	}
	src = netip.AddrPortFrom(remoteIP, 41235)
	for i := 0; i < 3; i++ {
		r, err := dialFromPort(t, "/var/run/netns/"+e.remNS, src, dst)
		if err != nil {
			c, _ := e.cap.Counters(e.cookie)
			t.Fatalf("captured connection %d from a reused tuple: %v (counters %+v)", i, err, c)
		}
		if r.peer.Addr().Unmap() != netip.MustParseAddr("127.0.0.6") {
			t.Errorf("connection %d reached the app from %s, not through the sidecar", i, r.peer)
		}
	}
}
