package agent_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/sidelane/sidelane/agent"
	"github.com/sidelane/sidelane/agent/cnirpc"
	"github.com/sidelane/sidelane/agent/store"
)

// recorder is a datapath that records calls and can fail Enroll for a mode.
type recorder struct {
	mu       sync.Mutex
	calls    []string
	failMode string
}

func (r *recorder) Name() string { return "recorder" }
func (r *recorder) Enroll(_ context.Context, e *store.Entry) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, "enroll "+e.Mode)
	if e.Mode == r.failMode {
		return errors.New("boom")
	}
	return nil
}
func (r *recorder) Unenroll(_ context.Context, e store.Entry) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, "unenroll "+e.Mode)
	return nil
}
func (r *recorder) Verify(context.Context, store.Entry) error { return nil }

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
	if got := dp.take(); !slices.Equal(got, []string{"unenroll none", "enroll node"}) {
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

	// A failed move restores the old mode, in the datapath and the store.
	dp.failMode = agent.ModeSidecar
	if _, _, err := a.SetMode(ctx, k, agent.Decision{Mode: agent.ModeSidecar}); err == nil {
		t.Fatal("SetMode to a failing mode succeeded")
	}
	if got := dp.take(); !slices.Equal(got, []string{"unenroll node", "enroll sidecar", "unenroll sidecar", "enroll node"}) {
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
