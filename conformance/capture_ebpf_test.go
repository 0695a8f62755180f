//go:build linux

package conformance

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	dpebpf "github.com/sidelane/sidelane/agent/datapath/ebpf"
	"github.com/sidelane/sidelane/bpf"
	"github.com/sidelane/sidelane/internal/testenv"
	"github.com/sidelane/sidelane/istio/capture"
)

type sidelaneEBPF struct{ dp *dpebpf.Datapath }

func (*sidelaneEBPF) name() string { return "sidelane-ebpf" }

func (s *sidelaneEBPF) setup(t *testing.T) {
	mnt, err := bpf.CgroupV2Mount()
	if err != nil {
		t.Fatal(err)
	}
	cg := filepath.Join(mnt, testenv.UniqueName("sidelane-conf-"))
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	// The eBPF hooks act on sockets of processes inside the attach point:
	// move this test process (and so haproxy and every in-process dial)
	// into a cgroup of its own, and back at cleanup.
	self, _ := os.ReadFile("/proc/self/cgroup")
	orig := mnt
	for _, line := range strings.Split(string(self), "\n") {
		if rest, ok := strings.CutPrefix(line, "0::"); ok {
			orig = filepath.Join(mnt, rest)
		}
	}
	pid := []byte(strconv.Itoa(os.Getpid()))
	if err := os.WriteFile(filepath.Join(cg, "cgroup.procs"), pid, 0); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.WriteFile(filepath.Join(orig, "cgroup.procs"), pid, 0); err != nil {
			t.Errorf("move back to %s: %v", orig, err)
		}
		if err := os.Remove(cg); err != nil {
			t.Errorf("remove cgroup: %v", err)
		}
	})
	c, err := bpf.Load(bpf.Config{Cgroup: cg, PinDir: filepath.Join("/sys/fs/bpf", testenv.UniqueName("sidelane-conf-"))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Uninstall() })
	s.dp = dpebpf.New(c, slog.New(slog.NewTextHandler(testWriter{t}, nil)))
}

func (s *sidelaneEBPF) install(t *testing.T, pod *capPod) {
	enroll(t, s.dp, pod)
	if pod.spec.ProxyEnv[capture.EnvInvalidDrop] == "true" {
		checkNoNetfilter(t, pod)
	}
}

// checkNoNetfilter: INVALID_DROP guards REDIRECT's reverse NAT, which
// conntrack skips for INVALID packets (they would reach the app un-NATed
// and make it reset the connection). The eBPF backend captures without
// netfilter: no rule, so no NAT, in the pod's netns; an out-of-window
// segment meets the connection's own socket like in a pod without a
// sidecar. The probes of the case show that capture still works.
func checkNoNetfilter(t *testing.T, pod *capPod) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, cmd := range [][]string{{"nft", "list", "ruleset"}, {"iptables-save"}, {"ip6tables-save"}} {
		out, err := pod.ns.Command(ctx, cmd[0], cmd[1:]...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(cmd, " "), err, out)
		}
		for _, l := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(l, "-A ") || strings.Contains(l, "chain ") {
				t.Fatalf("eBPF capture left netfilter state in the pod (%s):\n%s", strings.Join(cmd, " "), out)
			}
		}
	}
}
