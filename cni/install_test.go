package cni

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var testEntry = Entry{AgentSocket: "/var/run/sidelane/cni.sock", AgentTimeout: "5s", FailPolicy: "closed", LogLevel: "info"}

// fixtureInstaller makes an installer over a copy of a fixture conf dir,
// with a temp bin dir and a stand-in plugin binary (these tests are about
// files; del_test.go runs the real plugin).
func fixtureInstaller(t *testing.T, fixture string, o Options) (*Installer, string, string) {
	t.Helper()
	conf := copyDir(t, filepath.Join("testdata", "confdirs", fixture))
	bin := t.TempDir()
	src := filepath.Join(t.TempDir(), PluginType)
	if err := os.WriteFile(src, []byte("#!/bin/sh\n# stand-in for sidelane-cni\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	o.Entry = testEntry
	inst, err := New(Config{ConfDir: conf, BinDir: bin, SourceBinary: src, Options: o, CNICacheDir: filepath.Join(t.TempDir(), "cache")})
	if err != nil {
		t.Fatal(err)
	}
	return inst, conf, bin
}

// TestInstallFixtures chains into the configs real primaries write, then
// checks re-running changes nothing, a primary rewriting its file is
// repaired, and uninstall leaves the primaries' networks as they were.
func TestInstallFixtures(t *testing.T) {
	tests := []struct {
		name, fixture string
		own           bool
		// primary is the file the runtime uses before install; chained the
		// file that holds sidelane's entry after.
		primary, chained string
		// wantTypes is the chained list's plugin types.
		wantTypes []string
		// warn is a substring of an expected warning.
		warn string
	}{
		{name: "bridge", fixture: "bridge", primary: "10-bridge.conf", chained: "10-bridge.conflist", wantTypes: []string{"bridge", PluginType}},
		{name: "calico", fixture: "calico", primary: "10-calico.conflist", chained: "10-calico.conflist", wantTypes: []string{"calico", "portmap", "bandwidth", PluginType}},
		{name: "cilium", fixture: "cilium", primary: "05-cilium.conflist", chained: "05-cilium.conflist", wantTypes: []string{"cilium-cni", PluginType}},
		{name: "flannel", fixture: "flannel", primary: "10-flannel.conflist", chained: "10-flannel.conflist", wantTypes: []string{"flannel", "portmap", PluginType}},
		{name: "multus", fixture: "multus", primary: "00-multus.conf", chained: "00-multus.conflist", wantTypes: []string{"multus", PluginType}},
		{name: "invalid-first", fixture: "invalid-first", primary: "10-flannel.conflist", chained: "10-flannel.conflist", wantTypes: []string{"flannel", "portmap", PluginType}, warn: "skipping invalid CNI config 00-half-written.conflist"},
		{name: "calico-own", fixture: "calico", own: true, primary: "10-calico.conflist", chained: DefaultOwnConfig, wantTypes: []string{"calico", "portmap", "bandwidth", PluginType}},
		{name: "bridge-own", fixture: "bridge", own: true, primary: "10-bridge.conf", chained: DefaultOwnConfig, wantTypes: []string{"bridge", PluginType}},
		{name: "json", fixture: "json", primary: "10-mynet.json", chained: "10-mynet.json.conflist", wantTypes: []string{"ptp", PluginType}},
		{name: "json-own", fixture: "json", own: true, primary: "10-mynet.json", chained: DefaultOwnConfig, wantTypes: []string{"ptp", PluginType}},
		{name: "multus-own", fixture: "multus", own: true, primary: "00-multus.conf", chained: DefaultOwnConfig, wantTypes: []string{"multus", PluginType}, warn: "sorts after the primary 00-multus.conf"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			inst, conf, bin := fixtureInstaller(t, tc.fixture, Options{OwnConfig: tc.own})
			original := snapshot(t, conf)
			// A primary installed with a tight mode keeps it.
			if err := os.Chmod(filepath.Join(conf, tc.primary), 0o600); err != nil {
				t.Fatal(err)
			}

			p, err := inst.Sync()
			if err != nil {
				t.Fatalf("install: %v", err)
			}
			if p.Primary != tc.primary {
				t.Errorf("primary = %s, want %s", p.Primary, tc.primary)
			}
			if tc.warn != "" && !strings.Contains(strings.Join(p.Warnings, "\n"), tc.warn) {
				t.Errorf("warnings %q lack %q", p.Warnings, tc.warn)
			}
			golden(t, tc.name, conf)

			// The runtime's pick (lexicographically first valid file) is
			// now the chained list, unless the warning above applies.
			files, _ := readConfDir(conf)
			runtimePick, _, _, _ := SelectPrimary(files, "")
			if tc.warn == "" || tc.name == "invalid-first" {
				if runtimePick.Name != tc.chained {
					t.Errorf("runtime would use %s, want %s", runtimePick.Name, tc.chained)
				}
			}
			data, err := os.ReadFile(filepath.Join(conf, tc.chained))
			if err != nil {
				t.Fatal(err)
			}
			l, err := Parse(tc.chained, data)
			if err != nil {
				t.Fatalf("chained config does not parse: %v", err)
			}
			if got := strings.Join(l.Types(), ","); got != strings.Join(tc.wantTypes, ",") {
				t.Errorf("plugin types = %s, want %s", got, strings.Join(tc.wantTypes, ","))
			}
			if origList, _ := Parse(tc.primary, []byte(original[tc.primary])); origList != nil && l.CNIVersion != origList.CNIVersion {
				t.Errorf("cniVersion = %s, want the primary's %s", l.CNIVersion, origList.CNIVersion)
			}
			if m := fileMode(filepath.Join(conf, tc.chained), 0); m != 0o600 {
				t.Errorf("mode of %s = %o, want the primary's 0600", tc.chained, m)
			}
			if !sameFile(inst.cfg.SourceBinary, filepath.Join(bin, PluginType)) || fileMode(filepath.Join(bin, PluginType), 0) != 0o755 {
				t.Error("plugin binary not installed with mode 0755")
			}

			// Re-running changes nothing.
			before := snapshot(t, conf)
			p, err = inst.Sync()
			if err != nil {
				t.Fatalf("second install: %v", err)
			}
			if !p.Empty() {
				t.Errorf("second install planned changes: %+v", p)
			}
			sameSnapshot(t, "after re-run", snapshot(t, conf), before)

			// The primary rewrites its file as it was: repaired to the same
			// result.
			if err := os.WriteFile(filepath.Join(conf, tc.primary), []byte(original[tc.primary]), 0o600); err != nil {
				t.Fatal(err)
			}
			// (ownConfig mode copies the list, so the same rewrite needs nothing.)
			if p, err := inst.SyncConfig(); err != nil || p.Empty() != tc.own {
				t.Fatalf("repair after rewrite: plan %+v, err %v", p, err)
			}
			golden(t, tc.name, conf)

			// Uninstall: no sidelane left, the primaries' networks as before.
			if err := inst.Uninstall(); err != nil {
				t.Fatalf("uninstall: %v", err)
			}
			after := snapshot(t, conf)
			for name, data := range after {
				if containsSidelane(data) {
					t.Errorf("%s still names sidelane-cni after uninstall:\n%s", name, data)
				}
			}
			for name, data := range original {
				if !IsConfigName(filepath.Base(name)) {
					if after[name] != data {
						t.Errorf("%s changed", name)
					}
					continue
				}
				got, ok := after[name]
				if !ok {
					t.Errorf("%s missing after uninstall", name)
					continue
				}
				if filepath.Ext(name) != ".conflist" && got != data {
					// a converted primary comes back byte for byte
					t.Errorf("%s after uninstall:\n%s\nwant the primary's file as it wrote it:\n%s", name, got, data)
				}
				ol, oerr := Parse(tc.primary, []byte(data))
				gl, gerr := Parse(name, []byte(got))
				if oerr != nil {
					if got != data {
						t.Errorf("invalid file %s changed", name)
					}
					continue
				}
				if gerr != nil {
					t.Errorf("%s after uninstall: %v", name, gerr)
					continue
				}
				oe, _ := ol.Encode()
				ge, _ := gl.Encode()
				if name == tc.primary || strings.HasPrefix(name, strings.TrimSuffix(tc.primary, filepath.Ext(tc.primary))) {
					if !SameJSON(oe, ge) {
						t.Errorf("%s after uninstall:\n%s\nwant the original network:\n%s", name, ge, oe)
					}
				}
			}
			if _, err := os.Stat(filepath.Join(bin, PluginType)); !os.IsNotExist(err) {
				t.Errorf("plugin binary still there after uninstall: %v", err)
			}
		})
	}
}

// TestIstioCNIRefused: with Istio's own CNI plugin in the primary list,
// sidelane does not chain (it would capture the pods a second time) and
// says why; a sidelane entry already there is taken out.
func TestIstioCNIRefused(t *testing.T) {
	inst, conf, _ := fixtureInstaller(t, "istio-cni", Options{})
	before := snapshot(t, conf)
	_, err := inst.Sync()
	if !errors.Is(err, ErrMeshCNI) {
		t.Fatalf("install with istio-cni present: err = %v, want ErrMeshCNI", err)
	}
	for _, want := range []string{"10-calico.conflist", "double capture", "components.cni.enabled=false"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	sameSnapshot(t, "conf dir after refusal", snapshot(t, conf), before)

	// sidelane chained first, istio-cni added later: sidelane steps back.
	path := filepath.Join(conf, "10-calico.conflist")
	l, _ := Parse(path, []byte(before["10-calico.conflist"]))
	raw, _ := testEntry.raw()
	l.Plugins = append(l.Plugins[:2], raw, l.Plugins[2])
	data, _ := l.Encode()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := inst.SyncConfig(); !errors.Is(err, ErrMeshCNI) {
		t.Fatalf("err = %v, want ErrMeshCNI", err)
	}
	got, _ := os.ReadFile(path)
	gl, err := Parse(path, got)
	if err != nil {
		t.Fatal(err)
	}
	if countType(gl, PluginType) != 0 || countType(gl, IstioCNIType) != 1 {
		t.Errorf("after refusal the list is %v, want istio-cni kept and sidelane-cni removed", gl.Types())
	}
}

func TestNoPrimaryYet(t *testing.T) {
	inst, conf, _ := fixtureInstaller(t, "istio-cni", Options{})
	for n := range snapshot(t, conf) {
		os.Remove(filepath.Join(conf, n))
	}
	if _, err := inst.Sync(); !errors.Is(err, ErrNoPrimary) {
		t.Fatalf("empty conf dir: err = %v, want ErrNoPrimary", err)
	}
	if n := len(snapshot(t, conf)); n != 0 {
		t.Errorf("empty conf dir got %d files", n)
	}
}

func TestNewRejectsBadSettings(t *testing.T) {
	good := Config{ConfDir: "/etc/cni/net.d", BinDir: "/opt/cni/bin", SourceBinary: "/sidelane-cni"}
	tests := []struct {
		name   string
		mutate func(*Config)
		want   string
	}{
		{"relative conf dir", func(c *Config) { c.ConfDir = "net.d" }, "conf dir"},
		{"kubeconfig in conf dir", func(c *Config) { c.KubeconfigPath = "/etc/cni/net.d/sidelane-kubeconfig" }, "outside the CNI conf dir"},
		{"relative kubeconfig", func(c *Config) { c.KubeconfigPath = "kubeconfig" }, "kubeconfig path"},
		{"bad failPolicy", func(c *Config) { c.Options.Entry.FailPolicy = "sometimes" }, "failPolicy"},
		{"bad agentTimeout", func(c *Config) { c.Options.Entry.AgentTimeout = "forever" }, "agentTimeout"},
		{"relative agentSocket", func(c *Config) { c.Options.Entry.AgentSocket = "cni.sock" }, "agentSocket"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := good
			tc.mutate(&c)
			_, err := New(c)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want one naming %q", err, tc.want)
			}
		})
	}
	if _, err := New(good); err != nil {
		t.Errorf("good config: %v", err)
	}
}
