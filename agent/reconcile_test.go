package agent_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/sidelane/sidelane/agent"
	"github.com/sidelane/sidelane/agent/store"
)

// replacedDP says every recorded netns now names another one.
type replacedDP struct {
	recorder
	unenrolled []store.Key
}

func (d *replacedDP) Verify(context.Context, store.Entry) error { return errors.New("differs") }
func (d *replacedDP) Enroll(_ context.Context, e *store.Entry) error {
	return fmt.Errorf("netns %s: %w", e.Netns, store.ErrNetnsReplaced)
}
func (d *replacedDP) Unenroll(_ context.Context, e store.Entry) error {
	d.unenrolled = append(d.unenrolled, e.Key)
	return nil
}

// At startup, an attachment whose netns path now names another netns (its
// pod is gone, the pid reused) is unenrolled by its recorded state and
// forgotten, rather than kept (and retried) for ever.
func TestReconcileForgetsReplacedNetns(t *testing.T) {
	dir := t.TempDir()
	st, err := store.Open(filepath.Join(dir, "state.json"))
	if err != nil {
		t.Fatal(err)
	}
	k := store.Key{Network: "n", ContainerID: "c", IfName: "eth0"}
	if err := st.Put(store.Entry{Key: k, Netns: "/proc/4242/ns/net", Mode: agent.ModeSidecar, NetnsCookie: 7}); err != nil {
		t.Fatal(err)
	}
	dp := &replacedDP{}
	a := runAgent(t, dir, dp, agent.ModeNone)
	if _, ok := a.Store().Get(k); ok {
		t.Error("attachment with a replaced netns still recorded after startup")
	}
	if len(dp.unenrolled) != 1 || dp.unenrolled[0] != k {
		t.Errorf("unenrolled %v, want %v", dp.unenrolled, k)
	}
}
