package run

import (
	"slices"
	"testing"
)

// Interleaving: every round runs every contender once, and over n rounds
// each contender takes every position once (no one always goes first,
// right after the previous scenario's pause, or last).
func TestRoundOrder(t *testing.T) {
	const n = 5
	pos := make([][]int, n) // contender -> positions seen
	for rep := range n {
		o := roundOrder(n, rep)
		s := slices.Sorted(slices.Values(o))
		if !slices.Equal(s, []int{0, 1, 2, 3, 4}) {
			t.Fatalf("round %d order %v is not a permutation", rep, o)
		}
		for p, c := range o {
			pos[c] = append(pos[c], p)
		}
	}
	for c, ps := range pos {
		slices.Sort(ps)
		if !slices.Equal(ps, []int{0, 1, 2, 3, 4}) {
			t.Errorf("contender %d ran in positions %v over %d rounds, want each once", c, ps, n)
		}
	}
	if a, b := roundOrder(n, 0), roundOrder(n, 1); slices.Equal(a, b) {
		t.Errorf("consecutive rounds in the same order %v", a)
	}
}
