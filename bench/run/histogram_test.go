package run

import (
	"math"
	"testing"
)

func TestHistogramQuantile(t *testing.T) {
	inf := math.Inf(1)
	// 100 observations: 10 <= 1 ms, 60 in (1, 5], 29 in (5, 10], 1 > 10 ms.
	hist := []bucket{{0.001, 10}, {0.005, 70}, {0.01, 99}, {inf, 100}}
	cases := []struct {
		name      string
		q         float64
		in        []bucket
		ok        bool
		v, lo, hi float64
	}{
		{name: "first bucket starts at 0", q: 0.05, in: hist, ok: true, v: 0.0005, lo: 0, hi: 0.001},
		{name: "median interpolated", q: 0.5, in: hist, ok: true, v: 0.001 + 0.004*40/60, lo: 0.001, hi: 0.005},
		{name: "rank on a bound", q: 0.7, in: hist, ok: true, v: 0.005, lo: 0.001, hi: 0.005},
		{name: "p99 at the top of a bucket", q: 0.99, in: hist, ok: true, v: 0.01, lo: 0.005, hi: 0.01},
		{name: "+Inf bucket: highest finite bound", q: 0.995, in: hist, ok: true, v: 0.01, lo: 0.01, hi: inf},
		{name: "q 1 in +Inf", q: 1, in: hist, ok: true, v: 0.01, lo: 0.01, hi: inf},
		{name: "empty buckets skipped", q: 0.5, in: []bucket{{0.001, 0}, {0.002, 0}, {0.004, 4}, {inf, 4}}, ok: true, v: 0.003, lo: 0.002, hi: 0.004},
		{name: "q 0 in leading empty bucket", q: 0, in: []bucket{{0.001, 0}, {0.002, 4}, {inf, 4}}, ok: true, v: 0, lo: 0, hi: 0.001},
		{name: "unsorted input", q: 0.5, in: []bucket{{inf, 4}, {0.004, 4}, {0.002, 0}}, ok: true, v: 0.003, lo: 0.002, hi: 0.004},
		{name: "non-monotonic counts raised", q: 0.5, in: []bucket{{0.001, 2}, {0.002, 1}, {0.004, 4}, {inf, 4}}, ok: true, v: 0.001, lo: 0, hi: 0.001},
		{name: "all in +Inf", q: 0.5, in: []bucket{{0.001, 0}, {inf, 3}}, ok: true, v: 0.001, lo: 0.001, hi: inf},
		{name: "no observations", q: 0.99, in: []bucket{{0.001, 0}, {inf, 0}}},
		{name: "no buckets", q: 0.99, in: nil},
		{name: "only +Inf", q: 0.5, in: []bucket{{inf, 5}}},
		{name: "no +Inf bucket", q: 0.5, in: []bucket{{0.001, 1}, {0.002, 2}}},
		{name: "q above 1", q: 1.5, in: hist},
		{name: "q below 0", q: -0.1, in: hist},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, ok := histogramQuantile(c.q, c.in)
			if ok != c.ok {
				t.Fatalf("ok = %v, want %v (%+v)", ok, c.ok, got)
			}
			if !ok {
				return
			}
			if math.Abs(got.value-c.v) > 1e-12 || got.lo != c.lo || got.hi != c.hi {
				t.Fatalf("got %+v, want value %v in (%v, %v]", got, c.v, c.lo, c.hi)
			}
		})
	}
}

func TestBucketsDelta(t *testing.T) {
	inf := math.Inf(1)
	before := []bucket{{0.001, 5}, {inf, 7}}
	after := []bucket{{0.001, 6}, {0.002, 3}, {inf, 17}}
	got := bucketsDelta(before, after)
	want := []bucket{{0.001, 1}, {0.002, 3}, {inf, 10}}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
}

func TestQuantileNote(t *testing.T) {
	if got := (quantile{value: 0.012, lo: 0.0075, hi: 0.015}).note(); got != "histogram_quantile, interpolated in bucket (7.5, 15] ms" {
		t.Errorf("note %q", got)
	}
	if got := (quantile{value: 5, lo: 5, hi: math.Inf(1)}).note(); got != "histogram_quantile; in the +Inf bucket: > 5000 ms" {
		t.Errorf("note %q", got)
	}
}
