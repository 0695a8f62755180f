// Package datapath defines what the agent asks of a traffic-capture backend.
// Backends (eBPF, iptables) implement Datapath; the agent picks one at start.
package datapath

import (
	"context"
	"errors"
	"time"

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
	// Move changes a running attachment from old (what Enroll or Move
	// last applied) to next (another mode, or other capture settings) in
	// place: at every moment each new connection is captured under old or
	// under next, never by neither. Only a move to a mode the backend
	// captures nothing in removes the capture (that is what such a mode
	// means). Like Enroll it may fill in next's datapath fields. On error
	// the old state is back in place, unless the error wraps
	// ErrNotRestored.
	Move(ctx context.Context, old store.Entry, next *store.Entry) error
}

// ErrNotRestored: a failed Move could not put the old state back either;
// the attachment's datapath state is neither old nor next until the next
// successful Enroll or Move.
var ErrNotRestored = errors.New("old capture not restored")

// Noop captures nothing. It is the backend for pods in mode "none" and for
// running the agent's protocol without a datapath.
type Noop struct{}

func (Noop) Name() string                                          { return "noop" }
func (Noop) Enroll(context.Context, *store.Entry) error            { return nil }
func (Noop) Unenroll(context.Context, store.Entry) error           { return nil }
func (Noop) Verify(context.Context, store.Entry) error             { return nil }
func (Noop) Move(context.Context, store.Entry, *store.Entry) error { return nil }

// CounterReader is implemented by datapaths that keep per-pod counters
// (e.g. eBPF map counters); `sidelane explain` shows them.
type CounterReader interface {
	Counters(ctx context.Context, e store.Entry) (map[string]uint64, error)
}

// PhaseFunc receives how long one phase of a CNI ADD took (see WithPhases).
type PhaseFunc func(phase string, d time.Duration)

type phaseKey struct{}

// WithPhases returns ctx carrying f: backends report the phases of their
// Enroll to it (Phase), so the agent can break an ADD's time down
// (sidelane_cni_add_phase_seconds{phase}) without the Datapath interface
// knowing about metrics.
func WithPhases(ctx context.Context, f PhaseFunc) context.Context {
	return context.WithValue(ctx, phaseKey{}, f)
}

// Phase reports that phase ran from start until now, when ctx carries a
// PhaseFunc; it returns now, the next phase's start.
func Phase(ctx context.Context, phase string, start time.Time) time.Time {
	now := time.Now()
	if f, ok := ctx.Value(phaseKey{}).(PhaseFunc); ok && f != nil {
		f(phase, now.Sub(start))
	}
	return now
}
