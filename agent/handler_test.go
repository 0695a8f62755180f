package agent

import (
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sidelane/sidelane/agent/cnirpc"
	"github.com/sidelane/sidelane/agent/store"
)

// fakeDatapath records enrolments; failEnroll makes Enroll fail after
// recording, to check the handler undoes it.
type fakeDatapath struct {
	enrolled   map[store.Key]bool
	failEnroll bool
}

func (f *fakeDatapath) Name() string { return "fake" }
func (f *fakeDatapath) Enroll(_ context.Context, e *store.Entry) error {
	f.enrolled[e.Key] = true
	if f.failEnroll {
		return errors.New("map full")
	}
	return nil
}
func (f *fakeDatapath) Unenroll(_ context.Context, e store.Entry) error {
	delete(f.enrolled, e.Key)
	return nil
}
func (f *fakeDatapath) Verify(_ context.Context, e store.Entry) error {
	if !f.enrolled[e.Key] {
		return errors.New("not enrolled")
	}
	return nil
}

type readyFlag bool

func (r readyFlag) Ready() (bool, string) { return bool(r), "informers not synced" }

func newHandler(t *testing.T, ready bool) (*cniHandler, *fakeDatapath) {
	st, err := store.Open(filepath.Join(t.TempDir(), "state.json"))
	if err != nil {
		t.Fatal(err)
	}
	dp := &fakeDatapath{enrolled: map[store.Key]bool{}}
	return &cniHandler{
		log: slog.New(slog.DiscardHandler), store: st, datapath: dp,
		classifier: StaticClassifier{Mode: ModeSidecar, Reason: "test"},
		readiness:  readyFlag(ready), now: time.Now, locks: newAttachLocks(),
	}, dp
}

func req(op cnirpc.Op, id string) *cnirpc.Request {
	return &cnirpc.Request{Version: cnirpc.Version, Op: op, Network: "k8s", Netns: "/x",
		Attachment: cnirpc.Attachment{ContainerID: id, IfName: "eth0"}}
}

func TestHandlerLifecycle(t *testing.T) {
	h, dp := newHandler(t, true)
	ctx := context.Background()
	rep, err := h.Handle(ctx, req(cnirpc.OpAdd, "a"))
	if err != nil || rep.Mode != ModeSidecar {
		t.Fatalf("add: %+v %v", rep, err)
	}
	if _, err := h.Handle(ctx, req(cnirpc.OpCheck, "a")); err != nil {
		t.Fatalf("check after add: %v", err)
	}
	// Datapath state lost behind the agent's back: CHECK must say so.
	dp.enrolled = map[store.Key]bool{}
	if _, err := h.Handle(ctx, req(cnirpc.OpCheck, "a")); err == nil || !strings.Contains(err.Error(), "not in place") {
		t.Fatalf("check with datapath state gone: %v", err)
	}
	if _, err := h.Handle(ctx, req(cnirpc.OpDel, "a")); err != nil {
		t.Fatalf("del: %v", err)
	}
	if _, err := h.Handle(ctx, req(cnirpc.OpDel, "a")); err != nil {
		t.Fatalf("second del: %v", err)
	}
	if _, err := h.Handle(ctx, req(cnirpc.OpCheck, "a")); err == nil || !strings.Contains(err.Error(), "no state") {
		t.Fatalf("check after del: %v", err)
	}
}

func TestHandlerNotReadyRefusesAdd(t *testing.T) {
	h, dp := newHandler(t, false)
	_, err := h.Handle(context.Background(), req(cnirpc.OpAdd, "a"))
	if !errors.Is(err, cnirpc.ErrRetry) || !strings.Contains(err.Error(), "informers not synced") {
		t.Fatalf("add while not ready: %v, want a retryable error with the reason", err)
	}
	if len(dp.enrolled) != 0 || len(h.store.List()) != 0 {
		t.Fatal("add while not ready changed state")
	}
}

func TestHandlerFailedEnrollChangesNothing(t *testing.T) {
	h, dp := newHandler(t, true)
	dp.failEnroll = true
	if _, err := h.Handle(context.Background(), req(cnirpc.OpAdd, "a")); err == nil || !strings.Contains(err.Error(), "map full") {
		t.Fatalf("add: %v", err)
	}
	if len(dp.enrolled) != 0 {
		t.Fatal("failed enroll was not undone")
	}
	if len(h.store.List()) != 0 {
		t.Fatal("failed add was recorded")
	}
}

func TestHandlerGC(t *testing.T) {
	h, dp := newHandler(t, true)
	ctx := context.Background()
	for _, id := range []string{"keep", "stale1", "stale2"} {
		if _, err := h.Handle(ctx, req(cnirpc.OpAdd, id)); err != nil {
			t.Fatal(err)
		}
	}
	other := req(cnirpc.OpAdd, "other")
	other.Network = "other-net"
	if _, err := h.Handle(ctx, other); err != nil {
		t.Fatal(err)
	}
	gc := &cnirpc.Request{Version: cnirpc.Version, Op: cnirpc.OpGC, Network: "k8s", ValidAttachments: []cnirpc.Attachment{{ContainerID: "keep", IfName: "eth0"}}}
	rep, err := h.Handle(ctx, gc)
	if err != nil || rep.Removed != 2 {
		t.Fatalf("gc: %+v %v", rep, err)
	}
	var left []string
	for _, e := range h.store.List() {
		left = append(left, e.Network+"/"+e.ContainerID)
	}
	if strings.Join(left, ",") != "k8s/keep,other-net/other" {
		t.Fatalf("after gc: %v", left)
	}
	if len(dp.enrolled) != 2 {
		t.Fatalf("datapath still has %d enrolments, want 2", len(dp.enrolled))
	}
}
