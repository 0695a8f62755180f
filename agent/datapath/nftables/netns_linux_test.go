//go:build linux

package nftables

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/internal/podnet"
	"github.com/sidelane/sidelane/internal/testenv"
	"github.com/sidelane/sidelane/istio/capture"
)

// TestReplacedNetnsUntouched: when a pod's netns path names another
// namespace than at ADD, re-enrolling is refused and writes nothing
// there, and unenrolling succeeds without removing the other pod's
// tables.
func TestReplacedNetnsUntouched(t *testing.T) {
	testenv.Privileged(t)
	n := podnet.New(t)
	b := New(nil)
	ctx := context.Background()
	podNS, otherNS := n.Add("nfr"), n.Add("nfo")
	s := capture.Defaults()
	other := store.Entry{Netns: otherNS.Path, Mode: modeSidecar, Capture: &s}

	path := filepath.Join(t.TempDir(), "ns-net")
	if err := os.Symlink(podNS.Path, path); err != nil {
		t.Fatal(err)
	}
	e := store.Entry{Netns: path, Mode: modeSidecar, Capture: &s}
	var err error
	if e.NetnsDev, e.NetnsIno, err = store.NetnsIdentity(path); err != nil {
		t.Fatal(err)
	}
	if err := b.Enroll(ctx, &e); err != nil {
		t.Fatalf("enroll while the path names the pod's netns: %v", err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(otherNS.Path, path); err != nil {
		t.Fatal(err)
	}
	if err := b.Enroll(ctx, &e); !errors.Is(err, store.ErrNetnsReplaced) {
		t.Fatalf("re-enroll with the path naming another netns: %v, want ErrNetnsReplaced", err)
	}
	if got := list(t, otherNS); len(got) != 0 {
		t.Fatalf("refused enroll wrote tables into the other netns: %v", got)
	}
	if err := b.Enroll(ctx, &other); err != nil {
		t.Fatal(err)
	}
	before := list(t, otherNS)
	if err := b.Unenroll(ctx, e); err != nil {
		t.Fatalf("unenroll of the pod whose path names another netns: %v", err)
	}
	if got := list(t, otherNS); got[TableNat] != before[TableNat] || len(got) != len(before) {
		t.Errorf("unenroll changed the other netns's tables")
	}
}
