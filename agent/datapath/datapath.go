// Package datapath defines what the agent asks of a traffic-capture backend.
// Backends (eBPF, iptables) implement Datapath; the agent picks one at start.
package datapath

import (
	"context"

	"github.com/sidelane/sidelane/agent/store"
)

// Datapath captures (or stops capturing) one pod attachment's traffic.
// Every method must be idempotent: the agent calls them again on restart
// and on every reconcile.
type Datapath interface {
	// Name is the backend's name as shown in logs, metrics and explain.
	Name() string
	// Enroll applies the capture for e.Mode. It may fill in e's
	// datapath fields (e.g. NetnsCookie) before the agent persists it.
	Enroll(ctx context.Context, e *store.Entry) error
	// Unenroll removes everything Enroll did. The netns may be gone.
	Unenroll(ctx context.Context, e store.Entry) error
	// Verify reports whether Enroll's state is still fully in place.
	Verify(ctx context.Context, e store.Entry) error
}

// Noop captures nothing. It is the backend for pods in mode "none" and for
// running the agent's protocol without a datapath.
type Noop struct{}

func (Noop) Name() string                                { return "noop" }
func (Noop) Enroll(context.Context, *store.Entry) error  { return nil }
func (Noop) Unenroll(context.Context, store.Entry) error { return nil }
func (Noop) Verify(context.Context, store.Entry) error   { return nil }

// CounterReader is implemented by datapaths that keep per-pod counters
// (e.g. eBPF map counters); `sidelane explain` shows them.
type CounterReader interface {
	Counters(ctx context.Context, e store.Entry) (map[string]uint64, error)
}
