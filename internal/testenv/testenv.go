// Package testenv holds helpers for tests that need the real machine: root,
// network namespaces, the built binaries and the reference CNI plugins.
// Only _test.go files import it.
package testenv

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
)

// RequirePrivilegedEnv, when "1", turns every would-be privilege skip into a
// failure, so CI cannot pass by skipping the tests that matter.
const RequirePrivilegedEnv = "SIDELANE_REQUIRE_PRIVILEGED"

// SkipOrFail skips the test with reason, or fails it when CI demands the
// privileged tests run.
func SkipOrFail(t testing.TB, reason string) {
	t.Helper()
	if os.Getenv(RequirePrivilegedEnv) == "1" {
		t.Fatalf("%s, but %s=1 requires this test to run", reason, RequirePrivilegedEnv)
	}
	t.Skip(reason)
}

// Privileged skips (or fails, see SkipOrFail) unless running as root on Linux.
func Privileged(t testing.TB) {
	t.Helper()
	if runtime.GOOS != "linux" {
		SkipOrFail(t, "needs Linux")
	}
	if os.Geteuid() != 0 {
		SkipOrFail(t, "needs root")
	}
}

// UniqueName returns prefix plus 8 random hex digits, for netns, links,
// bridges, cgroups and pins that must not collide with a parallel run.
// Keep prefix short: interface names have 15 characters at most.
func UniqueName(prefix string) string {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return prefix + hex.EncodeToString(b)
}

// RepoRoot finds the module root from the test's working directory.
func RepoRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("go.mod not found above the test's directory")
		}
		dir = parent
	}
}

// SidelaneBin is the directory of the built sidelane binaries ($SIDELANE_BIN,
// else <repo>/bin). It fails the test when a binary is missing: run make build.
func SidelaneBin(t testing.TB) string {
	t.Helper()
	dir := os.Getenv("SIDELANE_BIN")
	if dir == "" {
		dir = filepath.Join(RepoRoot(t), "bin")
	}
	for _, b := range []string{"sidelane", "sidelane-cni"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			t.Fatalf("%s not built in %s (run make build): %v", b, dir, err)
		}
	}
	return dir
}

// ToolBin is where hack/install-tools.sh put the third-party tools.
func ToolBin(t testing.TB) string {
	t.Helper()
	cache := os.Getenv("SIDELANE_CACHE")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache", "sidelane")
	}
	return filepath.Join(cache, "bin")
}

// RequireTool fails (never skips: a missing tool is a setup bug that would
// hide regressions) unless name is in ToolBin or on PATH.
func RequireTool(t testing.TB, name string) string {
	t.Helper()
	p := filepath.Join(ToolBin(t), name)
	if _, err := os.Stat(p); err == nil {
		return p
	}
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	t.Fatalf("%s not installed in %s or on PATH (hack/install-tools.sh builds it: make tools for the CNI plugins and pilot-agent, make istiod, make chart or make node-e2e for helm)", name, ToolBin(t))
	return ""
}

// Cgroup creates a cgroup v2 directory of the test's own below mount (the
// cgroup2 mount: bpf.CgroupV2Mount; never attach to the mount itself) and,
// at cleanup, kills whatever is left in it or its children and removes
// them all, failing the test if one stays behind.
func Cgroup(t testing.TB, mount, prefix string) string {
	t.Helper()
	dir := filepath.Join(mount, UniqueName(prefix))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("create test cgroup: %v", err)
	}
	t.Cleanup(func() {
		if err := removeCgroupTree(dir); err != nil {
			t.Errorf("cgroup %s left behind: %v", dir, err)
		}
	})
	return dir
}

// removeCgroupTree kills the processes of dir's tree and removes it,
// children first (an emptied cgroup can take a moment to be removable).
func removeCgroupTree(dir string) error {
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if e.IsDir() {
			if err := removeCgroupTree(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	_ = os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0)
	var err error
	for range 50 {
		if err = os.Remove(dir); err == nil || os.IsNotExist(err) {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return err
}

// NewNS makes a network namespace that is closed and unmounted at cleanup.
func NewNS(t testing.TB) ns.NetNS {
	t.Helper()
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		n.Close()
		_ = testutils.UnmountNS(n)
	})
	return n
}

// LastLines is the last n lines of s (a log to quote in a failure).
func LastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
