//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/sidelane/sidelane/internal/testenv"
)

func testCgroup(t *testing.T) string {
	t.Helper()
	testenv.Privileged(t)
	mnt, err := CgroupV2Mount()
	if err != nil {
		t.Fatal(err)
	}
	return testenv.Cgroup(t, mnt, "sidelane-test-")
}

func testPinDir(t testing.TB) string {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs("/sys/fs/bpf", &st); err != nil || st.Type != unix.BPF_FS_MAGIC {
		testenv.SkipOrFail(t, "/sys/fs/bpf is not a bpffs mount")
	}
	dir := filepath.Join("/sys/fs/bpf", testenv.UniqueName("sidelane-test-"))
	t.Cleanup(func() {
		if _, err := os.Stat(dir); err == nil {
			t.Errorf("pin dir %s left behind", dir)
			os.RemoveAll(dir)
		}
	})
	return dir
}

// attachedCount is how many programs of any of sidelane's cgroup attach
// types are attached to dir itself.
func attachedCount(t *testing.T, dir string) int {
	t.Helper()
	fd, err := unix.Open(dir, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	n := 0
	for _, at := range []ebpf.AttachType{ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupSockOps, ebpf.AttachCGroupGetsockopt} {
		res, err := link.QueryPrograms(link.QueryOptions{Target: fd, Attach: at})
		if err != nil {
			t.Fatal(err)
		}
		n += len(res.Programs)
	}
	return n
}

type loadCase struct {
	name        string
	cfg         Config
	want        string
	unsupported bool // wraps ErrNotSupported (--datapath auto falls back)
}

// cgroupV1Dir is a cgroup v1 hierarchy's mount point, if the machine has one.
func cgroupV1Dir() string {
	b, _ := os.ReadFile("/proc/mounts")
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 3 && f[2] == "cgroup" {
			return f[1]
		}
	}
	return ""
}

// Bad settings fail Load with an error naming the setting and leave
// nothing behind: no pin dir, no pins, nothing attached.
func TestLoadBadInputChangesNothing(t *testing.T) {
	cg := testCgroup(t)
	notBPF := filepath.Join(t.TempDir(), "pins")
	var cases []loadCase
	for _, tt := range []loadCase{
		{"pin dir not on bpffs", Config{Cgroup: cg, PinDir: notBPF}, "not on a bpf filesystem", false},
		{"pin dir below a non-bpffs dir", Config{Cgroup: cg, PinDir: filepath.Join(notBPF, "a", "b")}, "not on a bpf filesystem", false},
		{"cgroup root not cgroup v2", Config{Cgroup: t.TempDir(), PinDir: testPinDir(t)}, "not on a cgroup v2 filesystem", true},
		{"cgroup root missing", Config{Cgroup: filepath.Join(cg, "missing"), PinDir: testPinDir(t)}, "no such file", false},
		{"no cgroup root", Config{PinDir: testPinDir(t)}, "no attach point", false},
	} {
		cases = append(cases, tt)
	}
	if v1 := cgroupV1Dir(); v1 != "" {
		cases = append(cases, loadCase{"cgroup v1 hierarchy", Config{Cgroup: v1, PinDir: testPinDir(t)}, "not on a cgroup v2 filesystem", true})
	}
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Load(tt.cfg)
			if err == nil {
				c.Uninstall()
				t.Fatal("Load succeeded")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not say %q", err, tt.want)
			}
			if errors.Is(err, ErrNotSupported) != tt.unsupported {
				t.Errorf("error %q: wraps ErrNotSupported = %v, want %v", err, !tt.unsupported, tt.unsupported)
			}
			if tt.cfg.Cgroup != "" && !strings.Contains(err.Error(), tt.cfg.Cgroup) && !strings.Contains(err.Error(), tt.cfg.PinDir) {
				t.Errorf("error %q names neither the cgroup nor the pin dir", err)
			}
			if _, err := os.Stat(tt.cfg.PinDir); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("pin dir %s exists after a failed Load (%v)", tt.cfg.PinDir, err)
			}
			if n := attachedCount(t, cg); n != 0 {
				t.Errorf("%d programs attached to the cgroup after a failed Load", n)
			}
		})
	}
}

// A full pods map (16,384 pods on the node): Put of one more pod fails with
// an error naming the limit and writes none of its rules; pods already
// enrolled can still be re-enrolled; after a Delete the new pod fits.
func TestPutFullPodsMap(t *testing.T) {
	c, err := Load(Config{Cgroup: testCgroup(t), PinDir: testPinDir(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Uninstall(); err != nil {
			t.Error(err)
		}
	})
	limit := int(c.objs.Pods.MaxEntries())
	if limit != 16384 {
		t.Fatalf("pods map holds %d, the README says 16,384", limit)
	}
	bare := Pod{OutboundPort: 15001, InboundPort: 15006}
	for i := 1; i <= limit; i++ {
		if err := c.Put(uint64(i), bare); err != nil {
			t.Fatalf("Put pod %d of %d: %v", i, limit, err)
		}
	}
	full := mustPlan(t)
	next := uint64(limit + 1)
	err = c.Put(next, full)
	if !errors.Is(err, ErrMapFull) || !strings.Contains(err.Error(), fmt.Sprint(limit)) {
		t.Fatalf("Put over the limit: %v, want ErrMapFull naming %d", err, limit)
	}
	t.Log(err)
	for name, m := range map[string]*ebpf.Map{"cidrs": c.objs.Cidrs, "ports": c.objs.Ports, "pod_ips": c.objs.PodIps} {
		if n := countEntries(t, m); n != 0 {
			t.Errorf("%s has %d entries of the pod that did not fit, want 0", name, n)
		}
	}
	var per []captureCounters
	if err := c.objs.PodCounters.Lookup(&next, &per); !errors.Is(err, ebpf.ErrKeyNotExist) {
		t.Errorf("counters of the pod that did not fit: %v, want none", err)
	}
	if err := c.Put(1, full); err != nil {
		t.Errorf("re-enroll of an enrolled pod with a full map: %v", err)
	}
	if err := c.Delete(1); err != nil {
		t.Fatal(err)
	}
	if err := c.Put(next, full); err != nil {
		t.Errorf("Put after a Delete made room: %v", err)
	}
	if err := c.Verify(next, full); err != nil {
		t.Error(err)
	}
}
