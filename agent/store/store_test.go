package store

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
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
	rec := filepath.Join(RecordsDir(path), recordName(k))
	if fi, err := os.Stat(rec); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("state record mode: %v %v", fi, err)
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
	for _, tt := range []struct{ name, data, want string }{
		{"not json", "{not json", "parse state"},
		{"version", `{"version":9,"entries":[]}`, "unsupported version 9"},
	} {
		t.Run("legacy "+tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "state.json")
			if err := os.WriteFile(path, []byte(tt.data), 0o600); err != nil {
				t.Fatal(err)
			}
			if _, err := Open(path); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want %q", err, tt.want)
			}
		})
		t.Run("record "+tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "state.json")
			if err := os.MkdirAll(RecordsDir(path), 0o700); err != nil {
				t.Fatal(err)
			}
			data := strings.Replace(tt.data, `"entries":[]`, `"entry":{}`, 1)
			if err := os.WriteFile(filepath.Join(RecordsDir(path), "x.json"), []byte(data), 0o600); err != nil {
				t.Fatal(err)
			}
			if _, err := Open(path); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want %q", err, tt.want)
			}
		})
	}
	t.Run("record under another name", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "state.json")
		s, _ := Open(path)
		k := Key{Network: "n", ContainerID: "c", IfName: "eth0"}
		if err := s.Put(Entry{Key: k}); err != nil {
			t.Fatal(err)
		}
		dir := RecordsDir(path)
		if err := os.Rename(filepath.Join(dir, recordName(k)), filepath.Join(dir, "other.json")); err != nil {
			t.Fatal(err)
		}
		if _, err := Open(path); err == nil || !strings.Contains(err.Error(), "holds attachment") {
			t.Fatalf("err = %v", err)
		}
	})
}

// A single state file (an older agent's, or this one's shutdown
// snapshot) becomes records at Open, once, and is the newest truth: it
// overwrites records and removes those it lacks (an older agent ran after
// this one's records: rollback, then roll forward).
func TestStoreMigratesLegacyFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.json")
	a := Entry{Key: Key{Network: "n", ContainerID: "a", IfName: "eth0"}, Mode: "sidecar"}
	b := Entry{Key: Key{Network: "n", ContainerID: "b", IfName: "eth0"}, Mode: "none"}
	gone := Entry{Key: Key{Network: "n", ContainerID: "gone", IfName: "eth0"}, Mode: "sidecar"}
	data, _ := json.Marshal(fileFormat{Version: fileVersion, Entries: []Entry{a, b}})
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	older := b
	older.Mode = "node"
	if err := os.MkdirAll(RecordsDir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	for _, e := range []Entry{older, gone} {
		rec, _ := json.Marshal(recordFormat{Version: recordVersion, Entry: e})
		if err := os.WriteFile(filepath.Join(RecordsDir(path), recordName(e.Key)), rec, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("legacy file still there after migration: %v", err)
	}
	if got, _ := s.Get(b.Key); got.Mode != "none" {
		t.Fatalf("b mode %q after migration, want the file's none", got.Mode)
	}
	if _, ok := s.Get(gone.Key); ok {
		t.Fatal("a record the file lacks survived the migration")
	}
	if n := len(s.Container("gone")); n != 0 {
		t.Fatalf("Container(gone) = %d entries", n)
	}
	again, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := again.List(); len(got) != 2 || got[0].Mode != "sidecar" || got[1].Mode != "none" {
		t.Fatalf("after reopen: %+v", got)
	}

	// The shutdown snapshot round-trips: an older agent reads every pod
	// from it, and this version's next Open takes it back.
	if err := again.WriteLegacy(); err != nil {
		t.Fatal(err)
	}
	var f fileFormat
	if data, err := os.ReadFile(path); err != nil || json.Unmarshal(data, &f) != nil || len(f.Entries) != 2 || f.Version != fileVersion {
		t.Fatalf("snapshot: %+v, %v", f, err)
	}
	back, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(back.List()); n != 2 {
		t.Fatalf("%d entries after the snapshot's migration, want 2", n)
	}
}

// A record write cut short (agent killed between create and rename)
// leaves a temp file: it is not a record, and Open removes it once old.
func TestStoreIgnoresCutShortWrite(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.json")
	if err := os.MkdirAll(RecordsDir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	old := filepath.Join(RecordsDir(path), tmpPrefix+"123")
	fresh := filepath.Join(RecordsDir(path), tmpPrefix+"456")
	for _, p := range []string{old, fresh} {
		if err := os.WriteFile(p, []byte(`{"version":1,"en`), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	long := time.Now().Add(-2 * staleTmp)
	if err := os.Chtimes(old, long, long); err != nil {
		t.Fatal(err)
	}
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(s.List()); n != 0 {
		t.Fatalf("%d entries from a temp file", n)
	}
	if _, err := os.Stat(old); !os.IsNotExist(err) {
		t.Fatalf("old temp file left: %v", err)
	}
	// A fresh one may be a write in flight in the agent while another
	// process reads the store: it stays.
	if _, err := os.Stat(fresh); err != nil {
		t.Fatalf("fresh temp file removed: %v", err)
	}
}

// Adding attachment N+1 writes its own record only: the bytes written do
// not grow with the number of attachments already stored.
func TestStorePutCostIndependentOfSize(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "state.json"))
	if err != nil {
		t.Fatal(err)
	}
	entry := func(i int) Entry {
		return Entry{Key: Key{Network: "n", ContainerID: fmt.Sprintf("c%05d", i), IfName: "eth0"}, Netns: "/var/run/netns/x",
			IPs: []netip.Prefix{netip.MustParsePrefix("10.0.0.2/24")}, Mode: "sidecar", Added: time.Unix(1, 0).UTC()}
	}
	cost := func(i int) int64 {
		before := s.Written()
		if err := s.Put(entry(i)); err != nil {
			t.Fatal(err)
		}
		return s.Written() - before
	}
	first := cost(0)
	for i := 1; i < 1000; i++ {
		cost(i)
	}
	if last := cost(1000); last != first {
		t.Fatalf("pod 1001 wrote %d bytes, pod 1 wrote %d: the cost grows with the pod count", last, first)
	}
}

func TestStoreContainer(t *testing.T) {
	s, _ := Open(filepath.Join(t.TempDir(), "state.json"))
	for _, k := range []Key{{"n", "a", "net1"}, {"n", "a", "eth0"}, {"m", "a", "eth0"}, {"n", "b", "eth0"}} {
		if err := s.Put(Entry{Key: k}); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := s.Delete(Key{"m", "a", "eth0"}); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range s.Container("a") {
		got = append(got, e.Key.String())
	}
	if want := []string{"n/a/eth0", "n/a/net1"}; !slices.Equal(got, want) {
		t.Fatalf("Container(a) = %v, want %v", got, want)
	}
	if _, _, err := s.Delete(Key{"n", "b", "eth0"}); err != nil {
		t.Fatal(err)
	}
	if n := len(s.Container("b")); n != 0 {
		t.Fatalf("Container(b) = %d entries after its last went", n)
	}
}

func TestRecordName(t *testing.T) {
	for _, tt := range []struct {
		k    Key
		want string
	}{
		{Key{"k8s-pod-network", "0123abc", "eth0"}, "k8s-pod-network~0123abc~eth0.json"},
		{Key{"../x", "c/d", "e~f"}, "%2E.%2Fx~c%2Fd~e%7Ef.json"},
		{Key{"", "", ""}, "~~.json"},
	} {
		if got := recordName(tt.k); got != tt.want {
			t.Errorf("recordName(%v) = %q, want %q", tt.k, got, tt.want)
		}
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
