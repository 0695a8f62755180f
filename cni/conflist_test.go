package cni

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sidelane/sidelane/internal/testenv"
)

func TestParseConvertsConfKeepingVersion(t *testing.T) {
	tests := []struct {
		name, file, data string
		wantVersion      string
		wantErr          string
	}{
		{name: "1.0.0 conf stays 1.0.0", file: "10-a.conf", data: `{"cniVersion":"1.0.0","name":"a","type":"bridge"}`, wantVersion: "1.0.0"},
		{name: "0.4.0 conf stays 0.4.0", file: "10-a.conf", data: `{"cniVersion":"0.4.0","name":"a","type":"ptp"}`, wantVersion: "0.4.0"},
		{name: ".json is a conf", file: "10-a.json", data: `{"cniVersion":"0.3.1","name":"a","type":"ptp"}`, wantVersion: "0.3.1"},
		{name: "conf without type", file: "10-a.conf", data: `{"cniVersion":"1.0.0","name":"a"}`, wantErr: "type"},
		{name: "conf without name", file: "10-a.conf", data: `{"cniVersion":"1.0.0","type":"ptp"}`, wantErr: "name"},
		{name: "list without plugins", file: "10-a.conflist", data: `{"cniVersion":"1.0.0","name":"a"}`, wantErr: "no plugins"},
		{name: "list with empty plugins", file: "10-a.conflist", data: `{"cniVersion":"1.0.0","name":"a","plugins":[]}`, wantErr: "no plugins"},
		{name: "list plugin without type", file: "10-a.conflist", data: `{"cniVersion":"1.0.0","name":"a","plugins":[{}]}`, wantErr: "type"},
		{name: "list without name", file: "10-a.conflist", data: `{"cniVersion":"1.0.0","plugins":[{"type":"ptp"}]}`, wantErr: "no name"},
		{name: "not JSON", file: "10-a.conflist", data: `{"cniVersion":`, wantErr: "parsing"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l, err := Parse(tc.file, []byte(tc.data))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one mentioning %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if l.CNIVersion != tc.wantVersion {
				t.Errorf("cniVersion = %q, want %q", l.CNIVersion, tc.wantVersion)
			}
			if len(l.Plugins) != 1 || strings.Contains(string(l.Plugins[0]), "cniVersion") {
				t.Errorf("plugins = %s, want one entry without its own cniVersion", l.Plugins)
			}
		})
	}
}

func TestChain(t *testing.T) {
	stale := `{"type":"sidelane-cni","agentSocket":"/old.sock"}`
	tests := []struct {
		name, list string
		wantTypes  string
		wantErr    string
	}{
		{name: "appends last", list: `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"portmap"}]}`, wantTypes: "bridge,portmap,sidelane-cni"},
		{name: "moves an old entry last", list: `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},` + stale + `,{"type":"portmap"}]}`, wantTypes: "bridge,portmap,sidelane-cni"},
		{name: "removes duplicates", list: `{"cniVersion":"1.0.0","name":"n","plugins":[` + stale + `,{"type":"bridge"},` + stale + `,` + stale + `]}`, wantTypes: "bridge,sidelane-cni"},
		{name: "1.1.0 list", list: `{"cniVersion":"1.1.0","name":"n","plugins":[{"type":"bridge"}]}`, wantTypes: "bridge,sidelane-cni"},
		{name: "cniVersions list", list: `{"cniVersions":["0.4.0","1.0.0"],"name":"n","plugins":[{"type":"bridge"}]}`, wantTypes: "bridge,sidelane-cni"},
		{name: "too old to chain", list: `{"cniVersion":"0.2.0","name":"n","plugins":[{"type":"bridge"}]}`, wantErr: "chaining needs 0.3.0"},
		{name: "no cniVersion", list: `{"name":"n","plugins":[{"type":"bridge"}]}`, wantErr: "cniVersion is missing"},
		{name: "newer than the plugin", list: `{"cniVersion":"1.2.0","name":"n","plugins":[{"type":"bridge"}]}`, wantErr: "up to 1.1.0"},
		{name: "sidelane alone", list: `{"cniVersion":"1.0.0","name":"n","plugins":[` + stale + `]}`, wantErr: "needs a primary plugin"},
		{name: "istio-cni", list: `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"istio-cni"}]}`, wantErr: "double capture"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l, err := Parse("x.conflist", []byte(tc.list))
			if err != nil {
				t.Fatal(err)
			}
			out, err := l.Chain(testEntry)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one mentioning %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := strings.Join(out.Types(), ","); got != tc.wantTypes {
				t.Errorf("types = %s, want %s", got, tc.wantTypes)
			}
			var last map[string]any
			_ = json.Unmarshal(out.Plugins[len(out.Plugins)-1], &last)
			if last["agentSocket"] != testEntry.AgentSocket {
				t.Errorf("last entry %v is not the new one", last)
			}
			if _, ok := last["cniVersion"]; ok {
				t.Error("sidelane entry carries its own cniVersion; it must inherit the list's")
			}
			// Chaining the result again changes nothing.
			enc, _ := out.Encode()
			again, err := Parse("x.conflist", enc)
			if err != nil {
				t.Fatalf("encoded list does not parse: %v\n%s", err, enc)
			}
			out2, _ := again.Chain(testEntry)
			enc2, _ := out2.Encode()
			if string(enc) != string(enc2) {
				t.Errorf("not idempotent:\n%s\n%s", enc, enc2)
			}
		})
	}
}

func TestPlanInstallEdgeCases(t *testing.T) {
	conf := File{"10-a.conf", []byte(`{"cniVersion":"1.0.0","name":"a","type":"bridge"}`)}
	foreign := File{"10-a.conflist", []byte(`{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"ptp"}]}`)}
	if _, err := PlanInstall([]File{conf, foreign}, Options{Entry: testEntry}); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Errorf("converting over a foreign .conflist: err = %v, want a refusal", err)
	}
	for _, bad := range []string{"sidelane.conf", "../00-x.conflist", "00-x"} {
		if _, err := PlanInstall([]File{conf}, Options{Entry: testEntry, OwnConfig: true, OwnConfigName: bad}); err == nil || !strings.Contains(err.Error(), "ownConfigName") {
			t.Errorf("ownConfigName %q: err = %v, want one naming ownConfigName", bad, err)
		}
	}
	if p, err := PlanInstall([]File{conf}, Options{Entry: Entry{FailPolicy: "maybe"}}); err == nil || !strings.Contains(err.Error(), "failPolicy") || !p.Empty() {
		t.Errorf("bad entry: plan %+v err %v, want no changes and an error naming failPolicy", p, err)
	}
	// Switching modes: edit mode removes a leftover own file; own mode
	// takes a leftover entry out of the primary.
	p, err := PlanInstall([]File{conf}, Options{Entry: testEntry, OwnConfig: true})
	if err != nil {
		t.Fatal(err)
	}
	files := applyPlan([]File{conf}, p)
	p, err = PlanInstall(files, Options{Entry: testEntry})
	if err != nil {
		t.Fatal(err)
	}
	files = applyPlan(files, p)
	if len(files) != 1 || files[0].Name != "10-a.conflist" {
		t.Fatalf("after switching to edit mode: %v", names(files))
	}
	p, err = PlanInstall(files, Options{Entry: testEntry, OwnConfig: true})
	if err != nil {
		t.Fatal(err)
	}
	files = applyPlan(files, p)
	for _, f := range files {
		l, err := Parse(f.Name, f.Data)
		if err != nil {
			t.Fatal(err)
		}
		if want := f.Name == DefaultOwnConfig; l.Has(PluginType) != want {
			t.Errorf("after switching to own mode, %s has sidelane = %v, want %v", f.Name, !want, want)
		}
	}
}

func names(fs []File) []string {
	var n []string
	for _, f := range fs {
		n = append(n, f.Name)
	}
	return n
}

func TestLimiter(t *testing.T) {
	l := newLimiter(3, time.Second)
	now := time.Unix(1000, 0)
	for i := range 3 {
		if ok, _ := l.allow(now); !ok {
			t.Fatalf("repair %d of the burst refused", i+1)
		}
	}
	ok, wait := l.allow(now)
	if ok || wait != time.Second {
		t.Fatalf("4th repair: ok=%v wait=%v, want refused for 1s", ok, wait)
	}
	if ok, _ := l.allow(now.Add(500 * time.Millisecond)); ok {
		t.Fatal("repair allowed after half an interval")
	}
	if ok, _ := l.allow(now.Add(time.Second)); !ok {
		t.Fatal("repair refused after a full interval")
	}
	if ok, _ := l.allow(now.Add(time.Hour)); !ok {
		t.Fatal("repair refused after an hour")
	}
	// The bucket refills to the burst, not beyond.
	n := 0
	for {
		if ok, _ := l.allow(now.Add(time.Hour)); !ok {
			break
		}
		n++
	}
	if n != 2 {
		t.Errorf("after a long pause %d more repairs went through, want 2 (burst 3 minus one)", n)
	}
}

func TestKubeconfig(t *testing.T) {
	data, err := Kubeconfig("https://10.96.0.1:443", []byte("CA"), []byte("TOKEN"))
	if err != nil {
		t.Fatal(err)
	}
	var kc struct {
		CurrentContext string `json:"current-context"`
		Clusters       []struct {
			Cluster struct {
				Server string `json:"server"`
				CAData []byte `json:"certificate-authority-data"`
			} `json:"cluster"`
		} `json:"clusters"`
		Users []struct {
			User struct {
				Token string `json:"token"`
			} `json:"user"`
		} `json:"users"`
	}
	if err := json.Unmarshal(data, &kc); err != nil {
		t.Fatal(err)
	}
	if kc.CurrentContext != "sidelane" || kc.Clusters[0].Cluster.Server != "https://10.96.0.1:443" || string(kc.Clusters[0].Cluster.CAData) != "CA" || kc.Users[0].User.Token != "TOKEN" {
		t.Errorf("kubeconfig = %s", data)
	}
	if _, err := Kubeconfig("", nil, []byte("t")); err == nil {
		t.Error("empty server accepted")
	}
	if _, err := Kubeconfig("https://x", nil, nil); err == nil {
		t.Error("empty token accepted")
	}
}

// TestMaxVersionMatchesPlugin asks the real plugin which versions it
// speaks, so maxVersion cannot drift from plugin.supportedVersions.
func TestMaxVersionMatchesPlugin(t *testing.T) {
	bin := filepath.Join(testenv.SidelaneBin(t), PluginType)
	cmd := exec.Command(bin)
	cmd.Env = []string{"CNI_COMMAND=VERSION"}
	cmd.Stdin = strings.NewReader(`{"cniVersion":"1.0.0"}`)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s VERSION: %v", bin, err)
	}
	var v struct {
		Supported []string `json:"supportedVersions"`
	}
	if err := json.Unmarshal(out, &v); err != nil {
		t.Fatal(err)
	}
	if len(v.Supported) == 0 || v.Supported[len(v.Supported)-1] != maxVersion || v.Supported[0] != minVersion {
		t.Errorf("plugin supports %v; cni package assumes %s..%s", v.Supported, minVersion, maxVersion)
	}
}

// FuzzPlanInstall: any conf file either is refused or chains so that
// sidelane is last exactly once, re-planning is a no-op, and uninstall
// leaves no sidelane entry.
func FuzzPlanInstall(f *testing.F) {
	for _, seed := range []string{
		`{"cniVersion":"1.0.0","name":"a","type":"bridge"}`,
		`{"cniVersion":"0.3.1","name":"a","plugins":[{"type":"flannel"},{"type":"sidelane-cni"},{"type":"portmap"}]}`,
		`{"cniVersions":["0.4.0","1.1.0"],"name":"a","plugins":[{"type":"calico","x":[1,2,{"y":null}]}]}`,
		`{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"istio-cni"},{"type":"sidelane-cni"}]}`,
		`{"cniVersion":"1.0.0","name":"a","disableCheck":"true","plugins":[{"type":"ptp"}]}`,
	} {
		f.Add(seed, true, false)
		f.Add(seed, false, true)
	}
	f.Fuzz(func(t *testing.T, data string, list, own bool) {
		name := "10-x.conf"
		if list {
			name += "list"
		}
		files := []File{{name, []byte(data)}}
		o := Options{Entry: testEntry, OwnConfig: own}
		p, err := PlanInstall(files, o)
		if err != nil {
			return
		}
		files = applyPlan(files, p)
		chained, l, _, err := SelectPrimary(files, "")
		if err != nil {
			t.Fatalf("no valid config after install: %v", err)
		}
		if countType(l, PluginType) != 1 || l.Types()[len(l.Plugins)-1] != PluginType {
			t.Fatalf("%s after install has types %v", chained.Name, l.Types())
		}
		again, err := PlanInstall(files, o)
		if err != nil || !again.Empty() {
			t.Fatalf("second plan: %+v, %v", again, err)
		}
		files = applyPlan(files, PlanUninstall(files, o))
		for _, f := range files {
			if l, err := Parse(f.Name, f.Data); err == nil && l.Has(PluginType) {
				t.Fatalf("%s still has sidelane after uninstall", f.Name)
			}
		}
	})
}
