// Package agent is sidelane's node agent: it serves the CNI plugin over a
// Unix socket, keeps the pod state store and drives the datapath.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sidelane/sidelane/agent/cnirpc"
	"github.com/sidelane/sidelane/agent/datapath"
	"github.com/sidelane/sidelane/agent/datapath/netnsgroup"
	"github.com/sidelane/sidelane/agent/metrics"
	"github.com/sidelane/sidelane/agent/store"
)

// Defaults shared by the agent and the plugin's config.
const (
	DefaultSocket   = "/var/run/sidelane/cni.sock"
	DefaultStateDir = "/var/run/sidelane"
)

// Config is what the agent needs from its caller.
type Config struct {
	Socket   string
	StateDir string
	Log      *slog.Logger
	Datapath datapath.Datapath
	// Classifier defaults to StaticClassifier{Mode: ModeNone}.
	Classifier Classifier
	// L7 reports the L7 policy selecting a pod, for explain (nil: the
	// agent compiles no policies).
	L7 func(namespace, name string) *cnirpc.ExplainedL7
	// RequestTimeout bounds one plugin request (default 10s).
	RequestTimeout time.Duration
	// SocketAllowUIDs are the peer uids the socket serves besides the
	// agent's own (nil: root only; see cnirpc.Server.AllowUIDs).
	SocketAllowUIDs []uint32
	// Metrics may be nil.
	Metrics *metrics.Metrics
	// Startup runs after the socket is up and the persisted attachments are
	// re-verified, and before the agent reports ready: until it returns,
	// ADD fails with a retry error (fail closed). The Kubernetes controller
	// syncs its informers and reconciles the node's pods here. An error
	// stops the agent.
	Startup func(ctx context.Context) error
	// OnReady runs once the agent is ready (e.g. to remove the node taint).
	OnReady func(ctx context.Context)
}

// Agent is one running node agent.
type Agent struct {
	cfg    Config
	store  *store.Store
	server *cnirpc.Server
	ready  atomic.Bool
	reason atomic.Value // string
	// locks order changes to an attachment's datapath state and store
	// entry: CNI ADD/DEL/GC and live mode moves of one sandbox must not
	// interleave, or a move could re-enroll an attachment DEL just
	// removed. Different sandboxes change in parallel.
	locks *attachLocks
	// life orders live changes (SetMode, Forget: they hold it shared)
	// before the shutdown snapshot (exclusive): the snapshot is the next
	// start's newest truth, so once it is written nothing changes.
	life    sync.RWMutex
	stopped bool
}

// ErrStopped: the agent has written its shutdown snapshot and changes nothing more.
var ErrStopped = errors.New("agent stopped")

// New loads the persisted state and prepares the socket server.
func New(cfg Config) (*Agent, error) {
	if cfg.Socket == "" {
		cfg.Socket = DefaultSocket
	}
	if cfg.StateDir == "" {
		cfg.StateDir = DefaultStateDir
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Datapath == nil {
		cfg.Datapath = datapath.Noop{}
	}
	if cfg.Classifier == nil {
		cfg.Classifier = StaticClassifier{Mode: ModeNone, Reason: "no classifier configured"}
	}
	st, err := store.Open(filepath.Join(cfg.StateDir, "state.json"))
	if err != nil {
		return nil, fmt.Errorf("open pod state: %w", err)
	}
	// Several attachments of one netns (Multus) share its datapath state.
	cfg.Datapath = netnsgroup.New(cfg.Datapath, st.Container)
	a := &Agent{cfg: cfg, store: st, locks: newAttachLocks()}
	a.reason.Store("starting")
	a.server = &cnirpc.Server{
		Socket:  cfg.Socket,
		Log:     cfg.Log,
		Timeout: cfg.RequestTimeout,
		// Refused peers count as errors of op "socket_peer".
		AllowUIDs: cfg.SocketAllowUIDs,
		Refused:   func(cnirpc.Peer) { cfg.Metrics.Error("socket_peer") },
		Handler: &cniHandler{
			log:        cfg.Log,
			store:      st,
			datapath:   cfg.Datapath,
			classifier: cfg.Classifier,
			l7:         cfg.L7,
			readiness:  a,
			now:        time.Now,
			locks:      a.locks,
			metrics:    cfg.Metrics,
		},
	}
	return a, nil
}

// Store exposes the pod state (read-mostly; tests and explain use it).
func (a *Agent) Store() *store.Store { return a.store }

// Ready implements Readiness.
func (a *Agent) Ready() (bool, string) {
	if a.ready.Load() {
		return true, ""
	}
	return false, a.reason.Load().(string)
}

// SetReady flips readiness; reason says why the agent is not ready.
func (a *Agent) SetReady(ready bool, reason string) {
	a.reason.Store(reason)
	a.ready.Store(ready)
}

// Run listens on the socket and serves until ctx ends. The agent reports
// ready once every persisted attachment has been re-verified with the
// datapath and Config.Startup has returned; until then the socket answers
// and ADD fails with a retry error.
func (a *Agent) Run(ctx context.Context) error {
	if err := a.server.Listen(); err != nil {
		return err
	}
	defer a.server.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- a.server.Serve(ctx) }()

	a.SetReady(false, "re-verifying persisted pods")
	a.reconcile(ctx)
	if a.cfg.Startup != nil {
		a.SetReady(false, "waiting for the Kubernetes cache and pod reconcile")
		if err := a.cfg.Startup(ctx); err != nil {
			a.SetReady(false, "startup failed")
			cancel()
			<-served
			return fmt.Errorf("agent startup: %w", err)
		}
	}
	a.SetReady(true, "")
	a.cfg.Log.Info("agent ready", "socket", a.cfg.Socket, "datapath", a.cfg.Datapath.Name(), "attachments", len(a.store.List()))
	if a.cfg.OnReady != nil {
		a.cfg.OnReady(ctx)
	}
	err := <-served
	a.SetReady(false, "shutting down")
	// For a rollback to a version before per-attachment records (O(pods),
	// once, off the ADD path); this version's next start takes it back.
	// The CNI server has drained; a live move still running finishes
	// first, and later ones are refused.
	a.life.Lock()
	a.stopped = true
	if serr := a.store.WriteLegacy(); serr != nil {
		a.cfg.Log.Error("write the state snapshot for older agents", "error", serr)
	}
	a.life.Unlock()
	return err
}

// Datapath is the backend in use.
func (a *Agent) Datapath() datapath.Datapath { return a.cfg.Datapath }

// SetMode moves a running attachment to dec's mode (or updates its capture
// settings) with one datapath Move, in place: every new connection is
// captured under the old or the new mode, never by neither (only a move to
// none stops capture, which is what none means). It reports whether
// anything changed. The store says what the datapath does: it records the
// new mode only once the move succeeded, and when that write fails the
// datapath is moved back. A failed move is logged and counted
// (sidelane_errors_total{op="move"}; op="move_not_restored" when the old
// state could not be put back either, which the next move repairs).
func (a *Agent) SetMode(ctx context.Context, k store.Key, dec Decision) (old store.Entry, changed bool, err error) {
	a.life.RLock()
	defer a.life.RUnlock()
	if a.stopped {
		return store.Entry{}, false, fmt.Errorf("move %s: %w", k, ErrStopped)
	}
	defer a.locks.sandbox(k.ContainerID)()
	e, ok := a.store.Get(k)
	if !ok {
		return store.Entry{}, false, fmt.Errorf("attachment %s: %w", k, ErrUnknownAttachment)
	}
	if e.Mode == dec.Mode && reflect.DeepEqual(e.Capture, dec.Capture) {
		if e.Reason != dec.Reason {
			e.Reason = dec.Reason
			if err := a.store.Put(e); err != nil {
				return e, false, err
			}
		}
		return e, false, nil
	}
	next := e
	next.Mode, next.Reason, next.Capture = dec.Mode, dec.Reason, dec.Capture
	if err := a.cfg.Datapath.Move(ctx, e, &next); err != nil {
		err = fmt.Errorf("move %s from %s to %s mode: %w", k, e.Mode, dec.Mode, err)
		msg := "live mode move failed; the old mode stays in force"
		if errors.Is(err, datapath.ErrNotRestored) {
			msg = "live mode move failed and the old mode could not be restored either"
		}
		a.moveFailed(e, next, err, msg)
		return e, false, err
	}
	if err := a.store.Put(next); err != nil {
		err = fmt.Errorf("record attachment %s: %w", k, err)
		back := e
		berr := a.cfg.Datapath.Move(ctx, next, &back)
		if berr == nil {
			a.moveFailed(e, next, err, "live mode move not recorded; moved back, the old mode stays in force")
			return e, false, err
		}
		err = fmt.Errorf("%w; move back to %s mode: %w", err, e.Mode, berr)
		a.moveFailed(e, next, err, "live mode move not recorded and not undone: the datapath runs the new mode (or, not restored, neither) while the store records the old")
		return e, false, err
	}
	return e, true, nil
}

// moveFailed logs and counts a failed live move.
func (a *Agent) moveFailed(from, to store.Entry, err error, msg string) {
	op := "move"
	if errors.Is(err, datapath.ErrNotRestored) {
		op = "move_not_restored"
	}
	a.cfg.Metrics.Error(op)
	a.cfg.Log.Error(msg, "attachment", from.Key.String(), "from", from.Mode, "to", to.Mode, "error", err)
}

// Forget unenrolls and removes an attachment whose pod no longer exists
// (deleted while the agent was down, so its DEL was lost).
func (a *Agent) Forget(ctx context.Context, k store.Key) error {
	a.life.RLock()
	defer a.life.RUnlock()
	if a.stopped {
		return fmt.Errorf("forget %s: %w", k, ErrStopped)
	}
	defer a.locks.sandbox(k.ContainerID)()
	e, ok := a.store.Get(k)
	if !ok {
		return nil
	}
	if err := a.cfg.Datapath.Unenroll(ctx, e); err != nil {
		return fmt.Errorf("unenroll %s: %w", k, err)
	}
	if _, _, err := a.store.Delete(k); err != nil {
		return fmt.Errorf("forget attachment: %w", err)
	}
	return nil
}

// ErrUnknownAttachment: the store has no such attachment (DEL won a race).
var ErrUnknownAttachment = errors.New("no such attachment")

// reconcile re-applies the datapath for every persisted attachment, so state
// lost while the agent was down (or never applied) is restored.
func (a *Agent) reconcile(ctx context.Context) {
	for _, e := range a.store.List() {
		if err := a.cfg.Datapath.Verify(ctx, e); err == nil {
			continue
		}
		e := e
		if err := a.cfg.Datapath.Enroll(ctx, &e); err != nil {
			if errors.Is(err, store.ErrNetnsReplaced) {
				// The path names another netns now (pid reuse): the pod's
				// own is gone, and with it the pod; its DEL was lost.
				a.cfg.Log.Warn("forget attachment: its netns is gone", "attachment", e.Key.String(), "netns", e.Netns)
				if err := a.cfg.Datapath.Unenroll(ctx, e); err != nil {
					a.cfg.Log.Error("unenroll attachment", "attachment", e.Key.String(), "error", err)
					continue
				}
				if _, _, err := a.store.Delete(e.Key); err != nil {
					a.cfg.Log.Error("forget attachment", "attachment", e.Key.String(), "error", err)
				}
				continue
			}
			a.cfg.Log.Error("re-enroll attachment", "attachment", e.Key.String(), "error", err)
			continue
		}
		if err := a.store.Put(e); err != nil {
			a.cfg.Log.Error("record attachment", "attachment", e.Key.String(), "error", err)
		}
	}
}
