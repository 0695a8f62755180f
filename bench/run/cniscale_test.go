package run

import (
	"math"
	"slices"
	"strings"
	"testing"
)

func TestParsePhases(t *testing.T) {
	text := `# HELP sidelane_cni_add_phase_seconds x
sidelane_cni_add_phase_seconds_bucket{phase="ebpf_put",le="0.001"} 3
sidelane_cni_add_phase_seconds_sum{phase="ebpf_put"} 0.006
sidelane_cni_add_phase_seconds_count{phase="ebpf_put"} 4
sidelane_cni_add_phase_seconds_sum{phase="state_write"} 0.002
sidelane_cni_add_phase_seconds_count{phase="state_write"} 4
sidelane_cni_request_duration_seconds_sum{op="add",result="ok"} 0.04
sidelane_cni_request_duration_seconds_count{op="add",result="ok"} 4
sidelane_cni_request_duration_seconds_sum{op="add",result="error"} 9
sidelane_cni_request_duration_seconds_count{op="add",result="error"} 1
sidelane_cni_request_duration_seconds_sum{op="del",result="ok"} 7
sidelane_errors_total{op="add"} 1
`
	got, err := parsePhases(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]phaseStat{"ebpf_put": {0.006, 4}, "state_write": {0.002, 4}, agentAdd: {0.04, 4}}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("%s = %+v, want %+v", k, got[k], w)
		}
	}
	if _, err := parsePhases(strings.NewReader(`sidelane_cni_add_phase_seconds_sum{phase="x"} nope`)); err == nil {
		t.Error("a bad value parsed")
	}
}

func TestPhaseMeansSubtractsBefore(t *testing.T) {
	before := map[string]phaseStat{"ebpf_put": {1, 1000}}
	after := map[string]phaseStat{"ebpf_put": {1.01, 1010}, "new": {0.002, 2}, "idle": {0, 0}}
	got := phaseMeans(before, after)
	if math.Abs(got["ebpf_put"]-1) > 1e-9 || math.Abs(got["new"]-1) > 1e-9 {
		t.Fatalf("means %v, want 1 ms each", got)
	}
	if _, ok := got["idle"]; ok {
		t.Fatal("a phase with no new ADDs has a mean")
	}
}

func TestScaleRatioAndRotation(t *testing.T) {
	if got := scaleRatio([][]float64{{10, 12}, {50}, {11, 13}}); math.Abs(got-12.0/11) > 1e-9 {
		t.Fatalf("ratio %v, want 12/11", got)
	}
	if !math.IsNaN(scaleRatio([][]float64{{1}})) {
		t.Fatal("a ratio of one size")
	}
	seen := map[int]int{}
	for k := range 3 {
		o := rotated(3, k)
		s := slices.Clone(o)
		slices.Sort(s)
		if !slices.Equal(s, []int{0, 1, 2}) {
			t.Fatalf("rotation %d = %v, not a permutation", k, o)
		}
		seen[o[0]]++
	}
	if len(seen) != 3 {
		t.Fatalf("first sizes over 3 rounds %v, want each once", seen)
	}
}
