//go:build linux && sidelane_known_bypass

package bpf

import (
	"bufio"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// A known inbound bypass (found with issue 20's move test; the fix is in
// capture.c, which this change does not touch, so the test only builds
// with -tags sidelane_known_bypass until it is fixed): tc inbound lets a
// packet through when bpf_skc_lookup_tcp finds a non-listening socket for
// its tuple, including a TIME_WAIT one. When the pod's side closed a
// captured connection first, its accepted socket (local address: the
// original destination) lingers in TIME_WAIT, and a new SYN from the same
// client port matches it: the kernel re-opens it by looking up a listener
// for the original port, and the connection reaches the app, not the
// sidecar. Any client can do this on purpose by reusing its source port.
// Istio's REDIRECT catches it (conntrack re-opens the flow with its NAT).
// Tried: assigning such a SYN to the inbound listener from tc instead;
// the kernel then drops the new request socket as a duplicate of the
// TIME_WAIT one (inet_ehash_insert), so the client times out. A fix needs
// the listener lookup itself (an sk_lookup program in the pod netns) or
// drops such SYNs (fail closed, at the price of refusing a client that
// reuses a port within the 60 s of TIME_WAIT).
func TestInboundSYNOnTimeWaitIsCaptured(t *testing.T) {
	e := newEnv(t)
	// The inbound listener answers and closes first, so the pod keeps
	// the TIME_WAIT socket.
	pod, err := ns.GetNS(e.podPath)
	if err != nil {
		t.Fatal(err)
	}
	defer pod.Close()
	var l net.Listener
	if err := pod.Do(func(ns.NetNS) error {
		var err error
		l, err = net.Listen("tcp4", "0.0.0.0:15006")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			c.Read(make([]byte, 1)) // nothing unread, or close sends a reset
			c.Write([]byte("sidecar\n"))
			c.Close()
		}
	}()
	e.enroll(defaultSettings())
	if err := e.cap.AttachInbound(e.podPath, e.cookie, "eth0"); err != nil {
		t.Fatal(err)
	}
	rem, err := ns.GetNS("/var/run/netns/" + e.remNS)
	if err != nil {
		t.Fatal(err)
	}
	defer rem.Close()
	// Both connections from the same client port (SO_REUSEADDR: the
	// client's side of the first is closed, not in TIME_WAIT).
	dial := func() string {
		var line string
		err := rem.Do(func(ns.NetNS) error {
			d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: remoteIP.AsSlice(), Port: 40123},
				Control: func(_, _ string, c syscall.RawConn) error {
					var serr error
					err := c.Control(func(fd uintptr) {
						serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
					})
					if err != nil {
						return err
					}
					return serr
				}}
			c, err := d.Dial("tcp4", netip.AddrPortFrom(podIP, 8080).String())
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			c.Write([]byte("D"))
			line, err = bufio.NewReader(c).ReadString('\n')
			return err
		})
		if err != nil {
			return "error:" + err.Error()
		}
		return strings.TrimSpace(line)
	}
	for i := range 2 {
		got := dial()
		// The client's port is free again once its side of the first
		// connection is fully closed.
		for try := 0; strings.Contains(got, "address already in use") && try < 100; try++ {
			time.Sleep(20 * time.Millisecond)
			got = dial()
		}
		if got != "sidecar" {
			out, _ := exec.Command("ip", "netns", "exec", e.podNS, "ss", "-tan").CombinedOutput()
			t.Fatalf("connection %d from the same client port reached %q, want the sidecar's inbound listener; pod sockets:\n%s", i+1, got, out)
		}
	}
}
