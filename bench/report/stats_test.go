package report

import (
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

// synthetic is n paired repetitions of two contenders whose true means
// are a and b, with per-round drift shared by both (the machine getting
// busier) and independent noise.
func synthetic(seed uint64, n int, a, b float64) [][]float64 {
	rng := rand.New(rand.NewPCG(seed, 7))
	x, y := make([]float64, n), make([]float64, n)
	for k := range n {
		drift := 1 + 0.3*rng.Float64()
		x[k] = a*drift + rng.NormFloat64()*a*0.03
		y[k] = b*drift + rng.NormFloat64()*b*0.03
	}
	return [][]float64{x, y}
}

func TestPairedBootstrapCoversTrueRatio(t *testing.T) {
	const trueRatio = 0.8
	covered, trials := 0, 200
	for seed := range uint64(trials) {
		iv, ok := PairedBootstrap(synthetic(seed, 20, 80, 100), ratio)
		if !ok {
			t.Fatalf("seed %d: no interval", seed)
		}
		if iv.Lo > iv.Hi {
			t.Fatalf("seed %d: interval %+v reversed", seed, iv)
		}
		// The drift moves both contenders together: it must not widen
		// the ratio's interval much, since resampling keeps rounds paired.
		if iv.Hi-iv.Lo > 0.1 {
			t.Errorf("seed %d: interval %+v wider than 0.1 with 3%% noise and 20 reps", seed, iv)
		}
		if iv.Lo <= trueRatio && trueRatio <= iv.Hi {
			covered++
		}
	}
	// A 95% interval should cover the truth in most trials; a broken one
	// (e.g. unpaired, or the point estimate twice) misses far more often.
	if covered < trials*85/100 {
		t.Errorf("interval covered the true ratio in %d of %d trials, want >= 85%%", covered, trials)
	}
}

func TestPairedBootstrapIsDeterministic(t *testing.T) {
	data := synthetic(3, 10, 50, 100)
	a, _ := PairedBootstrap(data, ratio)
	b, _ := PairedBootstrap(data, ratio)
	if a != b {
		t.Fatalf("same data, different intervals: %+v vs %+v", a, b)
	}
}

func TestPairedBootstrapNeedsPairedReps(t *testing.T) {
	for name, reps := range map[string][][]float64{
		"one rep":        {{1}, {2}},
		"unequal length": {{1, 2, 3}, {1, 2}},
		"none":           nil,
	} {
		if _, ok := PairedBootstrap(reps, ratio); ok {
			t.Errorf("%s: got an interval", name)
		}
	}
}

func TestTargetMet(t *testing.T) {
	le, _ := ParseTarget("<= 0.75")
	ge, _ := ParseTarget(">= 2")
	for _, c := range []struct {
		name  string
		t     Target
		value float64
		iv    *Interval
		want  bool
	}{
		{"below, interval below", le, 0.6, &Interval{0.55, 0.7}, true},
		{"value below, interval straddles", le, 0.7, &Interval{0.65, 0.8}, false},
		{"above", le, 0.9, &Interval{0.85, 0.95}, false},
		{"on the limit", le, 0.75, &Interval{0.7, 0.75}, true},
		{">=: interval above", ge, 2.2, &Interval{2.1, 2.3}, true},
		{">=: straddles", ge, 2.05, &Interval{1.95, 2.15}, false},
		{"no interval: value decides", ge, 2.05, nil, true},
	} {
		if got := c.t.Met(c.value, c.iv); got != c.want {
			t.Errorf("%s: met = %v, want %v", c.name, got, c.want)
		}
	}
	for _, bad := range []string{"< 1", "<=", "<= x", ""} {
		if _, err := ParseTarget(bad); err == nil {
			t.Errorf("ParseTarget(%q) accepted", bad)
		}
	}
}

func TestRatioIntervalAndStraddle(t *testing.T) {
	r := &Results{}
	// stream_64k: sidelane about 2.0x istio-iptables, rounds vary: the
	// interval straddles 2, so not met even though the value is >= 2.
	r.AddReps("stream_64k", SidelaneEBPF, "MBps", []float64{1900, 2100, 2000, 2150, 1950}, "MB/s")
	r.AddReps("stream_64k", IstioIptables, "MBps", []float64{1000, 1000, 1000, 1000, 1000}, "MB/s")
	// stream_1k: clearly above 1.
	r.AddReps("stream_1k", SidelaneEBPF, "MBps", []float64{300, 310, 290, 305, 295}, "MB/s")
	r.AddReps("stream_1k", IstioIptables, "MBps", []float64{200, 205, 195, 200, 200}, "MB/s")
	r.ComputeRatios()
	s := r.Ratios["stream_64k_ratio"]
	if s.Lo == nil || !(*s.Lo < 2 && *s.Hi > 2) || *s.Met {
		t.Errorf("stream_64k = %+v, want an interval straddling 2, not met", s)
	}
	if s.Reps != 5 {
		t.Errorf("reps = %d, want 5", s.Reps)
	}
	if s := r.Ratios["stream_1k_ratio"]; s.Lo == nil || *s.Lo <= 1 || !*s.Met {
		t.Errorf("stream_1k = %+v, want met", s)
	}
}

func TestCRRNeedsZeroConntrack(t *testing.T) {
	r := &Results{}
	r.AddReps("crr_8", SidelaneEBPF, "connsPerSec", []float64{150, 152, 149}, "conn/s")
	r.AddReps("crr_8", IstioIptables, "connsPerSec", []float64{100, 101, 99}, "conn/s")
	r.Add("crr_8", SidelaneEBPF, "conntrackPerConn", 0.5, "entries")
	r.ComputeRatios()
	c := r.Ratios["crr_8_ratio"]
	if *c.Met || !strings.Contains(c.Note, "conntrack") {
		t.Fatalf("crr_8 with conntrack entries = %+v, want not met with a note", c)
	}
}

func TestOtherConfigurationsAndCPU(t *testing.T) {
	r := &Results{Alternatives: []string{EBPFShortcut}}
	r.AddReps("rr_1k", SidelaneEBPF, MetricCPU, []float64{10, 11, 10}, "us")
	r.AddReps("rr_1k", EBPFShortcut, MetricCPU, []float64{8, 8, 9}, "us")
	r.AddReps("rr_1k", IstioIptables, MetricCPU, []float64{20, 21, 20}, "us")
	r.AddReps("rr_1k", Explicit, MetricCPU, []float64{5, 5, 5}, "us")
	r.ComputeRatios()
	if got := *r.Ratios["rr_1k_cpu_ratio"].Value; math.Abs(got-31.0/61) > 0.001 {
		t.Errorf("headline cpu ratio %v, want sidelane-ebpf's 0.508", got)
	}
	alt := r.OtherConfigurations[EBPFShortcut]
	if got := *alt["rr_1k_cpu_ratio"].Value; math.Abs(got-25.0/61) > 0.001 {
		t.Errorf("alternative cpu ratio %v, want 0.410", got)
	}
	if _, ok := alt["policy_update_p99_ms"]; ok {
		t.Error("a ratio that does not involve sidelane-ebpf is repeated for the alternative")
	}
	if c := r.CPU["rr_1k"][Explicit]; c.Value == nil || c.Lo == nil {
		t.Errorf("cpu table lacks explicit-proxy with an interval: %+v", c)
	}
}

// A contender that ran only a scenario's first rounds is paired with the
// others over those rounds: value and interval from the same rounds.
func TestRatioOverSharedLeadingRounds(t *testing.T) {
	r := &Results{Alternatives: []string{EBPFShortcut}}
	// istio-iptables ran 6 rounds, the alternative only the first 3; the
	// later rounds are slower, so using them would move the value.
	r.AddReps("stream_1k", IstioIptables, "MBps", []float64{100, 100, 100, 50, 50, 50}, "MB/s")
	r.AddReps("stream_1k", SidelaneEBPF, "MBps", []float64{150, 150, 150, 75, 75, 75}, "MB/s")
	r.AddReps("stream_1k", EBPFShortcut, "MBps", []float64{120, 130, 110}, "MB/s")
	r.ComputeRatios()
	alt := r.OtherConfigurations[EBPFShortcut]["stream_1k_ratio"]
	if alt.Value == nil || math.Abs(*alt.Value-1.2) > 0.001 || alt.Lo == nil || alt.Reps != 3 {
		t.Fatalf("alternative's stream ratio = %+v, want 1.2 over the 3 shared rounds with an interval", alt)
	}
	if *alt.Lo > 1.2 || *alt.Hi < 1.2 {
		t.Errorf("interval [%v, %v] does not hold the value", *alt.Lo, *alt.Hi)
	}
	var md strings.Builder
	if err := r.WriteMarkdown(&md); err != nil {
		t.Fatal(err)
	}
	if want := "| sidelane-ebpf-shortcut | MBps | 120.00 MB/s | 3 | 1.20x |"; !strings.Contains(md.String(), want) {
		t.Errorf("results.md lacks %q (the column over the shared rounds):\n%s", want, md.String())
	}
	head := r.Ratios["stream_1k_ratio"]
	if head.Value == nil || *head.Value != 1.5 || head.Reps != 6 {
		t.Errorf("headline stream ratio = %+v, want 1.5 over all 6 rounds", head)
	}
}

func TestTargetContenders(t *testing.T) {
	if got, want := TargetContenders("rr_1k"), []string{Explicit, IstioIptables, NoMesh, SidelaneEBPF}; !slices.Equal(got, want) {
		t.Errorf("rr_1k: %v, want %v", got, want)
	}
	if got, want := TargetContenders("stream_1k"), []string{IstioIptables, SidelaneEBPF}; !slices.Equal(got, want) {
		t.Errorf("stream_1k: %v, want %v", got, want)
	}
	if got := TargetContenders("rr_64"); len(got) != 0 {
		t.Errorf("rr_64 has no target, got %v", got)
	}
}
