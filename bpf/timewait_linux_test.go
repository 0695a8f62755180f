//go:build linux

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

// An inbound bypass found with issue 20's move test: tc used to let a
// packet through whenever bpf_skc_lookup_tcp found a non-listening socket
// for its tuple, a TIME_WAIT one included. When the pod's side closed a
// captured connection first, its accepted socket (local address: the
// original destination) lingers in TIME_WAIT, and a new SYN from the same
// client port matched it: the kernel re-opened it through the listener for
// the original port, the app's, not the sidecar's. Any client can do this
// on purpose by reusing its source port. Now such a SYN is handed to the
// inbound listener like any new connection; the kernel then refuses the
// new request as a duplicate of the TIME_WAIT socket (inet_ehash_insert),
// so the client gets no connection until TIME_WAIT ends (fail closed; Istio's
// REDIRECT would serve it through conntrack). Never the app.
func TestInboundSYNOnTimeWaitNeverReachesApp(t *testing.T) {
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
		// The first connection reaches the sidecar; the second one, on the
		// pod-side TIME_WAIT socket, the sidecar or nothing.
		if got != "sidecar" && (i == 0 || !strings.HasPrefix(got, "error:")) {
			out, _ := exec.Command("ip", "netns", "exec", e.podNS, "ss", "-tan").CombinedOutput()
			t.Fatalf("connection %d from the same client port reached %q, want the sidecar's inbound listener (or, for the second, no connection); pod sockets:\n%s", i+1, got, out)
		}
	}
}
