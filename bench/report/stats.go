package report

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
)

// Bootstrap settings: 2,000 resamples give stable 2.5/97.5 percentiles;
// the fixed seed makes an interval a function of the data alone, so the
// same results.json always yields the same results.md.
const (
	bootstrapResamples = 2000
	bootstrapSeed      = 18
	confidence         = 0.95
)

// Interval is a two-sided confidence interval.
type Interval struct{ Lo, Hi float64 }

// PairedBootstrap is the percentile bootstrap interval of f over paired
// repetitions: reps[i][k] is input i's value in repetition k (every input
// measured in the same interleaved rounds, so a slow round hits them all).
// A resample draws whole repetitions with replacement, keeping the pairs
// together, and evaluates f on each input's mean over the drawn rounds.
// ok is false with fewer than two repetitions, unequal lengths, or when
// too few resamples give a finite f.
func PairedBootstrap(reps [][]float64, f func([]float64) float64) (Interval, bool) {
	if len(reps) == 0 {
		return Interval{}, false
	}
	n := len(reps[0])
	for _, r := range reps {
		if len(r) != n {
			return Interval{}, false
		}
	}
	if n < 2 {
		return Interval{}, false
	}
	rng := rand.New(rand.NewPCG(bootstrapSeed, uint64(n)))
	means := make([]float64, len(reps))
	stats := make([]float64, 0, bootstrapResamples)
	idx := make([]int, n)
	for range bootstrapResamples {
		for k := range idx {
			idx[k] = rng.IntN(n)
		}
		for i, r := range reps {
			s := 0.0
			for _, k := range idx {
				s += r[k]
			}
			means[i] = s / float64(n)
		}
		if v := f(means); !math.IsNaN(v) && !math.IsInf(v, 0) {
			stats = append(stats, v)
		}
	}
	if len(stats) < bootstrapResamples*9/10 {
		return Interval{}, false
	}
	slices.Sort(stats)
	tail := (1 - confidence) / 2
	return Interval{Lo: quantile(stats, tail), Hi: quantile(stats, 1-tail)}, true
}

// quantile of sorted s by linear interpolation.
func quantile(s []float64, q float64) float64 {
	pos := q * float64(len(s)-1)
	i := int(math.Floor(pos))
	if i >= len(s)-1 {
		return s[len(s)-1]
	}
	return s[i] + (pos-float64(i))*(s[i+1]-s[i])
}

// Mean of v (0 for none).
func Mean(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := 0.0
	for _, x := range v {
		s += x
	}
	return s / float64(len(v))
}

// Target is a ratio's goal: "<= 0.75" or ">= 2".
type Target struct {
	Op    string // "<=" or ">="
	Limit float64
}

// ParseTarget reads "<= 0.75" / ">= 2".
func ParseTarget(s string) (Target, error) {
	f := strings.Fields(s)
	if len(f) != 2 || (f[0] != "<=" && f[0] != ">=") {
		return Target{}, fmt.Errorf("target %q: want \"<= N\" or \">= N\"", s)
	}
	v, err := strconv.ParseFloat(f[1], 64)
	if err != nil {
		return Target{}, fmt.Errorf("target %q: %w", s, err)
	}
	return Target{Op: f[0], Limit: v}, nil
}

func (t Target) String() string { return t.Op + " " + strconv.FormatFloat(t.Limit, 'g', -1, 64) }

// Holds says whether x is on the target's side.
func (t Target) Holds(x float64) bool {
	if t.Op == "<=" {
		return x <= t.Limit
	}
	return x >= t.Limit
}

// Met says whether a measured ratio meets t: with an interval, the whole
// interval must be on the right side (an interval straddling the limit is
// not met: the run cannot tell); without one (a single measurement), the
// value decides.
func (t Target) Met(value float64, iv *Interval) bool {
	if iv == nil {
		return t.Holds(value)
	}
	return t.Holds(iv.Lo) && t.Holds(iv.Hi)
}
