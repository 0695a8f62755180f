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
