package demo

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/sidelane/sidelane/internal/testenv"
)

// cancelOn cancels the run when the output reaches a marker: Ctrl-C in
// the middle of the story.
type cancelOn struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	marker string
	cancel context.CancelFunc
}

func (w *cancelOn) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if w.marker != "" && strings.Contains(w.buf.String(), w.marker) {
		w.cancel()
	}
	return len(p), nil
}

func TestDemoCleanup(t *testing.T) {
	testenv.Privileged(t)
	bin := testenv.SidelaneBin(t)
	for _, tc := range []struct {
		name, interruptAt string
	}{
		{"to the end", ""},
		{"interrupted in step 1", "== 1."},
		// node proxies, the controller and the grpc-go pair are running
		{"interrupted in step 3", "the policy changes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			out := &cancelOn{marker: tc.interruptAt, cancel: cancel}
			fp, err := Run(ctx, Options{Out: out, Repo: testenv.RepoRoot(t), Bin: bin, Tools: testenv.ToolBin(t),
				// The benchmark (~80 s) creates and removes nothing the
				// demo's cleanup is responsible for; `make demo` runs it.
				NoBench: true})
			t.Logf("demo output:\n%s", out.buf.String())
			switch {
			case tc.interruptAt == "" && err != nil:
				t.Errorf("demo: %v", err)
			case tc.interruptAt != "" && err == nil:
				t.Errorf("interrupted demo returned no error")
			}
			if fp.WorkDir == "" || fp.Cgroup == "" || len(fp.Netns) < 2 || len(fp.PinDirs) != 2 {
				t.Fatalf("demo did not get through its setup: %+v", fp)
			}
			for _, p := range append([]string{fp.WorkDir, fp.ClusterDir, fp.Cgroup}, fp.PinDirs...) {
				if _, err := os.Stat(p); !os.IsNotExist(err) {
					t.Errorf("%s left behind (stat: %v)", p, err)
				}
			}
			netns, err := exec.Command("ip", "netns", "list").Output()
			if err != nil {
				t.Fatal(err)
			}
			for _, line := range strings.Split(string(netns), "\n") {
				if f := strings.Fields(line); len(f) > 0 && slices.Contains(fp.Netns, f[0]) {
					t.Errorf("netns %s left behind", f[0])
				}
			}
			// Every process the demo started names its work dir, cluster
			// dir, cgroup or pin dir on its command line.
			procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
			for _, p := range procs {
				b, err := os.ReadFile(p)
				if err != nil {
					continue
				}
				cmd := strings.ReplaceAll(string(b), "\x00", " ")
				for _, s := range append([]string{fp.WorkDir, fp.ClusterDir, fp.Cgroup}, fp.PinDirs...) {
					if strings.Contains(cmd, s) {
						t.Errorf("process left behind: %s: %s", p, cmd)
					}
				}
			}
		})
	}
}
