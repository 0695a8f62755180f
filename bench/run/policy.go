package run

import (
	"context"
	"time"

	"github.com/sidelane/sidelane/agent/xds/xdsbench"
	"github.com/sidelane/sidelane/bench/report"
)

// policyUpdate times a policy change until a real grpc-go xDS client ACKs
// the agent's new snapshot (agent/xds/xdsbench).
func (r *Runner) policyUpdate(ctx context.Context) error {
	n := 200
	if r.cfg.Quick {
		n = 50
	}
	res, err := xdsbench.Measure(ctx, n)
	if err != nil {
		return err
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	r.res.Add("policy_update", report.Sidelane, "p50ms", ms(res.P50), "ms")
	r.res.Add("policy_update", report.Sidelane, "p99ms", ms(res.P99), "ms")
	r.log.Info("policy propagation", "result", res.String())
	return nil
}
