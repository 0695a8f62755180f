package agent_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sidelane/sidelane/agent"
	"github.com/sidelane/sidelane/agent/cnirpc"
	"github.com/sidelane/sidelane/agent/datapath"
	"github.com/sidelane/sidelane/agent/metrics"
	"github.com/sidelane/sidelane/agent/store"
)

// recorder is a datapath that records calls, keeps the state it would have
// applied per attachment (its mode, or "broken" after a move it could not
// undo) and fails Enroll for failMode, or Move as failMove says.
type recorder struct {
	mu       sync.Mutex
	calls    []string
	state    map[store.Key]string
	failMode string
	failMove func(old, next store.Entry) error
}

func (r *recorder) Name() string { return "recorder" }
func (r *recorder) Enroll(_ context.Context, e *store.Entry) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, "enroll "+e.Mode)
	if e.Mode == r.failMode {
		return errors.New("boom")
	}
	r.set(e.Key, e.Mode)
	return nil
}
func (r *recorder) Unenroll(_ context.Context, e store.Entry) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, "unenroll "+e.Mode)
	delete(r.state, e.Key)
	return nil
}
func (r *recorder) Verify(context.Context, store.Entry) error { return nil }
func (r *recorder) Move(_ context.Context, old store.Entry, next *store.Entry) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, "move "+old.Mode+" "+next.Mode)
	if r.failMove != nil {
		if err := r.failMove(old, *next); err != nil {
			if errors.Is(err, datapath.ErrNotRestored) {
				r.set(old.Key, "broken")
			}
			return err
		}
	}
	r.set(next.Key, next.Mode)
	return nil
}

func (r *recorder) set(k store.Key, mode string) {
	if r.state == nil {
		r.state = map[store.Key]string{}
	}
	r.state[k] = mode
}

func (r *recorder) applied(k store.Key) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.state[k]
}

func (r *recorder) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := r.calls
	r.calls = nil
	return c
}

func TestSetModeAndStartup(t *testing.T) {
	dir := t.TempDir()
	dp := &recorder{}
	release := make(chan struct{})
	a, err := agent.New(agent.Config{
		Socket: filepath.Join(dir, "s.sock"), StateDir: dir, Datapath: dp,
		Log:        slog.New(slog.NewTextHandler(io.Discard, nil)),
		Classifier: agent.StaticClassifier{Mode: agent.ModeNone, Reason: "static"},
		Startup:    func(ctx context.Context) error { <-release; return nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	defer func() { cancel(); <-done }()

	c := cnirpc.Client{Socket: filepath.Join(dir, "s.sock"), Timeout: 5 * time.Second}
	req := cnirpc.Request{Op: cnirpc.OpAdd, Network: "n", Attachment: cnirpc.Attachment{ContainerID: "c", IfName: "eth0"}, Netns: "/x",
		Pod: cnirpc.PodRef{Namespace: "ns", Name: "p"}}
	// While Startup runs the socket answers, and ADD fails retryably.
	var rep *cnirpc.Reply
	for deadline := time.Now().Add(10 * time.Second); ; {
		rep, err = c.Do(context.Background(), req)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil || rep.OK || !rep.Retry {
		t.Fatalf("ADD during startup: %v %+v, want a retryable failure", err, rep)
	}
	close(release)
	for deadline := time.Now().Add(10 * time.Second); ; {
		if ok, _ := a.Ready(); ok || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if rep, err = c.Do(context.Background(), req); err != nil || !rep.OK || rep.Mode != agent.ModeNone {
		t.Fatalf("ADD after startup: %v %+v", err, rep)
	}
	dp.take()
	k := store.Key{Network: "n", ContainerID: "c", IfName: "eth0"}

	old, changed, err := a.SetMode(ctx, k, agent.Decision{Mode: agent.ModeNode, Reason: "ambient"})
	if err != nil || !changed || old.Mode != agent.ModeNone {
		t.Fatalf("SetMode none->node: %+v %v %v", old, changed, err)
	}
	if got := dp.take(); !slices.Equal(got, []string{"move none node"}) {
		t.Errorf("datapath calls %v", got)
	}
	if e, _ := a.Store().Get(k); e.Mode != agent.ModeNode || e.Reason != "ambient" {
		t.Errorf("stored %+v", e)
	}

	// Same mode, new reason: no datapath work.
	if _, changed, err := a.SetMode(ctx, k, agent.Decision{Mode: agent.ModeNode, Reason: "other"}); err != nil || changed {
		t.Fatalf("same-mode SetMode changed=%v err=%v", changed, err)
	}
	if got := dp.take(); len(got) != 0 {
		t.Errorf("datapath calls for a reason-only change: %v", got)
	}

	// A failed move keeps the old mode, in the datapath and the store.
	dp.failMove = func(_, next store.Entry) error {
		if next.Mode == agent.ModeSidecar {
			return errors.New("boom")
		}
		return nil
	}
	if _, _, err := a.SetMode(ctx, k, agent.Decision{Mode: agent.ModeSidecar}); err == nil {
		t.Fatal("SetMode to a failing mode succeeded")
	}
	if got := dp.take(); !slices.Equal(got, []string{"move node sidecar"}) {
		t.Errorf("datapath calls on a failed move %v", got)
	}
	if e, _ := a.Store().Get(k); e.Mode != agent.ModeNode {
		t.Errorf("stored mode after a failed move %q, want node", e.Mode)
	}

	if err := a.Forget(ctx, k); err != nil {
		t.Fatal(err)
	}
	if _, ok := a.Store().Get(k); ok {
		t.Error("Forget left the entry")
	}
	if _, _, err := a.SetMode(ctx, k, agent.Decision{Mode: agent.ModeNone}); !errors.Is(err, agent.ErrUnknownAttachment) {
		t.Errorf("SetMode of a forgotten attachment: %v", err)
	}
}

// errorsTotal reads sidelane_errors_total{op} from m.
func errorsTotal(t *testing.T, m *metrics.Metrics, op string) float64 {
	t.Helper()
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "sidelane_errors_total" {
			continue
		}
		for _, mt := range mf.GetMetric() {
			for _, l := range mt.GetLabel() {
				if l.GetName() == "op" && l.GetValue() == op {
					return mt.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

// A live move that fails at any step leaves the datapath and the store
// agreeing on the old mode (or, when even the old state cannot be put
// back, says so), and is logged and counted.
func TestSetModeErrorPaths(t *testing.T) {
	boom := errors.New("map full")
	tests := []struct {
		name string
		// failMove fails the recorder's Move; brokenStore makes writing
		// the state file fail.
		failMove    func(old, next store.Entry) error
		brokenStore bool
		wantCalls   []string
		wantErr     []error
		wantApplied string // the datapath's state afterwards
		wantOp      string // the errors_total op counted
		wantLog     string
	}{{
		name:        "move fails, old state restored",
		failMove:    func(_, _ store.Entry) error { return boom },
		wantCalls:   []string{"move sidecar node"},
		wantErr:     []error{boom},
		wantApplied: agent.ModeSidecar,
		wantOp:      "move",
		wantLog:     "the old mode stays in force",
	}, {
		name:        "move fails and cannot restore",
		failMove:    func(_, _ store.Entry) error { return fmt.Errorf("%w: %w", boom, datapath.ErrNotRestored) },
		wantCalls:   []string{"move sidecar node"},
		wantErr:     []error{boom, datapath.ErrNotRestored},
		wantApplied: "broken",
		wantOp:      "move_not_restored",
		wantLog:     "could not be restored",
	}, {
		name:        "state write fails, datapath moved back",
		brokenStore: true,
		wantCalls:   []string{"move sidecar node", "move node sidecar"},
		wantApplied: agent.ModeSidecar,
		wantOp:      "move",
		wantLog:     "moved back",
	}, {
		name: "state write fails and moving back fails",
		failMove: func(_, next store.Entry) error {
			if next.Mode == agent.ModeSidecar {
				return boom
			}
			return nil
		},
		brokenStore: true,
		wantCalls:   []string{"move sidecar node", "move node sidecar"},
		wantErr:     []error{boom},
		wantApplied: agent.ModeNode,
		wantOp:      "move",
		wantLog:     "the datapath runs the new mode",
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			dp := &recorder{}
			var logs bytes.Buffer
			m := metrics.New(nil)
			a, err := agent.New(agent.Config{Socket: filepath.Join(dir, "s.sock"), StateDir: dir, Datapath: dp,
				Log: slog.New(slog.NewTextHandler(&logs, nil)), Metrics: m})
			if err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			k := store.Key{Network: "n", ContainerID: "c", IfName: "eth0"}
			e := store.Entry{Key: k, Netns: "/x", Mode: agent.ModeSidecar, Reason: "injected"}
			if err := dp.Enroll(ctx, &e); err != nil {
				t.Fatal(err)
			}
			if err := a.Store().Put(e); err != nil {
				t.Fatal(err)
			}
			dp.take()
			dp.failMove = tt.failMove
			if tt.brokenStore {
				// The attachment's record turns into a non-empty
				// directory: replacing it fails.
				state := a.Store().RecordPath(k)
				if err := os.Remove(state); err != nil {
					t.Fatal(err)
				}
				if err := os.MkdirAll(filepath.Join(state, "x"), 0o700); err != nil {
					t.Fatal(err)
				}
			}

			old, changed, err := a.SetMode(ctx, k, agent.Decision{Mode: agent.ModeNode, Reason: "ambient"})
			if err == nil || changed || old.Mode != agent.ModeSidecar {
				t.Fatalf("SetMode = %+v, changed %v, err %v; want the old entry, unchanged, an error", old, changed, err)
			}
			for _, want := range tt.wantErr {
				if !errors.Is(err, want) {
					t.Errorf("error %v does not wrap %v", err, want)
				}
			}
			if got := dp.take(); !slices.Equal(got, tt.wantCalls) {
				t.Errorf("datapath calls %v, want %v", got, tt.wantCalls)
			}
			if got := dp.applied(k); got != tt.wantApplied {
				t.Errorf("datapath state %q, want %q", got, tt.wantApplied)
			}
			if st, _ := a.Store().Get(k); st.Mode != agent.ModeSidecar || st.Reason != "injected" {
				t.Errorf("stored %s/%q after a failed move, want the old sidecar/injected", st.Mode, st.Reason)
			}
			if got := errorsTotal(t, m, tt.wantOp); got != 1 {
				t.Errorf("errors_total{op=%q} = %v, want 1", tt.wantOp, got)
			}
			if !strings.Contains(logs.String(), tt.wantLog) || !strings.Contains(logs.String(), "level=ERROR") {
				t.Errorf("log %q, want an error saying %q", logs.String(), tt.wantLog)
			}

			// The next move (the controller retries) succeeds and
			// repairs whatever the failed one left.
			dp.failMove = nil
			if tt.brokenStore {
				if err := os.RemoveAll(a.Store().RecordPath(k)); err != nil {
					t.Fatal(err)
				}
			}
			if _, changed, err := a.SetMode(ctx, k, agent.Decision{Mode: agent.ModeNode, Reason: "ambient"}); err != nil || !changed {
				t.Fatalf("retried SetMode: changed %v, %v", changed, err)
			}
			if got := dp.applied(k); got != agent.ModeNode {
				t.Errorf("datapath state after the retry %q, want node", got)
			}
			if st, _ := a.Store().Get(k); st.Mode != agent.ModeNode {
				t.Errorf("stored %s after the retry, want node", st.Mode)
			}
		})
	}
}
