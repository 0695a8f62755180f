//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/sidelane/sidelane/internal/testenv"
)

// podNetns is a netns made for attach tests: a veth pair eth0/peer0 inside it, eth0 up.
type podNetns struct {
	path   string
	cookie uint64
}

// newAttachNode loads the capture (its own cgroup subtree and pin dir,
// uninstalled at cleanup) and makes n pod netns.
func newAttachNode(tb testing.TB, n int) (*Capture, []podNetns) {
	tb.Helper()
	testenv.Privileged(tb)
	mnt, err := CgroupV2Mount()
	if err != nil {
		tb.Fatal(err)
	}
	cg := testenv.Cgroup(tb, mnt, "sidelane-test-")
	c, err := Load(Config{Cgroup: cg, PinDir: testPinDir(tb)})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := c.Uninstall(); err != nil {
			tb.Errorf("uninstall: %v", err)
		}
	})
	pods := make([]podNetns, n)
	for i := range pods {
		name := testenv.UniqueName("slat")
		for _, args := range [][]string{
			{"netns", "add", name},
			{"-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"},
			{"-n", name, "link", "set", "eth0", "up"},
		} {
			if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
				tb.Fatalf("ip %v: %v: %s", args, err, out)
			}
			if args[0] == "netns" {
				tb.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
			}
		}
		pods[i].path = "/var/run/netns/" + name
		if pods[i].cookie, err = NetnsCookie(pods[i].path); err != nil {
			tb.Fatal(err)
		}
	}
	return c, pods
}

// attachPhases is where one attach's time goes.
type attachPhases struct {
	lockWait, twAttach, twPin, nsOpen, nsEnter, ifLookup, tcAttach, tcPin, total time.Duration
}

func (p *attachPhases) add(q attachPhases) {
	p.lockWait += q.lockWait
	p.twAttach += q.twAttach
	p.twPin += q.twPin
	p.nsOpen += q.nsOpen
	p.nsEnter += q.nsEnter
	p.ifLookup += q.ifLookup
	p.tcAttach += q.tcAttach
	p.tcPin += q.tcPin
	p.total += q.total
}

// timedAttach does what attachInbound does for a pod with nothing
// attached yet, step by step with a clock: with mu (the single lock the
// attach used to hold) taken first when not nil, and with legacy tc
// (clsact qdisc + direct-action cls_bpf filter, nothing pinned) instead
// of a pinned tcx link when legacy is set.
func timedAttach(c *Capture, mu sync.Locker, p podNetns, legacy bool) (attachPhases, error) {
	var ph attachPhases
	start := time.Now()
	t := start
	lap := func(d *time.Duration) { now := time.Now(); *d = now.Sub(t); t = now }
	if mu != nil {
		mu.Lock()
		defer mu.Unlock()
	}
	lap(&ph.lockWait)
	f, err := os.Open(p.path)
	if err != nil {
		return ph, err
	}
	tw, err := link.AttachNetNs(int(f.Fd()), c.objs.SidelaneTwLookup)
	f.Close()
	if err != nil {
		return ph, err
	}
	defer tw.Close()
	lap(&ph.twAttach)
	if err := tw.Pin(c.twLookupPin(p.cookie)); err != nil {
		return ph, err
	}
	lap(&ph.twPin)
	target, err := ns.GetNS(p.path)
	if err != nil {
		return ph, err
	}
	defer target.Close()
	lap(&ph.nsOpen)
	err = target.Do(func(ns.NetNS) error {
		lap(&ph.nsEnter)
		iface, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		lap(&ph.ifLookup)
		if legacy {
			if err := netlink.QdiscAdd(&netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{
				LinkIndex: iface.Index, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT,
			}, QdiscType: "clsact"}); err != nil {
				return fmt.Errorf("add clsact: %w", err)
			}
			if err := netlink.FilterAdd(&netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{
				LinkIndex: iface.Index, Parent: netlink.HANDLE_MIN_INGRESS, Handle: 1, Protocol: unix.ETH_P_ALL, Priority: 1,
			}, Fd: c.objs.SidelaneInbound.FD(), Name: "sidelane_inbound", DirectAction: true}); err != nil {
				return fmt.Errorf("add cls_bpf: %w", err)
			}
			lap(&ph.tcAttach)
			return nil
		}
		l, err := link.AttachTCX(link.TCXOptions{Interface: iface.Index, Program: c.objs.SidelaneInbound, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return err
		}
		defer l.Close()
		lap(&ph.tcAttach)
		if err := l.Pin(c.inboundPin(p.cookie, "eth0")); err != nil {
			l.Detach()
			return err
		}
		lap(&ph.tcPin)
		return nil
	})
	ph.total = time.Since(start)
	return ph, err
}

// undoTimedAttach removes what timedAttach put on p.
func undoTimedAttach(c *Capture, p podNetns, legacy bool) error {
	if !legacy {
		return c.detachInbound(p.cookie)
	}
	target, err := ns.GetNS(p.path)
	if err != nil {
		return err
	}
	defer target.Close()
	return errors.Join(c.detachInbound(p.cookie), target.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		return netlink.QdiscDel(&netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: l.Attrs().Index, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT,
		}, QdiscType: "clsact"})
	}))
}

// BenchmarkAttachCost measures one pod attach step by step (see
// timedAttach), each b.N iteration attaching every one of 16 pod netns,
// one at a time or all at once, then removing it all (untimed):
//
//	go test ./bpf/ -run XXX -bench AttachCost -benchtime 5x
//
// Variants: "locked" takes one lock around each attach (as AttachInbound
// did), "tcx" does not, "legacy" attaches with tc's clsact + cls_bpf
// instead of tcx, "AttachInbound" is the real call (total and wall
// only) for a netns without a sidecar config (tc, as per-node pods),
// "AttachInbound-sidecar" for enrolled sidecar pods (sk_lookup, no tc). Every phase is reported as ms per attach (the sum over
// attaches divided by their number), wall_ms as the iteration's wall
// time divided by the number of attaches.
func BenchmarkAttachCost(b *testing.B) {
	const pods = 16
	c, nss := newAttachNode(b, pods)
	for _, par := range []int{1, pods} {
		for _, v := range []struct {
			name                          string
			locked, legacy, real, sidecar bool
		}{
			{"locked", true, false, false, false}, {"tcx", false, false, false, false}, {"legacy", false, true, false, false},
			{"AttachInbound", false, false, true, false}, {"AttachInbound-sidecar", false, false, true, true},
		} {
			b.Run(fmt.Sprintf("%s/par%d", v.name, par), func(b *testing.B) {
				if v.sidecar {
					// Enrolled sidecar pods: sk_lookup capture, no tc.
					for _, p := range nss {
						if err := c.Put(p.cookie, mustPlan(b)); err != nil {
							b.Fatal(err)
						}
					}
					defer func() {
						for _, p := range nss {
							if err := c.Delete(p.cookie); err != nil {
								b.Error(err)
							}
						}
					}()
				}
				var mu sync.Locker
				if v.locked {
					mu = &sync.Mutex{}
				}
				var sum attachPhases
				var wall time.Duration
				n := 0
				for b.Loop() {
					start := time.Now()
					phs := make([]attachPhases, pods)
					errs := make([]error, pods)
					var wg sync.WaitGroup
					sem := make(chan struct{}, par)
					for i, p := range nss {
						wg.Go(func() {
							sem <- struct{}{}
							defer func() { <-sem }()
							if v.real {
								start := time.Now()
								errs[i] = c.AttachInbound(p.path, p.cookie, "eth0")
								phs[i].total = time.Since(start)
								return
							}
							phs[i], errs[i] = timedAttach(c, mu, p, v.legacy)
						})
					}
					wg.Wait()
					wall += time.Since(start)
					b.StopTimer()
					for i, p := range nss {
						if errs[i] != nil {
							b.Fatal(errs[i])
						}
						sum.add(phs[i])
						n++
						if err := undoTimedAttach(c, p, v.legacy); err != nil {
							b.Fatal(err)
						}
					}
					b.StartTimer()
				}
				ms := func(d time.Duration) float64 { return float64(d) / float64(n) / 1e6 }
				b.ReportMetric(ms(wall), "wall_ms")
				b.ReportMetric(ms(sum.total), "total_ms")
				b.ReportMetric(ms(sum.lockWait), "lockwait_ms")
				b.ReportMetric(ms(sum.twAttach), "netns_attach_ms")
				b.ReportMetric(ms(sum.twPin), "netns_pin_ms")
				b.ReportMetric(ms(sum.nsOpen), "ns_open_ms")
				b.ReportMetric(ms(sum.nsEnter), "ns_enter_ms")
				b.ReportMetric(ms(sum.ifLookup), "iflookup_ms")
				b.ReportMetric(ms(sum.tcAttach), "tc_attach_ms")
				b.ReportMetric(ms(sum.tcPin), "tc_pin_ms")
				b.ReportMetric(0, "ns/op")
			})
		}
	}
}
