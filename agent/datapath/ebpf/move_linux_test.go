//go:build linux

package ebpf

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/sidelane/sidelane/agent"
	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/bpf"
	"github.com/sidelane/sidelane/internal/testenv"
	"github.com/sidelane/sidelane/istio/capture"
)

const helperEnv = "SIDELANE_EBPFTEST_HELPER"

func TestMain(m *testing.M) {
	// Plain TCP listeners, as Envoy's: an MPTCP listener (Go's default)
	// cannot join the sockhash sidecar pods' sk_lookup capture takes the
	// proxy's listener from.
	os.Setenv("GODEBUG", "multipathtcp=0")
	if os.Getenv(helperEnv) == "connectloop" {
		os.Exit(connectLoop(os.Args[len(os.Args)-1]))
	}
	os.Exit(m.Run())
}

// connectLoop is the pod's application: a separate process, born into the
// test cgroup inside the pod netns. It connects to addr over and over until
// its stdin closes, and prints one line per connection: the epoch (how
// many bytes it had read from stdin when the connect began: the test
// writes one after each move) and what answered, i.e. the tag the
// listener wrote, "refused", or "error:...".
func connectLoop(addr string) int {
	var epoch atomic.Int64
	done := make(chan struct{})
	go func() {
		b := make([]byte, 1)
		for {
			if _, err := os.Stdin.Read(b); err != nil {
				close(done)
				return
			}
			epoch.Add(1)
		}
	}()
	for {
		select {
		case <-done:
			return 0
		default:
		}
		ep := epoch.Load()
		fmt.Printf("%d %s\n", ep, dialTag("tcp4", nil, addr))
	}
}

// dialTag connects to addr (from local, if set) and returns the line the
// listener answered with, "refused" (ECONNREFUSED, or EPERM from a
// cgroup program failing closed) or "error:...".
func dialTag(network string, local net.Addr, addr string) string {
	d := net.Dialer{Timeout: 10 * time.Second, LocalAddr: local}
	c, err := d.Dial(network, addr)
	if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EPERM) {
		return "refused"
	}
	if err != nil {
		return "error:" + strings.ReplaceAll(err.Error(), " ", "_")
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "error:read_" + strings.ReplaceAll(err.Error(), " ", "_")
	}
	return strings.TrimSpace(line)
}

// serveTag answers every connection on l with tag and closes it once the
// client has: the client closes first, so the TIME_WAIT socket is the
// client's and a later connection reusing its port never meets one on
// the listener's side (where a SYN matching it would bypass inbound
// capture; see the report of issue 20).
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

type tagged struct {
	epoch int
	tag   string
}

// The move topology: a "host" netns (the node; node proxy at moveGW:15001,
// the app's real destination moveDst:8080 on its loopback) and a "pod"
// netns on a veth (moveIP), with the pod's own sidecar listeners
// (127.0.0.1:15001 outbound, 15006 inbound), the node proxy's in-pod
// inbound listener (15106) and the app (8080). Every listener answers
// with its own tag.
var (
	moveGW  = netip.MustParseAddr("10.212.0.1")
	moveIP  = netip.MustParseAddr("10.212.0.2")
	moveDst = netip.MustParseAddr("10.213.0.50")
)

const moveNodeInbound = 15106

// TestLiveMovesNeverUncapture moves one running pod 100 times between
// sidecar and per-node mode and between capture settings, through
// agent.SetMode on the real eBPF datapath, while the pod's application
// connects out in a loop and a client on the node connects in in a loop.
// No connection may reach its destination uncaptured: outbound, every
// connect reaches the sidecar's or the node proxy's listener (or is
// refused); inbound, the sidecar's or the node proxy's in-pod listener.
// A connection begun after a move returned must see the new mode. The
// pod's tc inbound link stays the same link throughout (updated in place,
// never detached and attached again).
func TestLiveMovesNeverUncapture(t *testing.T) {
	testenv.Privileged(t)
	mnt, err := bpf.CgroupV2Mount()
	if err != nil {
		t.Fatal(err)
	}
	cg := testenv.Cgroup(t, mnt, "sidelane-test-")
	cgfd, err := unix.Open(cg, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(cgfd) })
	hostNS, podNS := testenv.UniqueName("slmvh"), testenv.UniqueName("slmvp")
	for _, n := range []string{hostNS, podNS} {
		if out, err := exec.Command("ip", "netns", "add", n).CombinedOutput(); err != nil {
			t.Fatalf("ip netns add: %v: %s", err, out)
		}
		t.Cleanup(func() { exec.Command("ip", "netns", "del", n).Run() })
	}
	hostPath, podPath := "/var/run/netns/"+hostNS, "/var/run/netns/"+podNS
	for _, c := range [][]string{
		{"ip", "-n", hostNS, "link", "set", "lo", "up"},
		{"ip", "-n", hostNS, "addr", "add", moveDst.String() + "/32", "dev", "lo"},
		{"ip", "-n", hostNS, "link", "add", "vh", "type", "veth", "peer", "name", "eth0", "netns", podNS},
		{"ip", "-n", hostNS, "addr", "add", moveGW.String() + "/24", "dev", "vh"},
		{"ip", "-n", hostNS, "link", "set", "vh", "up"},
		{"ip", "-n", podNS, "link", "set", "lo", "up"},
		{"ip", "-n", podNS, "addr", "add", moveIP.String() + "/24", "dev", "eth0"},
		{"ip", "-n", podNS, "link", "set", "eth0", "up"},
		{"ip", "-n", podNS, "route", "add", "default", "via", moveGW.String()},
	} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v: %s", c, err, out)
		}
	}
	for _, l := range []struct {
		netns, addr, tag string
	}{
		{hostPath, netip.AddrPortFrom(moveGW, 15001).String(), "node-out"},
		{hostPath, netip.AddrPortFrom(moveDst, 8080).String(), "direct-out"},
		{podPath, "127.0.0.1:15001", "sidecar-out"},
		{podPath, "0.0.0.0:15006", "sidecar-in"},
		{podPath, "0.0.0.0:" + strconv.Itoa(moveNodeInbound), "node-in"},
		{podPath, "0.0.0.0:8080", "direct-in"},
	} {
		var ln net.Listener
		if err := ns.WithNetNSPath(l.netns, func(ns.NetNS) error {
			var err error
			ln, err = net.Listen("tcp4", l.addr)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go serveTag(ln, l.tag)
	}

	pins := filepath.Join("/sys/fs/bpf", testenv.UniqueName("sidelane-test-"))
	d, c, err := Open(Options{Cgroup: cg, PinDir: pins, NodeProxy: &NodeProxyOptions{
		IPv4: moveGW, InboundPort: moveNodeInbound, HostNetns: hostPath}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Uninstall(); err != nil {
			t.Error(err)
		}
	})
	dir := t.TempDir()
	a, err := agent.New(agent.Config{Socket: filepath.Join(dir, "s.sock"), StateDir: dir, Datapath: d,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}

	base := capture.Settings{OutboundPort: 15001, InboundPort: 15006, OutboundAllCIDRs: true, InboundAllPorts: true,
		ProxyUIDs: []uint32{1337}, ProxyGIDs: []uint32{1337},
		ExcludeInboundPorts: []capture.PortRange{{First: 15020, Last: 15021}}}
	excl := base
	excl.ExcludeOutboundPorts = []capture.PortRange{{First: 9000, Last: 9100}}
	excl.ExcludeOutboundCIDRs = []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
	more := base
	more.ProxyUIDs = []uint32{1337, 1400}
	more.ExcludeInboundPorts = []capture.PortRange{{First: 9999, Last: 9999}, {First: 15020, Last: 15021}}
	nodeExcl := capture.Settings{ExcludeOutboundPorts: []capture.PortRange{{First: 9000, Last: 9100}}}
	steps := []agent.Decision{
		{Mode: agent.ModeNode, Reason: "node"},
		{Mode: agent.ModeSidecar, Reason: "base", Capture: &base},
		{Mode: agent.ModeSidecar, Reason: "excl", Capture: &excl},
		{Mode: agent.ModeNode, Reason: "node excl", Capture: &nodeExcl},
		{Mode: agent.ModeNode, Reason: "node"},
		{Mode: agent.ModeSidecar, Reason: "more", Capture: &more},
	}
	ctx := context.Background()
	k := store.Key{Network: "t", ContainerID: "c", IfName: "eth0"}
	e := store.Entry{Key: k, Netns: podPath, Mode: agent.ModeSidecar, Reason: "more", Capture: &more,
		IPs: []netip.Prefix{netip.PrefixFrom(moveIP, 24)}}
	if err := d.Enroll(ctx, &e); err != nil {
		t.Fatal(err)
	}
	if err := a.Store().Put(e); err != nil {
		t.Fatal(err)
	}
	tcLinks := func() []link.ID {
		t.Helper()
		var progs []link.AttachedProgram
		if err := ns.WithNetNSPath(podPath, func(ns.NetNS) error {
			iface, err := net.InterfaceByName("eth0")
			if err != nil {
				return err
			}
			res, err := link.QueryPrograms(link.QueryOptions{Target: iface.Index, Attach: ebpf.AttachTCXIngress})
			if err != nil {
				return err
			}
			progs = res.Programs
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		var ids []link.ID
		for _, p := range progs {
			id, ok := p.LinkID()
			if !ok {
				t.Fatal("tc ingress program has no link")
			}
			ids = append(ids, id)
		}
		return ids
	}
	// A sidecar pod is captured by sk_lookup, no tc; from its first move
	// to per-node mode on, by one tc link that is never replaced (a move
	// back to sidecar mode keeps it: same decisions).
	if ids := tcLinks(); len(ids) != 0 {
		t.Fatalf("sidecar pod: %d programs on its tc ingress, want none (sk_lookup capture)", len(ids))
	}
	var link0 link.ID

	// The outbound loop: the app in the pod.
	app := exec.Command("ip", "netns", "exec", podNS, os.Args[0], "-test.run=^$", netip.AddrPortFrom(moveDst, 8080).String())
	app.Env = append(os.Environ(), helperEnv+"=connectloop")
	app.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cgfd}
	app.Stderr = os.Stderr
	epochs, err := app.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	appOut, err := app.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := app.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { app.Process.Kill(); app.Wait() })
	out := make(chan tagged, 1024)
	go func() {
		defer close(out)
		sc := bufio.NewScanner(appOut)
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) != 2 {
				continue
			}
			ep, _ := strconv.Atoi(f[0])
			out <- tagged{ep, f[1]}
		}
	}()

	// The inbound loop: a client on the node (not the node proxy's
	// address, whose connections per-node capture lets through).
	var inEpoch atomic.Int64
	in := make(chan tagged, 1024)
	inCtx, stopIn := context.WithCancel(ctx)
	t.Cleanup(stopIn)
	var inWG sync.WaitGroup
	inWG.Add(1)
	go func() {
		defer inWG.Done()
		defer close(in)
		err := ns.WithNetNSPath(hostPath, func(ns.NetNS) error {
			for inCtx.Err() == nil {
				ep := inEpoch.Load()
				r := tagged{int(ep), dialTag("tcp4", &net.TCPAddr{IP: moveDst.AsSlice()}, netip.AddrPortFrom(moveIP, 8080).String())}
				select {
				case in <- r:
				case <-inCtx.Done():
				}
			}
			return nil
		})
		if err != nil {
			in <- tagged{-1, "error:" + err.Error()}
		}
	}()

	// modeAt is the mode in force for a connection of epoch ep (begun
	// after move ep returned).
	modeAt := func(ep int) string {
		if ep == 0 {
			return agent.ModeSidecar
		}
		return steps[(ep-1)%len(steps)].Mode
	}
	var total, direct, wrongMode, errs int
	counts := map[string]int{}
	// check judges one connection: never direct, never failed, and when
	// strict (it began after its move returned and ended before the next
	// one began) in the mode of its epoch.
	check := func(dir string, r tagged, strict bool) {
		total++
		counts[dir+" "+r.tag]++
		switch {
		case strings.HasPrefix(r.tag, "direct"):
			direct++
			if direct <= 10 {
				t.Errorf("%s connection of epoch %d reached the app directly (uncaptured)", dir, r.epoch)
			}
		case strings.HasPrefix(r.tag, "error"):
			errs++
			if errs <= 10 {
				t.Errorf("%s connection of epoch %d: %s", dir, r.epoch, r.tag)
			}
		case strict && r.tag != "refused" && !strings.HasPrefix(r.tag, modeAt(r.epoch)+"-"):
			wrongMode++
			if wrongMode <= 10 {
				t.Errorf("%s connection begun in %s mode (epoch %d) went to %s", dir, modeAt(r.epoch), r.epoch, r.tag)
			}
		}
	}
	// waitEpoch judges results until the first one of epoch ep, which is
	// judged strictly: the next move waits for it. Earlier epochs' late
	// results may have begun before the move returned.
	waitEpoch := func(dir string, ch <-chan tagged, ep int) {
		for r := range ch {
			check(dir, r, r.epoch == ep)
			if r.epoch >= ep {
				return
			}
		}
		t.Fatalf("%s loop ended before epoch %d", dir, ep)
	}
	const moves = 100
	relinked := 0
	waitEpoch("outbound", out, 0)
	waitEpoch("inbound", in, 0)
	for i := 1; i <= moves; i++ {
		dec := steps[(i-1)%len(steps)]
		if _, changed, err := a.SetMode(ctx, k, dec); err != nil || !changed {
			t.Fatalf("move %d to %s (%s): changed %v, %v", i, dec.Mode, dec.Reason, changed, err)
		}
		switch ids := tcLinks(); {
		case dec.Mode != agent.ModeNode && link0 == 0:
			if len(ids) != 0 {
				t.Fatalf("move %d to sidecar mode, never per-node before: %d tc programs, want none", i, len(ids))
			}
		case len(ids) != 1:
			t.Fatalf("move %d to %s mode: %d programs on the pod's tc ingress, want 1", i, dec.Mode, len(ids))
		case link0 == 0:
			link0 = ids[0]
		case ids[0] != link0:
			relinked++
			if relinked == 1 {
				t.Errorf("move %d: the tc inbound link is %d, was %d: detached and attached again", i, ids[0], link0)
			}
			link0 = ids[0]
		}
		if _, err := epochs.Write([]byte{1}); err != nil {
			t.Fatal(err)
		}
		inEpoch.Store(int64(i))
		waitEpoch("outbound", out, i)
		waitEpoch("inbound", in, i)
	}
	epochs.Close()
	stopIn()
	for r := range out {
		check("outbound", r, false)
	}
	for r := range in {
		check("inbound", r, false)
	}
	inWG.Wait()
	if err := app.Wait(); err != nil {
		t.Errorf("connect loop: %v", err)
	}
	t.Logf("%d connections during %d moves: %v", total, moves, counts)
	if direct > 0 || wrongMode > 0 || errs > 0 || relinked > 0 {
		t.Fatalf("%d uncaptured, %d in the wrong mode, %d failed, of %d connections; inbound link replaced in %d moves",
			direct, wrongMode, errs, total, relinked)
	}
	st, _ := a.Store().Get(k)
	if err := d.Verify(ctx, st); err != nil {
		t.Fatalf("Verify the stored entry after the moves: %v", err)
	}
}
