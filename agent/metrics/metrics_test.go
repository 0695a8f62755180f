package metrics

import (
	"slices"
	"testing"
	"time"
)

func TestDatapathRepairs(t *testing.T) {
	m := New(nil)
	m.DatapathRepair("cgroup_link")
	m.DatapathRepair("cgroup_link")
	m.DatapathRepair("tc_link")
	fams, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range fams {
		if f.GetName() != "sidelane_datapath_repairs_total" {
			continue
		}
		for _, s := range f.GetMetric() {
			got[s.GetLabel()[0].GetValue()] = s.GetCounter().GetValue()
		}
	}
	if len(got) != 2 || got["cgroup_link"] != 2 || got["tc_link"] != 1 {
		t.Errorf("sidelane_datapath_repairs_total = %v, want cgroup_link 2, tc_link 1", got)
	}
	var nilM *Metrics
	nilM.DatapathRepair("pin") // safe on nil
}

// The bench reads ADD quantiles from these histograms (interpolating in a
// bucket, like histogram_quantile); an ADD takes 1-200 ms, where a bucket
// wider than 1.5x would leave a p99 unresolved (e.g. "25-50 ms").
func TestLatencyBucketsResolveMilliseconds(t *testing.T) {
	m := New(nil)
	m.CNIRequest("add", time.Millisecond, nil)
	m.CNIAddPhase("enroll", time.Millisecond)
	fams, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	seen := 0
	for _, f := range fams {
		if f.GetName() != "sidelane_cni_request_duration_seconds" && f.GetName() != "sidelane_cni_add_phase_seconds" {
			continue
		}
		seen++
		var bounds []float64
		for _, b := range f.GetMetric()[0].GetHistogram().GetBucket() {
			bounds = append(bounds, b.GetUpperBound())
		}
		if !slices.Contains(bounds, 0.001) || !slices.Contains(bounds, 0.2) {
			t.Errorf("%s buckets %v: want bounds at 1 ms and 200 ms", f.GetName(), bounds)
		}
		for i := 1; i < len(bounds); i++ {
			if lo, hi := bounds[i-1], bounds[i]; lo >= 0.001 && hi <= 0.2 && hi/lo > 1.5+1e-9 {
				t.Errorf("%s bucket (%g, %g] is wider than 1.5x", f.GetName(), lo, hi)
			}
		}
	}
	if seen != 2 {
		t.Fatalf("found %d of the 2 ADD histograms", seen)
	}
}
