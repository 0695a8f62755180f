package run

import (
	"errors"
	"os"
	"strings"
	"testing"
)

func TestCPUHierarchy(t *testing.T) {
	const hybridMounts = `cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
`
	const v2Mounts = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n"
	noRead := func(string) ([]byte, error) { return nil, errors.New("not read") }
	ctl := func(s string) func(string) ([]byte, error) {
		return func(p string) ([]byte, error) {
			if p != "/sys/fs/cgroup/cgroup.subtree_control" {
				return nil, os.ErrNotExist
			}
			return []byte(s), nil
		}
	}
	for _, c := range []struct {
		name, mounts, self string
		read               func(string) ([]byte, error)
		mnt, cur, err      string
	}{
		{"v1 cpu", hybridMounts, "4:memory:/x\n2:cpuacct:/\n1:cpu:/user/1\n0::/\n", noRead, "/sys/fs/cgroup/cpu", "/user/1", ""},
		// "cpuacct" must not be read as "cpu".
		{"v1 cpu,cpuacct joint", "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n", "3:cpu,cpuacct:/a\n", noRead, "/sys/fs/cgroup/cpu,cpuacct", "/a", ""},
		{"v1 cpuacct only", "cgroup /sys/fs/cgroup/cpuacct cgroup rw,cpuacct 0 0\n", "2:cpuacct:/\n", noRead, "", "", "no cgroup with the cpu controller"},
		{"v2 delegating cpu", v2Mounts, "0::/user.slice/session-1.scope\n", ctl("cpuset cpu io memory pids\n"), "/sys/fs/cgroup", "/user.slice/session-1.scope", ""},
		{"v2 without cpu", v2Mounts, "0::/\n", ctl("memory pids\n"), "", "", "does not delegate the cpu controller"},
		{"v1 mount, no line", hybridMounts, "0::/\n", noRead, "", "", "no cpu controller line"},
	} {
		t.Run(c.name, func(t *testing.T) {
			mnt, cur, v2, err := cpuHierarchy(c.mounts, c.self, c.read)
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) {
					t.Fatalf("err %v, want %q", err, c.err)
				}
				return
			}
			if wantV2 := strings.HasPrefix(c.name, "v2"); err != nil || mnt != c.mnt || cur != c.cur || v2 != wantV2 {
				t.Fatalf("got %q %q v2=%v %v, want %q %q v2=%v", mnt, cur, v2, err, c.mnt, c.cur, wantV2)
			}
		})
	}
}
