package run

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"runtime"
	"time"

	"github.com/sidelane/sidelane/bench/loadgen"
)

// hostProbeCount is the round trips of one host probe: about 0.1 s on a
// quiet host, a few seconds on a busy one.
const hostProbeCount = 5000

// hostProbe measures the host itself: 1 KiB round trips over the host's
// loopback between two sidelane-bench processes, no pod, no proxy, on
// the cores the traffic scenarios pin clients and servers to. Every
// contender's figures move with it, and so does a full run's length
// (rr rounds are counted in round trips), so the results record it at the
// start and the end of the run: a busy host shows here before it shows
// as wide intervals.
func (r *Runner) hostProbe(ctx context.Context) (loadgen.Percentiles, error) {
	port, err := freePort()
	if err != nil {
		return loadgen.Percentiles{}, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	srvCtx, stop := context.WithCancel(ctx)
	defer stop()
	srv := r.probeCmd(srvCtx, "1", "serve", "-listen", addr)
	if err := srv.Start(); err != nil {
		return loadgen.Percentiles{}, fmt.Errorf("start the probe's server: %w", err)
	}
	defer func() { stop(); _ = srv.Wait() }()
	var lastErr error
	// The server needs a moment to listen; a refused dial is retried.
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		var out, stderr bytes.Buffer
		cl := r.probeCmd(ctx, "0", "rr", "-addr", addr, "-size", "1024", "-count", fmt.Sprint(hostProbeCount))
		cl.Stdout, cl.Stderr = &out, &stderr
		if lastErr = cl.Run(); lastErr == nil {
			var res ClientResult
			if err := json.Unmarshal(out.Bytes(), &res); err != nil {
				return loadgen.Percentiles{}, fmt.Errorf("probe output %q: %w", out.String(), err)
			}
			return loadgen.Summarize(durations(res.LatNs)), nil
		}
		lastErr = fmt.Errorf("%w: %s", lastErr, bytes.TrimSpace(stderr.Bytes()))
		select {
		case <-ctx.Done():
			return loadgen.Percentiles{}, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return loadgen.Percentiles{}, fmt.Errorf("probe client: %w", lastErr)
}

// probeCmd runs sidelane-bench, on core cpu when the run pins cores.
func (r *Runner) probeCmd(ctx context.Context, cpu string, args ...string) *exec.Cmd {
	if r.cfg.PinCPUs && runtime.NumCPU() >= 2 {
		if taskset, err := exec.LookPath("taskset"); err == nil {
			return exec.CommandContext(ctx, taskset, append([]string{"-c", cpu, r.cfg.BenchBin}, args...)...)
		}
	}
	return exec.CommandContext(ctx, r.cfg.BenchBin, args...)
}

// recordHostProbe runs the probe and notes it in the results' machine
// notes under "host_probe" (when "start" or "end" of the run); a probe
// that fails is noted as such and does not fail the run.
func (r *Runner) recordHostProbe(ctx context.Context, when string) {
	p, err := r.hostProbe(ctx)
	note := hostProbeNote(when, p, err)
	r.addNote("host_probe", note)
	r.log.Info("host probe", "note", note)
}

func hostProbeNote(when string, p loadgen.Percentiles, err error) string {
	if err != nil {
		return fmt.Sprintf("%s: failed: %v", when, err)
	}
	return fmt.Sprintf("%s: loopback 1 KiB rr p50 %.1f µs, p99 %.1f µs (%d round trips, no pod or proxy)", when, p.P50us, p.P99us, p.Count)
}
