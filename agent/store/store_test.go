package store

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestStorePersists(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.json")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	k := Key{Network: "n", ContainerID: "c1", IfName: "eth0"}
	e := Entry{Key: k, Netns: "/var/run/netns/a", PodNamespace: "ns", PodName: "p", IPs: []netip.Prefix{netip.MustParsePrefix("10.0.0.2/24")}, Mode: "sidecar", Added: time.Unix(1, 0).UTC()}
	if err := s.Put(e); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(Entry{Key: Key{Network: "n", ContainerID: "c2", IfName: "eth0"}}); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("state file mode: %v %v", fi, err)
	}

	reopened, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	got, ok := reopened.Get(k)
	if !ok || got.PodName != "p" || got.IPs[0] != e.IPs[0] || !got.Added.Equal(e.Added) {
		t.Fatalf("after reopen: %+v %v", got, ok)
	}
	if n := len(reopened.List()); n != 2 {
		t.Fatalf("list = %d entries, want 2", n)
	}
	if _, had, err := reopened.Delete(k); err != nil || !had {
		t.Fatalf("delete: had=%v err=%v", had, err)
	}
	if _, had, err := reopened.Delete(k); err != nil || had {
		t.Fatalf("second delete: had=%v err=%v", had, err)
	}
	again, _ := Open(path)
	if _, ok := again.Get(k); ok {
		t.Fatal("deleted entry came back after reopen")
	}
}

func TestStoreRejectsCorruptFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.json")
	if err := os.WriteFile(path, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(path); err == nil || !strings.Contains(err.Error(), "parse state") {
		t.Fatalf("err = %v", err)
	}
	if err := os.WriteFile(path, []byte(`{"version":9,"entries":[]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(path); err == nil || !strings.Contains(err.Error(), "unsupported version 9") {
		t.Fatalf("err = %v", err)
	}
}

func TestStorePutFailureKeepsOldState(t *testing.T) {
	dir := t.TempDir()
	s, _ := Open(filepath.Join(dir, "sub", "state.json"))
	k := Key{Network: "n", ContainerID: "c", IfName: "eth0"}
	if err := s.Put(Entry{Key: k, Mode: "a"}); err != nil {
		t.Fatal(err)
	}
	// Make the directory unwritable by replacing it with a file.
	if err := os.RemoveAll(filepath.Join(dir, "sub")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "sub"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(Entry{Key: k, Mode: "b"}); err == nil {
		t.Fatal("put into an unwritable dir succeeded")
	}
	if e, _ := s.Get(k); e.Mode != "a" {
		t.Fatalf("failed put changed memory state: mode %q", e.Mode)
	}
}
