// Package agent is sidelane's node agent: it serves the CNI plugin over a
// Unix socket, keeps the pod state store and drives the datapath.
package agent

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/sidelane/sidelane/agent/cnirpc"
	"github.com/sidelane/sidelane/agent/datapath"
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
	// RequestTimeout bounds one plugin request (default 10s).
	RequestTimeout time.Duration
}

// Agent is one running node agent.
type Agent struct {
	cfg    Config
	store  *store.Store
	server *cnirpc.Server
	ready  atomic.Bool
	reason atomic.Value // string
}

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
	a := &Agent{cfg: cfg, store: st}
	a.reason.Store("starting")
	a.server = &cnirpc.Server{
		Socket:  cfg.Socket,
		Log:     cfg.Log,
		Timeout: cfg.RequestTimeout,
		Handler: &cniHandler{
			log:        cfg.Log,
			store:      st,
			datapath:   cfg.Datapath,
			classifier: cfg.Classifier,
			readiness:  a,
			now:        time.Now,
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
// ready once the socket is up and every persisted attachment has been
// re-verified with the datapath.
func (a *Agent) Run(ctx context.Context) error {
	if err := a.server.Listen(); err != nil {
		return err
	}
	defer a.server.Close()
	a.reconcile(ctx)
	a.SetReady(true, "")
	a.cfg.Log.Info("agent ready", "socket", a.cfg.Socket, "datapath", a.cfg.Datapath.Name(), "attachments", len(a.store.List()))
	err := a.server.Serve(ctx)
	a.SetReady(false, "shutting down")
	return err
}

// reconcile re-applies the datapath for every persisted attachment, so state
// lost while the agent was down (or never applied) is restored.
func (a *Agent) reconcile(ctx context.Context) {
	for _, e := range a.store.List() {
		if err := a.cfg.Datapath.Verify(ctx, e); err == nil {
			continue
		}
		e := e
		if err := a.cfg.Datapath.Enroll(ctx, &e); err != nil {
			a.cfg.Log.Error("re-enroll attachment", "attachment", e.Key.String(), "error", err)
			continue
		}
		if err := a.store.Put(e); err != nil {
			a.cfg.Log.Error("record attachment", "attachment", e.Key.String(), "error", err)
		}
	}
}
