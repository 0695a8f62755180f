package agent_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sidelane/sidelane/agent"
	"github.com/sidelane/sidelane/agent/datapath"
	"github.com/sidelane/sidelane/agent/store"
)

// A graceful stop leaves the single state file older agents read (a
// rollback keeps every pod), and the next start takes it back into records.
func TestShutdownWritesSnapshotForOlderAgents(t *testing.T) {
	dir := t.TempDir()
	k := store.Key{Network: "n", ContainerID: "c", IfName: "eth0"}
	stoppedAgent(t, dir, k)
	data, err := os.ReadFile(filepath.Join(dir, "state.json"))
	if err != nil {
		t.Fatalf("no snapshot after a graceful stop: %v", err)
	}
	var f struct {
		Version int           `json:"version"`
		Entries []store.Entry `json:"entries"`
	}
	if err := json.Unmarshal(data, &f); err != nil || f.Version != 1 || len(f.Entries) != 1 || f.Entries[0].Key != k {
		t.Fatalf("snapshot %s: %v", data, err)
	}
	again := runAgent(t, dir, datapath.Noop{}, agent.ModeSidecar)
	if _, ok := again.Store().Get(k); !ok {
		t.Fatal("the restarted agent lost the attachment")
	}
	if _, err := os.Stat(filepath.Join(dir, "state.json")); !os.IsNotExist(err) {
		t.Fatalf("snapshot not taken back into records: %v", err)
	}
}

// After the shutdown snapshot nothing changes: a live move or a forget that
// comes later (the in-agent controller stops after Run returns) is refused,
// so the snapshot, the next start's newest truth, stays the truth.
func TestNoChangeAfterShutdownSnapshot(t *testing.T) {
	dir := t.TempDir()
	k := store.Key{Network: "n", ContainerID: "c", IfName: "eth0"}
	a := stoppedAgent(t, dir, k)
	if _, _, err := a.SetMode(context.Background(), k, agent.Decision{Mode: agent.ModeNone, Reason: "late"}); !errors.Is(err, agent.ErrStopped) {
		t.Errorf("SetMode after the snapshot: %v, want ErrStopped", err)
	}
	if err := a.Forget(context.Background(), k); !errors.Is(err, agent.ErrStopped) {
		t.Errorf("Forget after the snapshot: %v, want ErrStopped", err)
	}
	if e, ok := a.Store().Get(k); !ok || e.Mode != agent.ModeSidecar {
		t.Errorf("the store changed after the snapshot: %+v %v", e, ok)
	}
	again := runAgent(t, dir, datapath.Noop{}, agent.ModeSidecar)
	if e, ok := again.Store().Get(k); !ok || e.Mode != agent.ModeSidecar {
		t.Errorf("the next start: %+v %v, want the attachment in sidecar mode", e, ok)
	}
}

// stoppedAgent is an agent in dir that held k in sidecar mode, ran until
// Ready and was then stopped gracefully.
func stoppedAgent(t *testing.T, dir string, k store.Key) *agent.Agent {
	t.Helper()
	a, err := agent.New(agent.Config{Socket: filepath.Join(dir, "s.sock"), StateDir: dir, Datapath: datapath.Noop{},
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Store().Put(store.Entry{Key: k, Mode: agent.ModeSidecar}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if ok, _ := a.Ready(); ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("agent not ready")
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	return a
}
