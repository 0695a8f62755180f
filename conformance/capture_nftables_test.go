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
	"github.com/sidelane/sidelane/agent/datapath/nftables"
	"github.com/sidelane/sidelane/bpf"
	"github.com/sidelane/sidelane/internal/testenv"
)

// sidelaneNFTables is sidelane's nftables backend, driven like the agent.
type sidelaneNFTables struct{ backend *nftables.Backend }

func (*sidelaneNFTables) name() string { return "sidelane-nftables" }

func (s *sidelaneNFTables) setup(t *testing.T) {
	testenv.RequireTool(t, "nft")
	s.backend = nftables.New(slog.New(slog.NewTextHandler(testWriter{t}, nil)))
}

func (s *sidelaneNFTables) install(t *testing.T, pod *capPod) { enroll(t, s.backend, pod) }

// sidelaneAutoNFTables is `--datapath auto` on a node with neither eBPF
// (a feature forced off) nor iptables (forced missing): it must pick the
// nftables backend, and the whole table must pass through it.
type sidelaneAutoNFTables struct{ sidelaneNFTables }

func (*sidelaneAutoNFTables) name() string { return "sidelane-auto-nftables" }

func (s *sidelaneAutoNFTables) setup(t *testing.T) {
	mnt, err := bpf.CgroupV2Mount()
	if err != nil {
		t.Fatal(err)
	}
	cg := testenv.Cgroup(t, mnt, "sidelane-fallback-")
	pins := filepath.Join("/sys/fs/bpf", testenv.UniqueName("sidelane-fallback-"))
	t.Cleanup(func() { _ = os.RemoveAll(pins) })
	log := slog.New(slog.NewTextHandler(testWriter{t}, nil))
	o, err := choose.Open(choose.Options{Kind: choose.Auto, Log: log, ForceMissingIPTables: true, EBPF: ebpf.Options{
		Cgroup: cg, PinDir: pins, ForceMissing: []string{bpf.FeatureLoad},
	}})
	if err != nil {
		t.Fatalf("auto datapath without eBPF and iptables: %v", err)
	}
	t.Cleanup(o.Close)
	if o.Name() != "nftables" || !strings.Contains(o.FellBack, "iptables") {
		t.Fatalf("auto picked %s (fell back: %q), want nftables because iptables is missing", o.Name(), o.FellBack)
	}
	s.backend = o.Datapath.(*nftables.Backend)
}

func (*sidelaneNFTables) validationFlags() []string { return []string{"--native-nftables"} }
