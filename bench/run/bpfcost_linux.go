package run

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// progSnapshot sums the run statistics of every loaded program named
// sidelane*, by name.
func progSnapshot() (map[string]ProgStat, error) {
	out := map[string]ProgStat{}
	var id ebpf.ProgramID
	for {
		next, err := ebpf.ProgramGetNextID(id)
		if errors.Is(err, os.ErrNotExist) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("list BPF programs: %w", err)
		}
		id = next
		p, err := ebpf.NewProgramFromID(id)
		if err != nil {
			continue // unloaded since it was listed
		}
		info, err := p.Info()
		var st *ebpf.ProgramStats
		if err == nil {
			st, err = p.Stats()
		}
		p.Close()
		if err != nil || !strings.HasPrefix(info.Name, "sidelane") {
			continue
		}
		s := out[info.Name]
		s.RunNs += uint64(st.Runtime)
		s.Runs += st.RunCount
		out[info.Name] = s
	}
}

// bpfCost records where the eBPF contenders' own per-connection CPU goes:
// with BPF run-time statistics on (BPF_ENABLE_STATS, on until its fd
// closes, whatever kernel.bpf_stats_enabled says) it runs crr batches of 8
// for each of them, after the measured crr rounds (the statistics' clock
// reads add tens of ns to every program run), and records each sidelane
// program's run time and runs per connection. Only that contender's pods
// carry traffic during its batches, so the other loaded copies of the
// programs add nothing (a sidelane test running beside the benchmark
// would).
func (r *Runner) bpfCost(ctx context.Context, m *Mesh, pairs []*Pair, names []string, batches int, batch string) {
	const scenario = "crr_8_bpf"
	stats, err := ebpf.EnableStats(unix.BPF_STATS_RUN_TIME)
	if err != nil {
		for _, n := range names {
			r.res.Skip(scenario, n, "BPF run-time statistics not available: "+err.Error())
		}
		return
	}
	defer stats.Close()
	for _, pr := range pairs {
		if !slices.Contains(names, pr.C.Name) || ctx.Err() != nil {
			continue
		}
		if err := r.bpfCostOf(pr, m, scenario, batches, batch); err != nil {
			r.res.Skip(scenario, pr.C.Name, "failed: "+err.Error())
			r.log.Error("measurement failed", "scenario", scenario, "contender", pr.C.Name, "error", err)
		}
	}
	r.log.Info("scenario done", "name", scenario)
}

func (r *Runner) bpfCostOf(pr *Pair, m *Mesh, scenario string, batches int, batch string) error {
	sess, err := m.StartSession(pr.C, pr.Client, pr.ServerAddr(), 1024)
	if err != nil {
		return err
	}
	defer sess.Close()
	command := "crr " + batch + " 8"
	if _, err := sess.Do(command); err != nil { // warm up
		return err
	}
	before, err := progSnapshot()
	if err != nil {
		return err
	}
	conns := 0
	for range batches {
		res, err := sess.Do(command)
		if err != nil {
			return err
		}
		conns += len(res.LatNs)
	}
	after, err := progSnapshot()
	if err != nil {
		return err
	}
	costs, total := ProgCosts(before, after, conns)
	if len(costs) == 0 {
		return fmt.Errorf("no sidelane program ran during %d connections", conns)
	}
	for _, c := range costs {
		r.res.AddNoted(scenario, pr.C.Name, c.Name, c.NsPerConn, "ns/conn", fmt.Sprintf("%.2f runs/conn", c.RunsPerC))
	}
	r.res.AddNoted(scenario, pr.C.Name, "total", total, "ns/conn", fmt.Sprintf("%d connections", conns))
	return nil
}
