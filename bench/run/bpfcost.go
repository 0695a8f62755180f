package run

import (
	"slices"
	"strings"
)

// ProgStat is one BPF program's accumulated run statistics (BPF_ENABLE_STATS).
type ProgStat struct {
	RunNs, Runs uint64
}

// ProgCost is what one program cost per connection between two snapshots.
type ProgCost struct {
	Name                string
	NsPerConn, RunsPerC float64
}

// progLabel names a program for the results: the per-pod sk_lookup stub
// is loaded without BTF, so the kernel knows it by its first 15 bytes
// only; its run time includes the program it tail-calls.
func progLabel(name string) string {
	if strings.HasPrefix("sidelane_in_lookup", name) && len(name) >= len("sidelane_in_l") {
		return "sidelane_in_lookup+in_capture"
	}
	return name
}

// ProgCosts turns two snapshots (program name -> stats, summed over the
// programs of that name) and the connections made in between into each
// program's run time and runs per connection, most expensive first, and
// their total. Programs that did not run are left out; a counter that went
// backwards (a program unloaded in between) counts as not run.
func ProgCosts(before, after map[string]ProgStat, conns int) ([]ProgCost, float64) {
	if conns <= 0 {
		return nil, 0
	}
	var out []ProgCost
	var total float64
	for name, a := range after {
		b := before[name]
		if a.Runs <= b.Runs || a.RunNs < b.RunNs {
			continue
		}
		c := ProgCost{Name: progLabel(name), NsPerConn: float64(a.RunNs-b.RunNs) / float64(conns),
			RunsPerC: float64(a.Runs-b.Runs) / float64(conns)}
		out = append(out, c)
		total += c.NsPerConn
	}
	slices.SortFunc(out, func(x, y ProgCost) int {
		if x.NsPerConn != y.NsPerConn {
			if x.NsPerConn > y.NsPerConn {
				return -1
			}
			return 1
		}
		return strings.Compare(x.Name, y.Name)
	})
	return out, total
}
