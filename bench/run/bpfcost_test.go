package run

import (
	"math"
	"testing"
)

func TestProgCosts(t *testing.T) {
	before := map[string]ProgStat{
		"sidelane_sockops":  {RunNs: 1000, Runs: 10},
		"sidelane_connect4": {RunNs: 500, Runs: 1},
		"sidelane_idle":     {RunNs: 70, Runs: 1},
		"sidelane_gone":     {RunNs: 900, Runs: 9},
	}
	after := map[string]ProgStat{
		"sidelane_sockops":  {RunNs: 1000 + 3500*10, Runs: 10 + 350},
		"sidelane_connect4": {RunNs: 500 + 9000*10, Runs: 1 + 30},
		"sidelane_idle":     {RunNs: 70, Runs: 1},
		"sidelane_in_loo":   {RunNs: 2000 * 10, Runs: 30}, // loaded in between
		"sidelane_gone":     {RunNs: 100, Runs: 1},        // reloaded: went backwards
	}
	got, total := ProgCosts(before, after, 10)
	want := []ProgCost{
		{Name: "sidelane_connect4", NsPerConn: 9000, RunsPerC: 3},
		{Name: "sidelane_sockops", NsPerConn: 3500, RunsPerC: 35},
		{Name: "sidelane_in_lookup+in_capture", NsPerConn: 2000, RunsPerC: 3},
	}
	if len(got) != len(want) {
		t.Fatalf("ProgCosts = %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("[%d] = %+v, want %+v", i, got[i], want[i])
		}
	}
	if math.Abs(total-14500) > 1e-9 {
		t.Errorf("total = %v, want 14500", total)
	}
	if got, total := ProgCosts(before, after, 0); got != nil || total != 0 {
		t.Errorf("no connections: %+v, %v; want nothing", got, total)
	}
}
