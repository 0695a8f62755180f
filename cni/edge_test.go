package cni

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// runtimePick is the config a runtime loads from dir (the first valid one)
// and its content.
func runtimePick(t *testing.T, dir string) (string, *List, string) {
	t.Helper()
	files, err := readConfDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	f, l, _, err := SelectPrimary(files, "")
	if err != nil {
		t.Fatalf("runtime finds no config in %s: %v", dir, err)
	}
	return f.Name, l, string(f.Data)
}

// rewriteSubnet is the primary CNI rewriting its file with a new subnet
// (an upgrade, a new node CIDR).
func rewriteSubnet(t *testing.T, path, from, to string) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", "confdirs", "json", "10-mynet.json"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(data), from) {
		t.Fatalf("fixture lacks %s", from)
	}
	if err := writeAtomic(filepath.Dir(path), filepath.Base(path), []byte(strings.ReplaceAll(string(data), from, to)), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestJSONPrimaryRewritten: a .json primary is chained into a .conflist
// that sorts right after it, so when the primary rewrites its .json the
// runtime loads the new file at once (no stale converted copy shadows it)
// and install-cni re-chains the new content, once and in watch mode.
func TestJSONPrimaryRewritten(t *testing.T) {
	inst, conf, _ := fixtureInstaller(t, "json", Options{})
	if _, err := inst.Sync(); err != nil {
		t.Fatal(err)
	}
	name, l, _ := runtimePick(t, conf)
	if !l.Has(PluginType) {
		t.Fatalf("runtime loads %s without sidelane after install", name)
	}

	rewriteSubnet(t, filepath.Join(conf, "10-mynet.json"), "10.89.0.0/16", "10.90.0.0/16")
	name, _, data := runtimePick(t, conf)
	if !strings.Contains(data, "10.90.0.0/16") {
		t.Errorf("after the primary rewrote 10-mynet.json the runtime loads %s, a stale copy:\n%s", name, data)
	}
	p, err := inst.SyncConfig()
	if err != nil {
		t.Fatal(err)
	}
	if p.Empty() {
		t.Error("the primary's rewrite was not noticed: empty plan")
	}
	name, l, data = runtimePick(t, conf)
	if !strings.Contains(data, "10.90.0.0/16") || countType(l, PluginType) != 1 || l.Types()[len(l.Plugins)-1] != PluginType {
		t.Errorf("after re-chaining the runtime loads %s, want the new subnet chained:\n%s", name, data)
	}

	// Watch mode notices the same rewrite.
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- inst.Run(ctx, WatchOptions{}) }()
	t.Cleanup(func() { cancel(); <-done })
	rewriteSubnet(t, filepath.Join(conf, "10-mynet.json"), "10.89.0.0/16", "10.91.0.0/16")
	eventually(t, "the rewritten .json re-chained in watch mode", func() bool {
		files, _ := readConfDir(conf)
		_, l, _, err := SelectPrimary(files, "")
		if err != nil || !l.Has(PluginType) {
			return false
		}
		enc, _ := l.Encode()
		return strings.Contains(string(enc), "10.91.0.0/16")
	})
}

// TestUninstallRestoresConverted: a single-plugin .conf or .json that
// install-cni turned into a .conflist comes back on uninstall under its
// own name, byte for byte (Multus, for one, removes only the file name
// it wrote); after the primary rewrote it, the rewritten content comes back.
func TestUninstallRestoresConverted(t *testing.T) {
	for _, tc := range []struct{ fixture, primary string }{
		{"bridge", "10-bridge.conf"},
		{"multus", "00-multus.conf"},
		{"json", "10-mynet.json"},
	} {
		t.Run(tc.fixture, func(t *testing.T) {
			inst, conf, _ := fixtureInstaller(t, tc.fixture, Options{})
			original := snapshot(t, conf)
			if err := os.Chmod(filepath.Join(conf, tc.primary), 0o600); err != nil {
				t.Fatal(err)
			}
			if _, err := inst.Sync(); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(filepath.Join(conf, tc.primary)); !os.IsNotExist(err) {
				t.Fatalf("%s still there after the conversion: %v", tc.primary, err)
			}
			if err := inst.Uninstall(); err != nil {
				t.Fatal(err)
			}
			sameSnapshot(t, "after uninstall", snapshot(t, conf), original)
			if m := fileMode(filepath.Join(conf, tc.primary), 0); m != 0o600 {
				t.Errorf("mode of the restored %s = %o, want the primary's 0600", tc.primary, m)
			}

			// The primary rewrites its file while chained: uninstall gives
			// back the rewrite.
			if _, err := inst.Sync(); err != nil {
				t.Fatal(err)
			}
			rewritten := strings.Replace(original[tc.primary], `"cniVersion"`, `"x-rewritten": true, "cniVersion"`, 1)
			if err := os.WriteFile(filepath.Join(conf, tc.primary), []byte(rewritten), 0o644); err != nil {
				t.Fatal(err)
			}
			if _, err := inst.SyncConfig(); err != nil {
				t.Fatal(err)
			}
			if err := inst.Uninstall(); err != nil {
				t.Fatal(err)
			}
			want := maps(original)
			want[tc.primary] = rewritten
			sameSnapshot(t, "after rewrite and uninstall", snapshot(t, conf), want)
		})
	}
}

func maps(m map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range m {
		out[k] = v
	}
	return out
}

// TestConvertedMarkerNotTrusted: a .conflist whose conversion record names
// another file (or a path) is treated as a plain list: uninstall writes no
// file from it.
func TestConvertedMarkerNotTrusted(t *testing.T) {
	for _, from := range []string{"../../etc/x.conf", "20-other.conf", "10-a.conflist", "10-a.conf/x.conf"} {
		data := `{"cniVersion":"1.0.0","name":"a","sidelaneConvertedFrom":{"file":"` + from + `","data":"{\"cniVersion\":\"1.0.0\",\"name\":\"evil\",\"type\":\"bridge\"}"},"plugins":[{"type":"bridge"},{"type":"sidelane-cni"}]}`
		files := []File{{"10-a.conflist", []byte(data)}}
		p := PlanUninstall(files, Options{Entry: testEntry})
		if len(p.Writes) != 1 || p.Writes[0].Name != "10-a.conflist" || len(p.Removes) != 0 {
			t.Errorf("record naming %q: plan %+v, want only 10-a.conflist unchained in place", from, p)
		}
	}
}

// TestMeshCNIRefused: with another mesh's traffic-redirecting CNI plugin
// in the primary list, install-cni does not chain (the pods would be
// captured twice), says which plugin, and takes an entry of its own out.
func TestMeshCNIRefused(t *testing.T) {
	for _, tc := range []struct{ typ, mesh string }{
		{"istio-cni", "Istio"},
		{"linkerd-cni", "Linkerd"},
		{"kuma-cni", "Kuma"},
		{"consul-cni", "Consul"},
	} {
		t.Run(tc.typ, func(t *testing.T) {
			calico, err := os.ReadFile(filepath.Join("testdata", "confdirs", "calico", "10-calico.conflist"))
			if err != nil {
				t.Fatal(err)
			}
			l, err := Parse("10-calico.conflist", calico)
			if err != nil {
				t.Fatal(err)
			}
			l.Plugins = append(l.Plugins, []byte(`{"type":"`+tc.typ+`","log_level":"info"}`))
			withMesh, _ := l.Encode()
			files := []File{{"10-calico.conflist", withMesh}}
			p, err := PlanInstall(files, Options{Entry: testEntry})
			if !errors.Is(err, ErrMeshCNI) {
				t.Fatalf("err = %v, want ErrMeshCNI", err)
			}
			for _, want := range []string{tc.typ, tc.mesh, "double capture", "10-calico.conflist"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not mention %q", err, want)
				}
			}
			if !p.Empty() {
				t.Errorf("plan changes files: %+v", p)
			}

			// sidelane chained first, the mesh CNI appended later.
			raw, _ := testEntry.raw()
			l.Plugins = append(l.Plugins[:len(l.Plugins)-1:len(l.Plugins)-1], raw, []byte(`{"type":"`+tc.typ+`"}`))
			both, _ := l.Encode()
			p, err = PlanInstall([]File{{"10-calico.conflist", both}}, Options{Entry: testEntry})
			if !errors.Is(err, ErrMeshCNI) {
				t.Fatalf("err = %v, want ErrMeshCNI", err)
			}
			after := applyPlan([]File{{"10-calico.conflist", both}}, p)
			gl, err := Parse("10-calico.conflist", after[0].Data)
			if err != nil {
				t.Fatal(err)
			}
			if countType(gl, PluginType) != 0 || countType(gl, tc.typ) != 1 {
				t.Errorf("after stepping back the list is %v, want %s kept and sidelane-cni out", gl.Types(), tc.typ)
			}
		})
	}
}

// TestOwnModeGivesConvertedBack: switching from the edit mode to the own
// config mode gives a converted primary its file back, byte for byte,
// and takes the converted copy out, which would shadow the own file's
// network once the own file goes.
func TestOwnModeGivesConvertedBack(t *testing.T) {
	orig := File{"10-a.json", []byte("{\"cniVersion\": \"1.0.0\", \"name\": \"a\", \"type\": \"ptp\"}\n")}
	p, err := PlanInstall([]File{orig}, Options{Entry: testEntry})
	if err != nil {
		t.Fatal(err)
	}
	files := applyPlan([]File{orig}, p)
	if got := names(files); len(got) != 1 || got[0] != "10-a.json.conflist" {
		t.Fatalf("edit mode: %v, want 10-a.json.conflist", got)
	}
	p, err = PlanInstall(files, Options{Entry: testEntry, OwnConfig: true})
	if err != nil {
		t.Fatal(err)
	}
	files = applyPlan(files, p)
	if got := names(files); len(got) != 2 || got[0] != DefaultOwnConfig || got[1] != orig.Name {
		t.Fatalf("own mode: %v, want %s and %s", got, DefaultOwnConfig, orig.Name)
	}
	if string(files[1].Data) != string(orig.Data) {
		t.Errorf("%s = %q, want the original %q", orig.Name, files[1].Data, orig.Data)
	}
	if l, _ := Parse(DefaultOwnConfig, files[0].Data); l == nil || strings.Contains(string(files[0].Data), convertedKey) || !l.Has(PluginType) {
		t.Errorf("own file:\n%s\nwant the network chained, without a conversion record", files[0].Data)
	}
	if again, err := PlanInstall(files, Options{Entry: testEntry, OwnConfig: true}); err != nil || !again.Empty() {
		t.Errorf("re-plan in own mode: %+v, %v", again, err)
	}
}

// syncBuffer is a log sink safe for the watch loop's goroutine.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestRunStepsBackFromMeshCNI: in watch mode install-cni says once why it
// steps back from linkerd-cni, keeps its entry out while the primary
// rewrites its file, and chains as soon as linkerd-cni is gone.
func TestRunStepsBackFromMeshCNI(t *testing.T) {
	conf, bin := t.TempDir(), t.TempDir()
	src := filepath.Join(t.TempDir(), PluginType)
	if err := os.WriteFile(src, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	calico, err := os.ReadFile(filepath.Join("testdata", "confdirs", "calico", "10-calico.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	l, _ := Parse("10-calico.conflist", calico)
	l.Plugins = append(l.Plugins, []byte(`{"type":"linkerd-cni","log_level":"info"}`))
	withLinkerd, _ := l.Encode()
	primary := filepath.Join(conf, "10-calico.conflist")
	if err := os.WriteFile(primary, withLinkerd, 0o644); err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	inst, err := New(Config{ConfDir: conf, BinDir: bin, SourceBinary: src, Options: Options{Entry: testEntry}, Log: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	synced := make(chan error, 100)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- inst.Run(ctx, WatchOptions{Synced: func(_ Plan, err error) {
			select {
			case synced <- err:
			default:
			}
		}})
	}()
	t.Cleanup(func() { cancel(); <-done })

	if err := <-synced; !errors.Is(err, ErrMeshCNI) {
		t.Fatalf("first check: %v, want ErrMeshCNI", err)
	}
	// The primary rewrites its file, linkerd-cni still in it.
	if err := os.WriteFile(primary, withLinkerd, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := <-synced; !errors.Is(err, ErrMeshCNI) {
		t.Fatalf("check after the rewrite: %v, want ErrMeshCNI", err)
	}
	if chainedIn(primary) {
		t.Fatal("chained next to linkerd-cni")
	}
	if n := strings.Count(logs.String(), "stepping back"); n != 1 {
		t.Errorf("logged %d times why it steps back, want once:\n%s", n, logs.String())
	}
	if !strings.Contains(logs.String(), "linkerd-cni") {
		t.Errorf("the log does not name linkerd-cni:\n%s", logs.String())
	}
	// linkerd-cni uninstalled: sidelane chains.
	if err := writeAtomic(conf, "10-calico.conflist", calico, 0o644); err != nil {
		t.Fatal(err)
	}
	eventually(t, "chained once linkerd-cni is gone", func() bool { return chainedIn(primary) })
}
