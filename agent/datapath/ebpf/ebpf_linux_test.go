//go:build linux

package ebpf

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sidelane/sidelane/agent/datapath"
	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/bpf"
	"github.com/sidelane/sidelane/internal/testenv"
	"github.com/sidelane/sidelane/istio/capture"
)

var _ datapath.Datapath = (*Datapath)(nil)

// The lifecycle the agent drives: Enroll records the netns cookie and
// writes state Verify accepts; a changed setting is rejected by Verify until
// re-enrolled; Unenroll removes it; a pod not in sidecar mode is left alone.
func TestLifecycle(t *testing.T) {
	testenv.Privileged(t)
	mnt, err := bpf.CgroupV2Mount()
	if err != nil {
		t.Fatal(err)
	}
	cg := testenv.Cgroup(t, mnt, "sidelane-test-")
	c, err := bpf.Load(bpf.Config{Cgroup: cg, PinDir: filepath.Join("/sys/fs/bpf", testenv.UniqueName("sidelane-test-"))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Uninstall(); err != nil {
			t.Error(err)
		}
	})
	nsName := testenv.UniqueName("sldp")
	if out, err := exec.Command("ip", "netns", "add", nsName).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", nsName).Run() })
	if out, err := exec.Command("ip", "-n", nsName, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1").CombinedOutput(); err != nil {
		t.Fatalf("add eth0: %v: %s", err, out)
	}

	d := New(c, nil)
	ctx := context.Background()
	s := capture.Settings{OutboundPort: 15001, InboundPort: 15006, OutboundAllCIDRs: true,
		ProxyUIDs: []uint32{1337}, ExcludeOutboundPorts: []capture.PortRange{{First: 20, Last: 30}}}
	e := store.Entry{Key: store.Key{IfName: "eth0"}, Netns: "/var/run/netns/" + nsName, Mode: modeSidecar, Capture: &s,
		IPs: []netip.Prefix{netip.MustParsePrefix("10.9.0.2/24")}}
	if err := d.Enroll(ctx, &e); err != nil {
		t.Fatal(err)
	}
	want, err := bpf.NetnsCookie(e.Netns)
	if err != nil {
		t.Fatal(err)
	}
	if e.NetnsCookie != want {
		t.Fatalf("NetnsCookie = %d, want %d", e.NetnsCookie, want)
	}
	if err := d.Verify(ctx, e); err != nil {
		t.Fatalf("Verify after Enroll: %v", err)
	}
	if err := d.Enroll(ctx, &e); err != nil {
		t.Fatalf("Enroll again (idempotent): %v", err)
	}
	changed := s
	changed.ExcludeOutboundPorts = []capture.PortRange{{First: 20, Last: 31}}
	e2 := e
	e2.Capture = &changed
	if err := d.Verify(ctx, e2); err == nil {
		t.Fatal("Verify passed for settings never enrolled")
	}
	if got, _ := c.Enrolled(); len(got) != 1 || got[0] != want {
		t.Fatalf("Enrolled = %v, want [%d]", got, want)
	}
	if _, err := d.Counters(context.Background(), e); err != nil {
		t.Fatalf("Counters: %v", err)
	}
	// Reconcile keeps known pods and removes the others.
	if err := d.Reconcile(ctx, []store.Entry{e}); err != nil {
		t.Fatal(err)
	}
	if err := d.Verify(ctx, e); err != nil {
		t.Fatalf("Verify after Reconcile with the pod known: %v", err)
	}
	if err := d.Reconcile(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if err := d.Verify(ctx, e); err == nil {
		t.Fatal("Verify passed after Reconcile without the pod")
	}
	if err := d.Enroll(ctx, &e); err != nil {
		t.Fatal(err)
	}
	if err := d.Unenroll(ctx, e); err != nil {
		t.Fatal(err)
	}
	if err := d.Verify(ctx, e); err == nil {
		t.Fatal("Verify passed after Unenroll")
	}
	if got, _ := c.Enrolled(); len(got) != 0 {
		t.Fatalf("Enrolled after Unenroll = %v", got)
	}
	if err := d.Unenroll(ctx, e); err != nil {
		t.Fatalf("Unenroll again: %v", err)
	}

	bad := s
	bad.OutboundPort = 0
	e3 := store.Entry{Netns: e.Netns, Mode: modeSidecar, Capture: &bad}
	if err := d.Enroll(ctx, &e3); err == nil || e3.NetnsCookie != 0 {
		t.Fatalf("Enroll with invalid settings: err %v, cookie %d; want an error and nothing enrolled", err, e3.NetnsCookie)
	}
	none := store.Entry{Netns: e.Netns, Mode: "none"}
	if err := d.Enroll(ctx, &none); err != nil || none.NetnsCookie != 0 {
		t.Fatalf("Enroll mode none: err %v, cookie %d", err, none.NetnsCookie)
	}
	if got, _ := c.Enrolled(); len(got) != 0 {
		t.Fatalf("Enrolled = %v, want none", got)
	}
}

func TestOpenFallsBackWhenAFeatureIsMissing(t *testing.T) {
	testenv.Privileged(t)
	mnt, err := bpf.CgroupV2Mount()
	if err != nil {
		t.Fatal(err)
	}
	cg := testenv.Cgroup(t, mnt, "sidelane-test-")
	pins := filepath.Join("/sys/fs/bpf", testenv.UniqueName("sidelane-test-"))

	_, _, err = Open(Options{Cgroup: cg, PinDir: pins, ForceMissing: []string{"prog:sock_ops"}})
	if !errors.Is(err, bpf.ErrNotSupported) || !strings.Contains(err.Error(), "prog:sock_ops") {
		t.Fatalf("Open with sock_ops forced off: %v, want ErrNotSupported naming it", err)
	}
	if _, err := os.Stat(pins); err == nil {
		t.Error("a failed probe pinned something")
	}

	d, c, err := Open(Options{Cgroup: cg, PinDir: pins})
	if err != nil {
		t.Fatal(err)
	}
	if d.Name() != "ebpf" {
		t.Errorf("Name = %q", d.Name())
	}
	if err := c.Uninstall(); err != nil {
		t.Fatal(err)
	}
}

// Per-node mode through the backend: Open with a node proxy, a pod moved
// sidecar -> node -> none -> node on the same entry, Verify following each
// mode, nothing left after Unenroll. (The traffic itself is tested in
// package bpf, TestPerNodeMode.)
func TestNodeModeLifecycle(t *testing.T) {
	testenv.Privileged(t)
	mnt, err := bpf.CgroupV2Mount()
	if err != nil {
		t.Fatal(err)
	}
	cg := testenv.Cgroup(t, mnt, "sidelane-test-")
	hostNS, podNS := testenv.UniqueName("slhost"), testenv.UniqueName("sldp")
	for _, n := range []string{hostNS, podNS} {
		if out, err := exec.Command("ip", "netns", "add", n).CombinedOutput(); err != nil {
			t.Fatalf("ip netns add: %v: %s", err, out)
		}
		t.Cleanup(func() { exec.Command("ip", "netns", "del", n).Run() })
	}
	if out, err := exec.Command("ip", "-n", podNS, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1").CombinedOutput(); err != nil {
		t.Fatalf("add eth0: %v: %s", err, out)
	}
	pins := filepath.Join("/sys/fs/bpf", testenv.UniqueName("sidelane-test-"))
	if _, _, err := Open(Options{Cgroup: cg, PinDir: pins, NodeProxy: &NodeProxyOptions{HostNetns: "/var/run/netns/" + hostNS}}); err == nil ||
		!strings.Contains(err.Error(), "at least one address") {
		t.Fatalf("Open with a node proxy without address: %v, want an error naming it", err)
	}
	if _, err := os.Stat(pins); err == nil {
		t.Fatal("Open with bad node proxy settings pinned something")
	}
	d, c, err := Open(Options{Cgroup: cg, PinDir: pins, NodeProxy: &NodeProxyOptions{
		IPv4: netip.MustParseAddr("10.9.0.1"), InboundPort: 15106, HostNetns: "/var/run/netns/" + hostNS}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Uninstall(); err != nil {
			t.Error(err)
		}
	})
	ctx := context.Background()
	s := capture.Settings{OutboundPort: 15001, InboundPort: 15006, OutboundAllCIDRs: true, InboundAllPorts: true,
		ProxyUIDs: []uint32{1337}}
	e := store.Entry{Key: store.Key{IfName: "eth0"}, Netns: "/var/run/netns/" + podNS, Mode: modeSidecar, Capture: &s,
		IPs: []netip.Prefix{netip.MustParsePrefix("10.9.0.2/24")}}
	for _, mode := range []string{modeSidecar, modeNode, "none", modeNode} {
		e.Mode = mode
		if err := d.Enroll(ctx, &e); err != nil {
			t.Fatalf("Enroll %s: %v", mode, err)
		}
		if err := d.Verify(ctx, e); err != nil {
			t.Fatalf("Verify %s: %v", mode, err)
		}
		got, _ := c.Enrolled()
		if enrolled := len(got) == 1; enrolled != (mode != "none") {
			t.Fatalf("mode %s: enrolled %v", mode, got)
		}
		if mode != "none" {
			// The other mode's state is not what is in the maps.
			other := e
			other.Mode = map[string]string{modeSidecar: modeNode, modeNode: modeSidecar}[mode]
			if err := d.Verify(ctx, other); err == nil {
				t.Errorf("mode %s: Verify passed for mode %s", mode, other.Mode)
			}
			if err := c.VerifyInbound(e.NetnsCookie, "eth0"); err != nil {
				t.Errorf("mode %s: %v", mode, err)
			}
		}
	}
	if _, err := d.NodeCounters(); err != nil {
		t.Fatal(err)
	}
	if err := d.Unenroll(ctx, e); err != nil {
		t.Fatal(err)
	}
	if got, _ := c.Enrolled(); len(got) != 0 {
		t.Fatalf("Enrolled after Unenroll = %v", got)
	}
}
