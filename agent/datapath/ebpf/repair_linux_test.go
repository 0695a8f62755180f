//go:build linux

package ebpf

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/bpf"
	"github.com/sidelane/sidelane/internal/testenv"
)

// The agent's loop puts back a link another root process detached by its
// ID, reports it, and does it within 5 s.
func TestWatchRepairsReattaches(t *testing.T) {
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
	d := New(c, nil)
	reports := make(chan bpf.Repaired, 16)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go d.WatchRepairs(ctx, 100*time.Millisecond, func() []store.Entry { return nil }, func(r bpf.Repaired) { reports <- r })

	ids := cgroupLinks(t, cg, ebpf.AttachCGroupInet4Connect)
	if len(ids) != 1 {
		t.Fatalf("%d connect4 links on the cgroup, want 1", len(ids))
	}
	l, err := link.NewFromID(ids[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Detach(); err != nil {
		t.Fatal(err)
	}
	l.Close()
	select {
	case r := <-reports:
		if r.What != bpf.RepairCgroupLink || r.Name != "connect4" || r.Reason != "detached" {
			t.Errorf("reported %v, want cgroup_link connect4 detached", r)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no repair within 5 s")
	}
	if got := cgroupLinks(t, cg, ebpf.AttachCGroupInet4Connect); len(got) != 1 || got[0] == ids[0] {
		t.Errorf("connect4 links after repair %v, want one new link (old %d)", got, ids[0])
	}
}

// cgroupLinks are the IDs of the attached links of type at on dir.
func cgroupLinks(t *testing.T, dir string, at ebpf.AttachType) []link.ID {
	t.Helper()
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	cgID := fi.Sys().(*syscall.Stat_t).Ino
	var ids []link.ID
	var it link.Iterator
	defer it.Close()
	for it.Next() {
		info, err := it.Link.Info()
		if err != nil {
			continue
		}
		if cgi := info.Cgroup(); cgi != nil && cgi.CgroupId == cgID && ebpf.AttachType(cgi.AttachType) == at {
			ids = append(ids, it.ID)
		}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return ids
}
