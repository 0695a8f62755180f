// Package run is the benchmark runner behind `make bench`: it builds the
// contenders on one simulated node, runs every scenario alternating them,
// and hands the figures to package report.
package run

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/sidelane/sidelane/bench/report"
)

// Config says what to run and where things are.
type Config struct {
	Quick       bool
	OutDir      string
	SidelaneBin string // dir with sidelane and sidelane-cni
	ToolBin     string // dir with the reference CNI plugins, pilot-agent
	BenchBin    string // sidelane-bench itself, started inside pods

	// Only lists the scenarios to run (-only); empty: all.
	Only []string
	// PinCPUs pins the traffic scenarios' pods to fixed cores
	// (MeshConfig.PinCPUs).
	PinCPUs bool
}

// Runner runs one benchmark session.
type Runner struct {
	cfg      Config
	log      *slog.Logger
	res      *report.Results
	cleanups []func()
	// node, while a CNI scenario runs, holds the cpu groups its agents
	// go into (onNode); nil otherwise or where no cpu controller is.
	node *nodeCPU
}

// New makes a runner.
func New(cfg Config, log *slog.Logger) *Runner {
	return &Runner{cfg: cfg, log: log, res: &report.Results{Quick: cfg.Quick, Machine: map[string]string{}}}
}

// transient records a measurement that failed once and was retried, in
// the results' machine notes, so a flaky path is visible.
func (r *Runner) transient(scenario, contender string, err error) {
	r.log.Warn("measurement failed, retrying once", "scenario", scenario, "contender", contender, "error", err)
	r.addNote("retried", fmt.Sprintf("%s/%s: %v", scenario, contender, err))
}

// addNote appends note to the results' machine note key ("; " between).
func (r *Runner) addNote(key, note string) {
	if prev := r.res.Machine[key]; prev != "" {
		note = prev + "; " + note
	}
	r.res.Machine[key] = note
}

func (r *Runner) cleanup(f func()) { r.cleanups = append(r.cleanups, f) }

func (r *Runner) runCleanups() {
	for i := len(r.cleanups) - 1; i >= 0; i-- {
		r.cleanups[i]()
	}
	r.cleanups = nil
}

// Run measures everything and writes results.json and results.md.
func (r *Runner) Run(ctx context.Context) error {
	maps.Copy(r.res.Machine, machine())
	start := time.Now()
	r.recordHostProbe(ctx, "start")
	footprintCounts := []int{10, 100, 200}
	// Rounds of each CNI burst, every round one burst through sidelane's
	// chain and one through the reference noop plugin's, alternating.
	burstRounds := 6
	if r.cfg.Quick {
		burstRounds = 2
	}
	scenarios := []scenario{
		{"traffic", r.traffic},
		{"cni_burst_100", r.onNode(func(ctx context.Context) error {
			return r.cniBurst(ctx, "cni_burst_100", 100, 10, burstRounds)
		})},
		// One pod at a time: the plugin's own cost without CPU contention
		// (the burst's p99 on a 2-core machine is mostly processes queueing).
		{"cni_sequential_20", r.onNode(func(ctx context.Context) error {
			return r.cniBurst(ctx, "cni_sequential_20", 20, 1, burstRounds)
		})},
		{"cni_add_scale", r.onNode(r.cniAddScaleRun)},
		{"footprint", func(ctx context.Context) error { return r.footprint(ctx, footprintCounts) }},
		{"policy_update", r.policyUpdate},
		{scenarioIstiod, r.policyToIstiod},
	}
	interrupted := r.runScenarios(ctx, scenarios)
	if !interrupted {
		r.recordHostProbe(ctx, "end")
	}
	for _, p := range pendingScenarios() {
		r.res.Skip(p.Scenario, p.Contender, p.Reason)
	}
	r.res.Machine["duration"] = time.Since(start).Round(time.Second).String()
	r.res.ComputeRatios()
	if err := r.write(); err != nil {
		return err
	}
	if interrupted {
		// The partial results are written (and say so), but make bench
		// must not report success for a run that did not finish.
		return fmt.Errorf("interrupted: %s (partial results in %s)", r.res.Machine["interrupted"], r.cfg.OutDir)
	}
	return nil
}

type scenario struct {
	name string
	run  func(context.Context) error
}

// runScenarios runs the selected scenarios in order. Once ctx is done
// (SIGINT, SIGTERM) it starts no further scenario: each would only fail
// on the cancelled ctx (an interrupted run used to go on through every
// one). The ones left are listed as not run, and Machine["interrupted"]
// names the scenario the interrupt hit, whose figures may be partial; it
// reports whether that happened.
func (r *Runner) runScenarios(ctx context.Context, scenarios []scenario) bool {
	last := ""
	for i, s := range scenarios {
		if !selected(r.cfg.Only, s.name) {
			continue
		}
		if ctx.Err() != nil {
			for _, rest := range scenarios[i:] {
				if selected(r.cfg.Only, rest.name) {
					r.res.Skip(rest.name, "", "not run: the run was interrupted")
				}
			}
			break
		}
		last = s.name
		r.log.Info("scenario", "name", s.name)
		t0 := time.Now()
		err := guard(func() error { return s.run(ctx) })
		r.runCleanups()
		r.log.Info("scenario finished", "name", s.name, "took", time.Since(t0).Round(time.Millisecond))
		if err != nil {
			if ctx.Err() != nil {
				err = fmt.Errorf("interrupted: %w", err)
			}
			r.res.Skip(s.name, "", "failed: "+err.Error())
			r.log.Error("scenario failed", "name", s.name, "error", err)
		}
	}
	if ctx.Err() == nil {
		return false
	}
	where := "before the first scenario"
	if last != "" {
		where = "during " + last
	}
	r.res.Machine["interrupted"] = fmt.Sprintf("%s: %v", where, context.Cause(ctx))
	r.log.Error("run interrupted", "where", r.res.Machine["interrupted"])
	return true
}

// onNode runs a CNI scenario with the node's cpu groups (nodeCPU): this
// process, whose children the plugins are, in the runtime's group, each
// agent in the agents' group. Where the machine has no cpu controller to
// use it runs without them, and results say so.
func (r *Runner) onNode(f func(context.Context) error) func(context.Context) error {
	return func(ctx context.Context) error {
		n, err := newNodeCPU()
		if err != nil {
			r.res.Machine["cni_cpu_groups"] = "not used: " + err.Error()
			r.log.Warn("CNI scenarios without the node's cpu groups", "error", err)
			return f(ctx)
		}
		r.node = n
		defer func() {
			// Agents stop (cleanups) before their group is removed.
			r.runCleanups()
			r.node = nil
			n.close()
		}()
		r.res.Machine["cni_cpu_groups"] = "CNI scenarios: the plugins (children of the bench, the runtime's stand-in) and the agent in sibling cpu cgroups of equal weight under " + n.dir
		return f(ctx)
	}
}

// pendingScenarios are the scenarios whose contenders have not landed yet
// (none now: every contender is measured, or reports why it could not be).
func pendingScenarios() []report.Pending {
	return nil
}

func (r *Runner) write() error {
	if err := os.MkdirAll(r.cfg.OutDir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", r.cfg.OutDir, err)
	}
	for name, write := range map[string]func(*os.File) error{
		"results.json": func(f *os.File) error { return r.res.WriteJSON(f) },
		"results.md":   func(f *os.File) error { return r.res.WriteMarkdown(f) },
	} {
		f, err := os.Create(filepath.Join(r.cfg.OutDir, name))
		if err != nil {
			return err
		}
		if err := write(f); err != nil {
			f.Close()
			return fmt.Errorf("write %s: %w", name, err)
		}
		if err := f.Close(); err != nil {
			return err
		}
	}
	r.log.Info("results written", "dir", r.cfg.OutDir)
	return nil
}

func machine() map[string]string {
	m := map[string]string{
		"date": time.Now().UTC().Format(time.RFC3339),
		"go":   runtime.Version(),
		"cpus": fmt.Sprint(runtime.NumCPU()),
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m["kernel"] = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "model name"); ok {
				m["cpu"] = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	return m
}

func uniqueName(prefix string) string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}
