package agent_test

import (
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/sidelane/sidelane/agent"
	"github.com/sidelane/sidelane/agent/datapath"
)

// runAgent runs an agent on dir (socket s.sock, state there) with dp and
// a static classifier giving mode, waits until it is ready and stops it
// when the test ends.
func runAgent(t *testing.T, dir string, dp datapath.Datapath, mode string) *agent.Agent {
	t.Helper()
	a, err := agent.New(agent.Config{
		Socket: filepath.Join(dir, "s.sock"), StateDir: dir, Datapath: dp,
		Log:        slog.New(slog.NewTextHandler(io.Discard, nil)),
		Classifier: agent.StaticClassifier{Mode: mode, Reason: "static"},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if ok, _ := a.Ready(); ok {
			return a
		}
		if time.Now().After(deadline) {
			t.Fatal("agent not ready")
		}
	}
}
