//go:build linux

package ebpf

import (
	"context"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/bpf"
	"github.com/sidelane/sidelane/internal/testenv"
	"github.com/sidelane/sidelane/istio/capture"
)

// A pod's netns that disappears while it is being enrolled (the sandbox
// was torn down): Enroll fails with an error naming the netns and leaves
// nothing in the maps or the pin dir, before or after the cookie was read.
func TestEnrollNetnsGone(t *testing.T) {
	testenv.Privileged(t)
	mnt, err := bpf.CgroupV2Mount()
	if err != nil {
		t.Fatal(err)
	}
	pinDir := filepath.Join("/sys/fs/bpf", testenv.UniqueName("sidelane-test-"))
	c, err := bpf.Load(bpf.Config{Cgroup: testenv.Cgroup(t, mnt, "sidelane-test-"), PinDir: pinDir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Uninstall(); err != nil {
			t.Error(err)
		}
	})
	pins := func() []string {
		ents, _ := os.ReadDir(pinDir)
		var out []string
		for _, e := range ents {
			out = append(out, e.Name())
		}
		return out
	}
	before := pins()
	for _, tt := range []struct {
		name       string
		afterCooke bool // the netns goes after its cookie was read (between Put and the tc attach)
	}{{"gone before the cookie is read", false}, {"gone after the cookie is read", true}} {
		t.Run(tt.name, func(t *testing.T) {
			nsName := testenv.UniqueName("sldp")
			if out, err := exec.Command("ip", "netns", "add", nsName).CombinedOutput(); err != nil {
				t.Fatalf("ip netns add: %v: %s", err, out)
			}
			t.Cleanup(func() { exec.Command("ip", "netns", "del", nsName).Run() })
			if out, err := exec.Command("ip", "-n", nsName, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1").CombinedOutput(); err != nil {
				t.Fatalf("add eth0: %v: %s", err, out)
			}
			gone := func() {
				if out, err := exec.Command("ip", "netns", "del", nsName).CombinedOutput(); err != nil {
					t.Fatalf("ip netns del: %v: %s", err, out)
				}
			}
			d := New(c, nil)
			if tt.afterCooke {
				d.cookie = func(p string) (uint64, error) {
					cookie, err := bpf.NetnsCookie(p)
					gone()
					return cookie, err
				}
			} else {
				gone()
			}
			s := capture.Settings{OutboundPort: 15001, InboundPort: 15006, OutboundAllCIDRs: true, InboundAllPorts: true,
				ProxyUIDs: []uint32{1337}, ExcludeOutboundCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}}
			e := store.Entry{Key: store.Key{IfName: "eth0"}, Netns: "/var/run/netns/" + nsName, Mode: modeSidecar, Capture: &s,
				IPs: []netip.Prefix{netip.MustParsePrefix("10.9.0.2/24")}}
			err := d.Enroll(context.Background(), &e)
			if err == nil {
				t.Fatal("Enroll succeeded on a netns that is gone")
			}
			if !strings.Contains(err.Error(), e.Netns) {
				t.Errorf("error %q does not name the netns %s", err, e.Netns)
			}
			t.Log(err)
			if got, err := c.Enrolled(); err != nil || len(got) != 0 {
				t.Errorf("enrolled after the failed Enroll: %v, %v", got, err)
			}
			if e.NetnsCookie != 0 {
				if _, err := c.Counters(e.NetnsCookie); err == nil {
					t.Error("counters of the pod left behind")
				}
			}
			if got := pins(); strings.Join(got, ",") != strings.Join(before, ",") {
				t.Errorf("pins after the failed Enroll %v, want %v", got, before)
			}
			// The handler's Unenroll after a failed Enroll is harmless.
			if err := d.Unenroll(context.Background(), e); err != nil {
				t.Error(err)
			}
		})
	}
}
