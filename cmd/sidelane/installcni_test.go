package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sidelane/sidelane/cni"
	"github.com/sidelane/sidelane/internal/testenv"
)

const flannel = `{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"isDefaultGateway":true}},{"type":"portmap","capabilities":{"portMappings":true}}]}`

type installDirs struct{ conf, bin, cache string }

func newInstallDirs(t *testing.T) installDirs {
	t.Helper()
	d := installDirs{conf: t.TempDir(), bin: t.TempDir(), cache: t.TempDir()}
	if err := os.WriteFile(filepath.Join(d.conf, "10-flannel.conflist"), []byte(flannel), 0o644); err != nil {
		t.Fatal(err)
	}
	return d
}

func (d installDirs) args(extra ...string) []string {
	return append([]string{"install-cni", "--cni-conf-dir", d.conf, "--cni-bin-dir", d.bin, "--cni-cache-dir", d.cache, "--kubeconfig-file", ""}, extra...)
}

func (d installDirs) chained(t *testing.T) *cni.List {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(d.conf, "10-flannel.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	l, err := cni.Parse("10-flannel.conflist", data)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// TestInstallCNICommand runs the built `sidelane install-cni` the way the
// DaemonSet does: once, with bad flags, and watching until SIGTERM.
func TestInstallCNICommand(t *testing.T) {
	bin := testenv.SidelaneBin(t)
	sidelane := filepath.Join(bin, "sidelane")

	t.Run("once then uninstall", func(t *testing.T) {
		d := newInstallDirs(t)
		out, err := exec.Command(sidelane, d.args("--once", "--fail-policy", "open", "--agent-timeout", "2s")...).CombinedOutput()
		if err != nil {
			t.Fatalf("install-cni --once: %v\n%s", err, out)
		}
		l := d.chained(t)
		if got := strings.Join(l.Types(), ","); got != "flannel,portmap,sidelane-cni" {
			t.Fatalf("types after install: %s", got)
		}
		data, _ := os.ReadFile(filepath.Join(d.conf, "10-flannel.conflist"))
		if !strings.Contains(string(data), `"failPolicy": "open"`) || !strings.Contains(string(data), `"agentTimeout": "2s"`) {
			t.Errorf("flags not in the entry:\n%s", data)
		}
		// The default plugin binary is sidelane-cni next to sidelane.
		if want, _ := os.ReadFile(filepath.Join(bin, "sidelane-cni")); len(want) == 0 {
			t.Fatal("bin/sidelane-cni empty")
		} else if got, _ := os.ReadFile(filepath.Join(d.bin, "sidelane-cni")); string(got) != string(want) {
			t.Error("installed binary is not bin/sidelane-cni")
		}
		if out, err := exec.Command(sidelane, d.args("--uninstall")...).CombinedOutput(); err != nil {
			t.Fatalf("install-cni --uninstall: %v\n%s", err, out)
		}
		if d.chained(t).Has(cni.PluginType) {
			t.Error("entry left after --uninstall")
		}
		if _, err := os.Stat(filepath.Join(d.bin, "sidelane-cni")); !os.IsNotExist(err) {
			t.Errorf("binary left after --uninstall: %v", err)
		}
	})

	t.Run("bad flag changes nothing", func(t *testing.T) {
		d := newInstallDirs(t)
		out, err := exec.Command(sidelane, d.args("--once", "--fail-policy", "sometimes")...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "failPolicy") {
			t.Fatalf("--fail-policy sometimes: err=%v, output %s; want an error naming failPolicy", err, out)
		}
		if d.chained(t).Has(cni.PluginType) {
			t.Error("config changed despite the bad flag")
		}
	})

	t.Run("watch until SIGTERM with cleanup", func(t *testing.T) {
		d := newInstallDirs(t)
		cmd := exec.Command(sidelane, d.args("--cleanup-on-exit")...)
		var logs strings.Builder
		cmd.Stdout, cmd.Stderr = &logs, &logs
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		t.Cleanup(func() {
			if cmd.ProcessState == nil {
				_ = cmd.Process.Kill()
				<-done
			}
		})
		waitFor(t, "chained", func() bool { return d.chained(t).Has(cni.PluginType) })
		// flannel restarts and rewrites its file: re-chained.
		if err := os.WriteFile(filepath.Join(d.conf, "10-flannel.conflist"), []byte(flannel), 0o644); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "re-chained", func() bool { return d.chained(t).Has(cni.PluginType) })
		if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatalf("install-cni exit: %v\n%s", err, logs.String())
		}
		if d.chained(t).Has(cni.PluginType) {
			t.Errorf("entry left after SIGTERM with --cleanup-on-exit\n%s", logs.String())
		}
	})
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after 20s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestInstallCNIWritesNoTokenByDefault: nothing in sidelane reads the
// kubeconfig install-cni can write (the agent uses its in-cluster service
// account, the plugin never talks to the API), so by default it writes
// none: a file on the node holding the agent's token would only be one more
// way to take the token. Writing one is opt-in (--kubeconfig-file PATH).
func TestInstallCNIWritesNoTokenByDefault(t *testing.T) {
	sidelane := filepath.Join(testenv.SidelaneBin(t), "sidelane")
	out, _ := exec.Command(sidelane, "install-cni", "-h").CombinedOutput()
	help := string(out)
	i := strings.Index(help, "-kubeconfig-file")
	if i < 0 {
		t.Fatalf("install-cni -h lists no -kubeconfig-file:\n%s", help)
	}
	flagHelp, _, _ := strings.Cut(help[i:], "\n  -")
	if strings.Contains(flagHelp, "(default") {
		t.Errorf("-kubeconfig-file has a default, want none (opt-in):\n%s", flagHelp)
	}
}
