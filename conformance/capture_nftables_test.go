//go:build linux

package conformance

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sidelane/sidelane/agent/datapath/choose"
	"github.com/sidelane/sidelane/agent/datapath/ebpf"
	"github.com/sidelane/sidelane/agent/datapath/nftables"
	"github.com/sidelane/sidelane/bpf"
	"github.com/sidelane/sidelane/internal/istioref"
	"github.com/sidelane/sidelane/internal/testenv"
	"github.com/sidelane/sidelane/istio/capture"
)

// istioNFTReference is Istio's native nftables backend: the real
// `pilot-agent istio-iptables --native-nftables` with istio-cni's flags,
// in the pod's namespace. Where it disagrees with Istio's iptables
// backend a probe says so (capProbe.istioNFT) and sidelane follows the
// iptables backend; a case whose pod it refuses says why
// (capCase.istioNFTRefuses).
type istioNFTReference struct{ bin string }

func (*istioNFTReference) name() string { return "istio-nftables" }

func (r *istioNFTReference) setup(t *testing.T) {
	r.bin = testenv.RequireTool(t, "pilot-agent")
	testenv.RequireTool(t, "nft")
}

func (r *istioNFTReference) validationFlags() []string { return []string{"--native-nftables"} }

func (r *istioNFTReference) install(t *testing.T, pod *capPod) {
	t.Helper()
	if pod.spec.Annotations[capture.AnnotationInterceptionMode] == capture.ModeNone {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	spec := pod.spec
	if pod.rejects != "" {
		if err := istioref.Validate(pod.spec); err == nil {
			flags := nftFlags(pod.spec)
			if out, err := pod.ns.Command(ctx, r.bin, append([]string{"istio-iptables"}, flags...)...).CombinedOutput(); err == nil {
				t.Fatalf("the case says Istio rejects %s, but istio-iptables %s accepts it:\n%s", pod.rejects, strings.Join(flags, " "), tail(string(out), 5))
			}
			checkNoIstioTables(t, ctx, pod)
		}
		spec = istioref.DefaultsPod(spec)
	}
	flags := nftFlags(spec)
	out, err := pod.ns.Command(ctx, r.bin, append([]string{"istio-iptables"}, flags...)...).CombinedOutput()
	if pod.istioNFTRefuses != "" {
		if err == nil {
			t.Fatalf("the case says Istio's nftables backend refuses the pod (%s), but it accepted it", pod.istioNFTRefuses)
		}
		checkNoIstioTables(t, ctx, pod)
		return
	}
	if err != nil {
		t.Fatalf("istio-iptables %s: %v\n%s", strings.Join(flags, " "), err, tail(string(out), 20))
	}
}

func checkNoIstioTables(t *testing.T, ctx context.Context, pod *capPod) {
	t.Helper()
	out, err := pod.ns.Command(ctx, "nft", "list", "tables").CombinedOutput()
	if err != nil {
		t.Fatalf("nft list tables: %v: %s", err, out)
	}
	if strings.Contains(string(out), "istio-proxy") {
		t.Fatalf("istio-iptables --native-nftables failed but left tables:\n%s", out)
	}
}

// nftFlags are istio-cni's flags with its nftables backend selected.
func nftFlags(pod capture.Pod) []string { return append(istioFlagsFor(pod), "--native-nftables") }

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
