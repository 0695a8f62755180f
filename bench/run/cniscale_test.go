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
sidelane_cni_request_duration_seconds_bucket{op="add",result="ok",le="0.005"} 1
sidelane_cni_request_duration_seconds_bucket{op="add",result="ok",le="0.015"} 4
sidelane_cni_request_duration_seconds_bucket{op="add",result="ok",le="+Inf"} 4
sidelane_cni_request_duration_seconds_bucket{op="add",result="error",le="+Inf"} 1
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
	inf := math.Inf(1)
	want := map[string]phaseStat{
		"ebpf_put":    {0.006, 4, []bucket{{0.001, 3}}},
		"state_write": {0.002, 4, nil},
		agentAdd:      {0.04, 4, []bucket{{0.005, 1}, {0.015, 4}, {inf, 4}}},
	}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for k, w := range want {
		if g := got[k]; g.sum != w.sum || g.count != w.count || !slices.Equal(g.buckets, w.buckets) {
			t.Errorf("%s = %+v, want %+v", k, g, w)
		}
	}
	if _, err := parsePhases(strings.NewReader(`sidelane_cni_add_phase_seconds_bucket{phase="x",le="big"} 1`)); err == nil {
		t.Error("a bad le parsed")
	}
	if _, err := parsePhases(strings.NewReader(`sidelane_cni_add_phase_seconds_sum{phase="x"} nope`)); err == nil {
		t.Error("a bad value parsed")
	}
}

func TestPhaseMeansSubtractsBefore(t *testing.T) {
	before := map[string]phaseStat{"ebpf_put": {sum: 1, count: 1000}}
	after := map[string]phaseStat{"ebpf_put": {sum: 1.01, count: 1010}, "new": {sum: 0.002, count: 2}, "idle": {}}
	got := phaseMeans(before, after)
	if math.Abs(got["ebpf_put"]-1) > 1e-9 || math.Abs(got["new"]-1) > 1e-9 {
		t.Fatalf("means %v, want 1 ms each", got)
	}
	if _, ok := got["idle"]; ok {
		t.Fatal("a phase with no new ADDs has a mean")
	}
}

func TestPhaseQuantilesSubtractsBefore(t *testing.T) {
	inf := math.Inf(1)
	// 100 old ADDs all <= 5 ms; the 10 new ones all in (10, 20] ms.
	before := map[string]phaseStat{agentAdd: {buckets: []bucket{{0.005, 100}, {0.01, 100}, {0.02, 100}, {inf, 100}}}}
	after := map[string]phaseStat{
		agentAdd: {buckets: []bucket{{0.005, 100}, {0.01, 100}, {0.02, 110}, {inf, 110}}},
		"idle":   {buckets: []bucket{{0.005, 0}, {inf, 0}}},
	}
	got := phaseQuantiles(before, after, 0.5)
	if q := got[agentAdd]; q.lo != 0.01 || q.hi != 0.02 || math.Abs(q.value-0.015) > 1e-12 {
		t.Fatalf("p50 %+v, want 15 ms in (10, 20]", q)
	}
	if _, ok := got["idle"]; ok {
		t.Fatal("a histogram with no new observations has a quantile")
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
