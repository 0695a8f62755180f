package ebpf

import (
	"context"
	"time"

	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/bpf"
)

// DefaultRepairInterval is how often the agent checks its attachments: a
// link another process detached is back within this plus one check (a
// few milliseconds), well inside 5 s. Detaching a BPF link raises no
// netlink event, so there is nothing cheaper to wait on than a timer.
const DefaultRepairInterval = 2 * time.Second

// Repairer puts back what another process broke (*bpf.Capture).
type Repairer interface {
	Repair(inbound []bpf.Inbound) ([]bpf.Repaired, error)
}

// Repair checks the datapath's links and pins once and re-attaches what is
// missing, including the inbound tc link of every entry that has one. It
// does nothing over a backend that cannot repair (test fakes).
func (d *Datapath) Repair(entries []store.Entry) ([]bpf.Repaired, error) {
	r, ok := d.pods.(Repairer)
	if !ok {
		return nil, nil
	}
	var in []bpf.Inbound
	for _, e := range entries {
		if e.NetnsCookie != 0 && inboundOn(e) {
			in = append(in, bpf.Inbound{NetnsPath: e.Netns, Netns: e.NetnsCookie, IfName: e.IfName})
		}
	}
	return r.Repair(in)
}

// WatchRepairs runs Repair every interval until ctx ends, with the agent's
// entries at that moment, and calls report for each repair (the agent
// counts it and records a node Event; bpf.Capture logs it). A failed check
// is logged and retried at the next tick.
func (d *Datapath) WatchRepairs(ctx context.Context, interval time.Duration, entries func() []store.Entry, report func(bpf.Repaired)) {
	if interval <= 0 {
		return
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			done, err := d.Repair(entries())
			for _, r := range done {
				report(r)
			}
			if err != nil {
				d.log.Error("check eBPF datapath attachments", "error", err)
			}
		}
	}
}
