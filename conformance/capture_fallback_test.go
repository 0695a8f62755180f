//go:build linux

package conformance

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sidelane/sidelane/agent/datapath/choose"
	"github.com/sidelane/sidelane/agent/datapath/ebpf"
	"github.com/sidelane/sidelane/agent/datapath/iptables"
	"github.com/sidelane/sidelane/bpf"
	"github.com/sidelane/sidelane/internal/testenv"
)

// sidelaneFallback is the agent's own backend choice (package choose, what
// `sidelane agent --datapath auto --force-missing-feature ...` runs) with an
// eBPF feature forced off: it must fall back to the iptables backend, and
// the whole capture table must pass through what it picked.
type sidelaneFallback struct{ sidelaneIPTables }

func (*sidelaneFallback) name() string { return "sidelane-auto-fallback" }

func (s *sidelaneFallback) setup(t *testing.T) {
	mnt, err := bpf.CgroupV2Mount()
	if err != nil {
		t.Fatal(err)
	}
	// A cgroup of the test's own: the probe must never look at the root.
	cg := testenv.Cgroup(t, mnt, "sidelane-fallback-")
	pins := filepath.Join("/sys/fs/bpf", testenv.UniqueName("sidelane-fallback-"))
	t.Cleanup(func() { _ = os.RemoveAll(pins) })

	log := slog.New(slog.NewTextHandler(testWriter{t}, nil))
	o, err := choose.Open(choose.Options{Kind: choose.Auto, Log: log, EBPF: ebpf.Options{
		Cgroup: cg, PinDir: pins, ForceMissing: []string{bpf.FeatureLoad},
	}})
	if err != nil {
		t.Fatalf("auto datapath with %s forced off: %v", bpf.FeatureLoad, err)
	}
	t.Cleanup(o.Close)
	if o.Name() != "iptables" || !strings.Contains(o.FellBack, "forced") {
		t.Fatalf("auto picked %s (fell back: %q), want iptables because of the forced-off feature", o.Name(), o.FellBack)
	}
	if _, err := os.Stat(pins); err == nil {
		t.Fatal("a failed probe pinned eBPF state")
	}
	s.backend = o.Datapath.(*iptables.Backend)
}
