package demo

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// stepBench runs `sidelane-bench run -quick -only traffic` (the traffic
// scenarios of every contender, about a minute here; the CNI, footprint and
// istiod scenarios are `make bench`'s) into the demo's work dir and prints
// its ratios and the rr_1k round trips side by side.
func (r *run) stepBench(ctx context.Context) error {
	if r.opts.NoBench {
		r.say("  not run: -no-bench given (make demo FAST=1); `make bench QUICK=1` runs it alone")
		return nil
	}
	out := filepath.Join(r.fp.WorkDir, "bench")
	logPath := filepath.Join(r.fp.WorkDir, "bench.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.CommandContext(ctx, filepath.Join(r.opts.Bin, "sidelane-bench"), "run", "-quick", "-only", "traffic",
		"-out", out, "-bin", r.opts.Bin, "-tools", r.opts.Tools)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	done := r.progress("sidelane-bench run -quick -only traffic: nomesh, istio-iptables and istio-nftables (real pilot-agent rules), explicit proxy, sidelane eBPF, per-node")
	err = cmd.Run()
	done()
	if err != nil {
		b, _ := os.ReadFile(logPath)
		return fmt.Errorf("sidelane-bench: %w\n%s", err, tail(string(b), 1500))
	}
	b, err := os.ReadFile(filepath.Join(out, "results.md"))
	if err != nil {
		return err
	}
	tables := mdTables(string(b))
	var ratios []string
	for title, rows := range tables {
		// "Ratios (sidelane-ebpf = the agent's defaults)"
		if strings.HasPrefix(title, "Ratios") {
			ratios = rows
		}
	}
	r.say("  ratios (sidelane eBPF over istio-iptables unless named otherwise; one run on this noisy 2-core VM):")
	for _, l := range ratios {
		r.say("    %s", l)
	}
	r.say("  rr_1k (1 KiB request/response, same node), side by side:")
	r.say("    %-26s %10s %10s", "contender", "p50", "p99")
	for _, c := range []string{"nomesh", "istio-iptables", "sidelane-ebpf", "pernode"} {
		var p50, p99 string
		for _, l := range tables["rr_1k"] {
			f := cells(l)
			if len(f) >= 3 && f[0] == c {
				switch f[1] {
				case "p50us":
					p50 = f[2]
				case "p99us":
					p99 = f[2]
				}
			}
		}
		r.say("    %-26s %10s %10s", c, p50, p99)
	}
	added := -1.0
	for _, l := range ratios {
		if f := cells(l); len(f) >= 2 && f[0] == "rr_1k_added_latency_ratio" {
			added, _ = strconv.ParseFloat(f[1], 64)
		}
	}
	if !r.check(added >= 0, "rr_1k_added_latency_ratio measured (%s)", filepath.Join(out, "results.md")) {
		return nil
	}
	r.say("  what it means: on a 1 KiB round trip sidelane's eBPF capture adds %.0f%% of the latency Istio's iptables", added*100)
	r.say("  capture adds over no mesh (the same haproxy sidecars in both; lower is better, target <= 75%%)")
	return nil
}

// mdTables maps each "## title" of a markdown report to its table rows
// (header and separator included).
func mdTables(md string) map[string][]string {
	out := map[string][]string{}
	title := ""
	for _, l := range strings.Split(md, "\n") {
		switch {
		case strings.HasPrefix(l, "## "):
			title = strings.TrimPrefix(l, "## ")
		case strings.HasPrefix(l, "|") && title != "":
			out[title] = append(out[title], l)
		}
	}
	return out
}

// cells splits a markdown table row.
func cells(row string) []string {
	f := strings.Split(strings.Trim(strings.TrimSpace(row), "|"), "|")
	for i := range f {
		f[i] = strings.TrimSpace(f[i])
	}
	return f
}
