package metrics

import "testing"

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
