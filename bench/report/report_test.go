package report

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

func TestRatios(t *testing.T) {
	r := &Results{}
	r.Add("rr_1k", NoMesh, "p50us", 20, "us")
	r.Add("rr_1k", IstioIptables, "p50us", 60, "us")
	r.Add("rr_1k", SidelaneEBPF, "p50us", 40, "us")
	r.Add("rr_1k", IstioIptables, "p99us", 100, "us")
	r.Add("rr_1k", SidelaneEBPF, "p99us", 120, "us")
	r.Skip("stream_64k", SidelaneEBPF, "eBPF datapath not landed")
	r.AddNoted("cni_burst_100", Sidelane, "agentAddP99ms", 12.5, "ms", "histogram_quantile, interpolated in bucket (10, 15] ms")
	r.ComputeRatios()

	if v := r.Ratios["rr_1k_added_latency_ratio"]; v.Value == nil || *v.Value != 0.5 || !*v.Met {
		t.Errorf("added latency ratio = %+v, want 0.5 met", v)
	}
	if v := r.Ratios["rr_1k_p99_ratio"]; v.Value == nil || *v.Value != 1.2 || *v.Met {
		t.Errorf("p99 ratio = %+v, want 1.2 not met", v)
	}
	if v := r.Ratios["stream_64k_ratio"]; v.Value != nil || !strings.Contains(v.Pending, "not landed") {
		t.Errorf("stream ratio = %+v, want pending with the reason", v)
	}
	if v := r.Ratios["crr_8_ratio"]; v.Value != nil || v.Pending == "" {
		t.Errorf("crr ratio = %+v, want pending", v)
	}
	if len(r.Ratios) != len(RatioNames()) {
		t.Errorf("%d ratios, want every name present", len(r.Ratios))
	}

	var js, md bytes.Buffer
	if err := r.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var back map[string]any
	if err := json.Unmarshal(js.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	for _, name := range RatioNames() {
		if _, ok := back["ratios"].(map[string]any)[name]; !ok {
			t.Errorf("results.json lacks ratio %s", name)
		}
	}
	if err := r.WriteMarkdown(&md); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"| rr_1k_added_latency_ratio | 0.500 |  | <= 0.75 | yes | single measurement, no interval |", "0.67x", "eBPF datapath not landed",
		"| sidelane | agentAddP99ms | 12.50 ms (histogram_quantile, interpolated in bucket (10, 15] ms) |  |  |"} {
		if !strings.Contains(md.String(), want) {
			t.Errorf("results.md lacks %q:\n%s", want, md.String())
		}
	}
}

func TestZeroDenominatorIsPending(t *testing.T) {
	r := &Results{}
	r.Add("rr_1k", NoMesh, "p50us", 20, "us")
	r.Add("rr_1k", IstioIptables, "p50us", 20, "us")
	r.Add("rr_1k", SidelaneEBPF, "p50us", 30, "us")
	r.ComputeRatios()
	if v := r.Ratios["rr_1k_added_latency_ratio"]; v.Value != nil || v.Pending == "" {
		t.Fatalf("%+v", v)
	}
}

// A floor's row is the headline ratio with the floor's figures in
// sidelane-ebpf's place, only for what the floor measured.
func TestFloors(t *testing.T) {
	r := &Results{}
	r.Add("stream_64k", IstioIptables, "MBps", 800, "MB/s")
	r.Add("stream_64k", SidelaneEBPF, "MBps", 900, "MB/s")
	r.Add("stream_64k", Explicit, "MBps", 1000, "MB/s")
	r.Add("stream_64k", ExplicitUnix, "MBps", 1200, "MB/s")
	r.Add("rr_1k", NoMesh, "p50us", 20, "us")
	r.Add("rr_1k", IstioIptables, "p50us", 100, "us")
	r.Add("rr_1k", Explicit, "p50us", 90, "us")
	r.ComputeRatios()
	if v := r.Floors[ExplicitUnix]["stream_64k_ratio"]; v.Value == nil || *v.Value != 1.5 || *v.Met {
		t.Errorf("unix floor stream_64k = %+v, want 1.5, not met (>= 2)", v)
	}
	if v := r.Floors[Explicit]["rr_1k_added_latency_ratio"]; v.Value == nil || *v.Value != 0.875 {
		t.Errorf("explicit floor added latency = %+v, want 0.875", v)
	}
	if _, ok := r.Floors[ExplicitUnix]["rr_1k_added_latency_ratio"]; ok {
		t.Error("unix floor has a ratio it did not measure")
	}
	if _, ok := r.Floors[Explicit]["capture_overhead_ratio"]; ok {
		t.Error("a floor's overhead against itself is listed")
	}
	var md bytes.Buffer
	if err := r.WriteMarkdown(&md); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(md.String(), "## Reference: explicit-unix") || !strings.Contains(md.String(), "| stream_64k_ratio | 1.500 |") {
		t.Errorf("results.md lacks the unix floor:\n%s", md.String())
	}
}

// The CNI share gets a paired interval from its per-round p99s, and the
// reference noop plugin's share, from its own chain's rounds, is reported
// next to it (informational: the floor of the share, never the headline).
func TestCNIShareRounds(t *testing.T) {
	r := &Results{}
	r.AddReps("cni_burst_100", Sidelane, "addP99ms", []float64{30, 34, 26, 32}, "ms")
	r.AddReps("cni_burst_100", Chain, "addP99ms", []float64{100, 110, 90, 105}, "ms")
	r.AddReps("cni_burst_100", NoopPlugin, "addP99ms", []float64{20, 22, 18, 21}, "ms")
	r.AddReps("cni_burst_100", NoopChain, "addP99ms", []float64{80, 90, 70, 84}, "ms")
	r.ComputeRatios()
	share := r.Ratios["cni_add_share_p99"]
	if share.Value == nil || *share.Value != 0.301 || share.Lo == nil || share.Reps != 4 || share.Met == nil || *share.Met {
		t.Errorf("cni_add_share_p99 = %+v, want 0.301 with a 4-round interval, not met", share)
	}
	floor := r.Ratios["cni_add_share_p99_noop_plugin"]
	if floor.Value == nil || *floor.Value != 0.25 || floor.Lo == nil || floor.Target != "" || floor.Met != nil {
		t.Errorf("cni_add_share_p99_noop_plugin = %+v, want 0.25 with an interval and no target", floor)
	}
}
