package run

import (
	"cmp"
	"fmt"
	"math"
	"slices"
)

// bucket is one cumulative Prometheus histogram bucket: count
// observations were <= le (seconds; the last bucket's le is +Inf).
type bucket struct{ le, count float64 }

// quantile is a quantile estimated from a histogram's buckets, and the
// bucket (lo, hi] it lies in: the estimate's resolution.
type quantile struct {
	value, lo, hi float64
}

// histogramQuantile estimates the q-quantile (0 <= q <= 1) from cumulative
// buckets the way Prometheus' histogram_quantile does: find the bucket
// holding rank q*total and interpolate linearly inside it (the first
// bucket starts at 0). When the rank falls into the +Inf bucket the
// estimate is the highest finite bound (a lower bound only: hi is +Inf).
// ok is false without a +Inf bucket, a finite bucket, or observations.
// Counts that decrease along the bounds (a scrape racing observations) are
// raised to be monotonic, as Prometheus does.
func histogramQuantile(q float64, in []bucket) (quantile, bool) {
	if q < 0 || q > 1 || len(in) < 2 {
		return quantile{}, false
	}
	bs := slices.Clone(in)
	slices.SortFunc(bs, func(a, b bucket) int { return cmp.Compare(a.le, b.le) })
	last := len(bs) - 1
	if !math.IsInf(bs[last].le, 1) {
		return quantile{}, false
	}
	for i := 1; i < len(bs); i++ {
		bs[i].count = max(bs[i].count, bs[i-1].count)
	}
	total := bs[last].count
	if total <= 0 {
		return quantile{}, false
	}
	rank := q * total
	b, _ := slices.BinarySearchFunc(bs[:last], rank, func(x bucket, r float64) int { return cmp.Compare(x.count, r) })
	if b == last {
		return quantile{value: bs[last-1].le, lo: bs[last-1].le, hi: math.Inf(1)}, true
	}
	lo, prev := 0.0, 0.0
	if b > 0 {
		lo, prev = bs[b-1].le, bs[b-1].count
	} else if bs[0].le <= 0 {
		return quantile{value: bs[0].le, lo: bs[0].le, hi: bs[0].le}, true
	}
	hi := bs[b].le
	n := bs[b].count - prev
	if n <= 0 {
		// rank 0 (q = 0) in a leading run of empty buckets.
		return quantile{value: lo, lo: lo, hi: hi}, true
	}
	return quantile{value: lo + (hi-lo)*(rank-prev)/n, lo: lo, hi: hi}, true
}

// bucketsDelta is after minus before, bucket by bucket (the observations
// made between two scrapes); before may be nil.
func bucketsDelta(before, after []bucket) []bucket {
	prev := map[float64]float64{}
	for _, b := range before {
		prev[b.le] = b.count
	}
	out := make([]bucket, len(after))
	for i, a := range after {
		out[i] = bucket{le: a.le, count: a.count - prev[a.le]}
	}
	return out
}

// note says how q was estimated and its resolution, for results.md.
func (q quantile) note() string {
	if math.IsInf(q.hi, 1) {
		return fmt.Sprintf("histogram_quantile; in the +Inf bucket: > %.4g ms", q.lo*1000)
	}
	return fmt.Sprintf("histogram_quantile, interpolated in bucket (%.4g, %.4g] ms", q.lo*1000, q.hi*1000)
}
