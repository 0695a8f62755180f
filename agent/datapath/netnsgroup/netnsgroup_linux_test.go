//go:build linux

package netnsgroup

import (
	"context"
	"net/netip"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/sidelane/sidelane/agent/datapath/ebpf"
	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/bpf"
	"github.com/sidelane/sidelane/internal/testenv"
	"github.com/sidelane/sidelane/istio/capture"
)

// TestEBPFTwoAttachments runs the real eBPF backend (maps keyed by netns
// cookie) under the wrapper: two attachments of one netns, as Multus makes
// them, stay enrolled with both addresses until the last one goes. Without
// the wrapper the second Enroll drops the first's address (Verify of eth0
// fails) and the first Unenroll removes the netns.
func TestEBPFTwoAttachments(t *testing.T) {
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
	nsName := testenv.UniqueName("slmn")
	if out, err := exec.Command("ip", "netns", "add", nsName).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", nsName).Run() })
	for _, pair := range [][2]string{{"eth0", "peer0"}, {"net1", "peer1"}} {
		if out, err := exec.Command("ip", "-n", nsName, "link", "add", pair[0], "type", "veth", "peer", "name", pair[1]).CombinedOutput(); err != nil {
			t.Fatalf("add %s: %v: %s", pair[0], err, out)
		}
	}

	s := capture.Defaults()
	mk := func(network, ifname, ip string) store.Entry {
		return store.Entry{Key: store.Key{Network: network, ContainerID: "sb", IfName: ifname}, Netns: "/var/run/netns/" + nsName,
			Mode: "sidecar", Capture: &s, IPs: []netip.Prefix{netip.MustParsePrefix(ip)}}
	}
	recorded := map[store.Key]store.Entry{}
	d := New(ebpf.New(c, nil), func(containerID string) []store.Entry {
		var out []store.Entry
		for _, e := range recorded {
			if e.ContainerID == containerID {
				out = append(out, e)
			}
		}
		return out
	})
	ctx := context.Background()
	for _, e := range []store.Entry{mk("k8s", "eth0", "10.9.0.2/24"), mk("macvlan", "net1", "192.168.9.2/24")} {
		if err := d.Enroll(ctx, &e); err != nil {
			t.Fatalf("enroll %s: %v", e.IfName, err)
		}
		recorded[e.Key] = e
	}
	for _, e := range recorded {
		if err := d.Verify(ctx, e); err != nil {
			t.Errorf("verify %s after both ADDs: %v", e.IfName, err)
		}
		// The backend alone, for this attachment only: its address must
		// be in the maps too.
		if err := d.inner.Verify(ctx, e); err != nil {
			t.Errorf("backend verify of %s alone: %v", e.IfName, err)
		}
	}
	net1 := recorded[store.Key{Network: "macvlan", ContainerID: "sb", IfName: "net1"}]
	if err := d.Unenroll(ctx, net1); err != nil {
		t.Fatal(err)
	}
	delete(recorded, net1.Key)
	eth0 := recorded[store.Key{Network: "k8s", ContainerID: "sb", IfName: "eth0"}]
	if err := d.Verify(ctx, eth0); err != nil {
		t.Errorf("verify eth0 after net1 went: %v", err)
	}
	if got, _ := c.Enrolled(); len(got) != 1 || got[0] != eth0.NetnsCookie {
		t.Errorf("enrolled netns after net1 went: %v, want [%d]", got, eth0.NetnsCookie)
	}
	if err := d.Unenroll(ctx, eth0); err != nil {
		t.Fatal(err)
	}
	if got, _ := c.Enrolled(); len(got) != 0 {
		t.Errorf("enrolled netns after the last attachment: %v", got)
	}
}
