package run

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sidelane/sidelane/bench/report"
	"github.com/sidelane/sidelane/internal/testenv"
)

// The CNI scenarios enroll through the real eBPF datapath (the agent
// reports eBPF phases for every ADD) and record what the report needs:
// the burst's per-phase breakdown and the scale scenario's per-size
// figures, ratio and per-repetition values. Nothing here asserts a timing.
func TestCNIScenariosEnrollWithEBPF(t *testing.T) {
	testenv.Privileged(t)
	bin := testenv.SidelaneBin(t)
	testenv.RequireTool(t, "bridge")
	out := t.TempDir()
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	r := New(Config{Quick: true, OutDir: out, SidelaneBin: bin, ToolBin: testenv.ToolBin(t)}, log)
	t.Cleanup(r.runCleanups)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// As Run does it: in the node's cpu groups, where the machine has them.
	var agentCgroup string
	burst := r.onNode(func(ctx context.Context) error {
		if err := r.cniBurst(ctx, "cni_burst_4", 4, 2, 3); err != nil {
			return err
		}
		if r.node != nil {
			agentCgroup = r.node.agent
			// The chains' agent is the only process in the agents' group;
			// this process (the plugins' parent) is in the runtime's.
			if got := procsIn(t, r.node.agent); len(got) != 1 {
				t.Errorf("agent cpu group has processes %v, want the one agent", got)
			}
			if got := procsIn(t, r.node.runtime); !slices.Contains(got, strconv.Itoa(os.Getpid())) {
				t.Errorf("runtime cpu group has %v, not this process (%d)", got, os.Getpid())
			}
		}
		return nil
	})
	if err := burst(ctx); err != nil {
		t.Fatal(err)
	}
	if agentCgroup == "" {
		t.Logf("no cpu groups: %s", r.res.Machine["cni_cpu_groups"])
	} else if _, err := os.Stat(agentCgroup); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("cpu group %s left behind (%v)", agentCgroup, err)
	}
	for _, m := range []string{"addP99ms", "agentAddMeanMs", "phase_ebpf_put_ms", "phase_ebpf_netns_cookie_ms",
		"phase_ebpf_inbound_attach_ms", "phase_state_write_ms", "phase_lock_wait_ms", "execVersionP50ms",
		"execVersionP99ms", "agentAddP50ms", "agentAddP99ms", "phase_ebpf_inbound_attach_p99_ms"} {
		if _, ok := figure(r.res, "cni_burst_4", report.Sidelane, m); !ok {
			t.Errorf("cni_burst_4 has no %s", m)
		}
	}
	// Both chains, every round: per-round values, aligned for the paired
	// interval.
	for _, c := range []string{report.Sidelane, report.Chain, report.NoopPlugin, report.NoopChain} {
		for _, m := range []string{"addP50ms", "addP99ms", "delP99ms"} {
			f, ok := figureReps(r.res, "cni_burst_4", c, m)
			if !ok || len(f) != 3 {
				t.Errorf("cni_burst_4 %s %s: per-round values %v, want 3", c, m, f)
			}
		}
	}
	r.runCleanups()

	if err := r.cniAddScale(ctx, []int{2, 6}, 2, 2); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"cni_add_2", "cni_add_6"} {
		for _, m := range []string{"addP99ms", "addP50ms", "phase_ebpf_put_ms", "agentAddP99ms"} {
			if _, ok := figure(r.res, s, report.Sidelane, m); !ok {
				t.Errorf("%s has no %s", s, m)
			}
		}
	}
	if _, ok := figure(r.res, "cni_add_scale", report.Sidelane, "p99_6_over_2"); !ok {
		t.Error("no scale ratio")
	}
	data, err := os.ReadFile(filepath.Join(out, "cni_scale.json"))
	if err != nil {
		t.Fatal(err)
	}
	var got CNIScale
	if err := json.Unmarshal(data, &got); err != nil {
		t.Fatal(err)
	}
	if len(got.RepP99ms) != 2 || len(got.RepP99ms[0]) != 2 || len(got.RepP99ms[1]) != 2 {
		t.Fatalf("per-repetition p99s %v, want 2 sizes x 2 repetitions", got.RepP99ms)
	}
}

func figureReps(res *report.Results, scenario, contender, metric string) ([]float64, bool) {
	for _, f := range res.Figures {
		if f.Scenario == scenario && f.Contender == contender && f.Metric == metric {
			return f.Reps, true
		}
	}
	return nil, false
}

func procsIn(t *testing.T, cg string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(cg, "cgroup.procs"))
	if err != nil {
		t.Fatal(err)
	}
	return strings.Fields(string(b))
}

func figure(res *report.Results, scenario, contender, metric string) (float64, bool) {
	for _, f := range res.Figures {
		if f.Scenario == scenario && f.Contender == contender && f.Metric == metric {
			return f.Value, true
		}
	}
	return 0, false
}
