//go:build linux

package nftables

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/internal/podnet"
	"github.com/sidelane/sidelane/internal/testenv"
	"github.com/sidelane/sidelane/istio/capture"
)

// serveTag answers every connection on l with tag, closing once the
// client has.
func serveTag(l net.Listener, tag string) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			c.Write([]byte(tag + "\n"))
			c.SetReadDeadline(time.Now().Add(30 * time.Second))
			io.Copy(io.Discard, c)
		}()
	}
}

// dialTag connects to addr and returns the line the listener answered
// with, "refused" or "error:...".
func dialTag(addr netip.AddrPort) string {
	c, err := net.DialTimeout("tcp", addr.String(), 10*time.Second)
	if errors.Is(err, syscall.ECONNREFUSED) {
		return "refused"
	}
	if err != nil {
		return "error:" + err.Error()
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "error:read " + err.Error()
	}
	return strings.TrimSpace(line)
}

// connectLoop dials addr from inside ns until stop closes, sending each
// answer to out (closed at the end).
func connectLoop(ns *podnet.NS, addr netip.AddrPort, stop <-chan struct{}, out chan<- string) {
	defer close(out)
	err := ns.Do(func() error {
		for {
			select {
			case <-stop:
				return nil
			default:
			}
			out <- dialTag(addr)
		}
	})
	if err != nil {
		out <- "error:" + err.Error()
	}
}

func moveSettings() (base, excl, dns capture.Settings) {
	base = capture.Defaults()
	excl = capture.Defaults()
	excl.ExcludeOutboundPorts = append(excl.ExcludeOutboundPorts, capture.PortRange{First: 9000, Last: 9100})
	excl.ExcludeOutboundCIDRs = []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
	excl.ExcludeInboundPorts = append(excl.ExcludeInboundPorts, capture.PortRange{First: 9999, Last: 9999})
	dns = capture.Defaults()
	dns.DNSCapture = true
	dns.ProxyUIDs = []uint32{1337, 1400}
	dns.DropInvalid = true // the mangle table comes and goes too
	return base, excl, dns
}

// TestMoveNeverUncaptures changes a sidecar pod's capture settings 30
// times with Move (tables and chains added and dropped, the raw table and its DNS zones
// coming and going) while the test connects out of the pod and into it
// in loops: every connection reaches the sidecar's listeners, none the
// destination or the app directly, and after each move the tables are
// exactly the new settings'.
func TestMoveNeverUncaptures(t *testing.T) {
	testenv.Privileged(t)
	n := podnet.New(t)
	pod, peer := n.Add("nfm"), n.Add("nfp")
	go serveTag(pod.Listen(t, "tcp4", "0.0.0.0:15001"), "sidecar-out")
	go serveTag(pod.Listen(t, "tcp4", "0.0.0.0:15006"), "sidecar-in")
	go serveTag(pod.Listen(t, "tcp4", "0.0.0.0:8080"), "direct-in")
	go serveTag(peer.Listen(t, "tcp4", "0.0.0.0:8080"), "direct-out")

	b := New(nil)
	ctx := context.Background()
	base, excl, dns := moveSettings()
	steps := []*capture.Settings{&excl, &dns, &base}
	cur := store.Entry{Key: store.Key{Network: "t", ContainerID: pod.Name, IfName: "eth0"}, Netns: pod.Path,
		IPs: []netip.Prefix{netip.PrefixFrom(pod.IP4, 24)}, Mode: modeSidecar, Capture: &base}
	if err := b.Enroll(ctx, &cur); err != nil {
		t.Fatal(err)
	}

	stop := make(chan struct{})
	out, in := make(chan string, 1024), make(chan string, 1024)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); connectLoop(pod, netip.AddrPortFrom(peer.IP4, 8080), stop, out) }()
	go func() { defer wg.Done(); connectLoop(peer, netip.AddrPortFrom(pod.IP4, 8080), stop, in) }()
	counts := map[string]int{}
	bad := 0
	judge := func(dir, tag string) {
		counts[dir+" "+tag]++
		if !strings.HasPrefix(tag, "sidecar-") {
			bad++
			if bad <= 10 {
				t.Errorf("%s connection went to %s", dir, tag)
			}
		}
	}
	// next judges the results so far and waits for one more on each
	// loop, so every move overlaps connects in both directions.
	next := func() {
		for _, l := range []struct {
			dir string
			ch  chan string
		}{{"outbound", out}, {"inbound", in}} {
			judge(l.dir, <-l.ch)
			for len(l.ch) > 0 {
				judge(l.dir, <-l.ch)
			}
		}
	}
	next()
	const moves = 30
	for i := range moves {
		e := cur
		e.Capture = steps[i%len(steps)]
		if err := b.Move(ctx, cur, &e); err != nil {
			t.Fatalf("move %d: %v", i, err)
		}
		if err := b.Verify(ctx, e); err != nil {
			t.Fatalf("move %d: %v", i, err)
		}
		cur = e
		next()
	}
	close(stop)
	for tag := range out {
		judge("outbound", tag)
	}
	for tag := range in {
		judge("inbound", tag)
	}
	wg.Wait()
	t.Logf("%d moves: %v", moves, counts)
	if bad > 0 {
		t.Fatalf("%d connections not captured by the sidecar during %d moves", bad, moves)
	}
}

// TestMoveFailureKeepsOldRules: a move whose new rules iptables rejects
// (an interface name too long for Linux; the parser would never produce
// it) fails and leaves the old rules exactly as they were, still
