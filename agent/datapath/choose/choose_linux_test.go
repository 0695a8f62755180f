//go:build linux

package choose

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sidelane/sidelane/agent/datapath/ebpf"
	"github.com/sidelane/sidelane/bpf"
	"github.com/sidelane/sidelane/internal/testenv"
)

func autoOptions(t *testing.T, noIPTables bool) Options {
	t.Helper()
	mnt, err := bpf.CgroupV2Mount()
	if err != nil {
		t.Fatal(err)
	}
	cg := testenv.Cgroup(t, mnt, "sidelane-choose-")
	pins := filepath.Join("/sys/fs/bpf", testenv.UniqueName("sidelane-choose-"))
	t.Cleanup(func() { _ = os.RemoveAll(pins) })
	return Options{Kind: Auto, ForceMissingIPTables: noIPTables, EBPF: ebpf.Options{
		Cgroup: cg, PinDir: pins, ForceMissing: []string{bpf.FeatureLoad},
	}}
}

// Auto without eBPF picks iptables where it works, and nftables where
// iptables does not, saying why.
func TestAutoFallBack(t *testing.T) {
	testenv.Privileged(t)
	for _, tc := range []struct {
		noIPTables bool
		want       string
		reasons    []string
	}{
		{false, IPTables, []string{"forced"}},
		{true, NFTables, []string{"forced", "iptables: forced missing"}},
	} {
		o, err := Open(autoOptions(t, tc.noIPTables))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(o.Close)
		if o.Name() != tc.want {
			t.Errorf("iptables missing=%v: auto picked %s (%q), want %s", tc.noIPTables, o.Name(), o.FellBack, tc.want)
		}
		for _, r := range tc.reasons {
			if !strings.Contains(o.FellBack, r) {
				t.Errorf("fallback reason %q does not say %q", o.FellBack, r)
			}
		}
	}
}

// The iptables probe passes on a host with iptables, and fails when the
// binaries are not on PATH (as on hosts without iptables).
func TestProbeIPTables(t *testing.T) {
	testenv.Privileged(t)
	if err := probeIPTables(context.Background()); err != nil {
		t.Fatalf("probe on a host with iptables: %v", err)
	}
	t.Setenv("PATH", t.TempDir())
	if err := probeIPTables(context.Background()); err == nil || !strings.Contains(err.Error(), "iptables") {
		t.Fatalf("probe without iptables binaries: %v", err)
	}
}

func TestForcedNFTables(t *testing.T) {
	testenv.Privileged(t)
	o, err := Open(Options{Kind: NFTables})
	if err != nil {
		t.Fatal(err)
	}
	if o.Name() != NFTables || o.FellBack != "" {
		t.Errorf("--datapath nftables opened %s (%q)", o.Name(), o.FellBack)
	}
}

func TestUnknownKind(t *testing.T) {
	if _, err := Open(Options{Kind: "nft"}); err == nil || !strings.Contains(err.Error(), NFTables) {
		t.Errorf("unknown kind: %v", err)
	}
}
