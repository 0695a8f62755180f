package run

import (
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
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

	if err := r.cniBurst(ctx, "cni_burst_4", 4, 2); err != nil {
		t.Fatal(err)
	}
	for _, m := range []string{"addP99ms", "agentAddMeanMs", "phase_ebpf_put_ms", "phase_ebpf_netns_cookie_ms",
		"phase_ebpf_inbound_attach_ms", "phase_state_write_ms", "phase_lock_wait_ms", "execVersionP50ms",
		"execVersionP99ms", "agentAddP50ms", "agentAddP99ms", "phase_ebpf_inbound_attach_p99_ms"} {
		if _, ok := figure(r.res, "cni_burst_4", report.Sidelane, m); !ok {
			t.Errorf("cni_burst_4 has no %s", m)
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

func figure(res *report.Results, scenario, contender, metric string) (float64, bool) {
	for _, f := range res.Figures {
		if f.Scenario == scenario && f.Contender == contender && f.Metric == metric {
			return f.Value, true
		}
	}
	return 0, false
}
