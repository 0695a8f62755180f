package cni

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// eventually polls cond until it holds, failing after a generous bound
// (not a timing assertion: the bound only stops a hung test). It returns
// how long it took, for the log.
func eventually(t *testing.T, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > 20*time.Second {
			t.Fatalf("%s: not after 20s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start)
}

func chainedIn(path string) bool {
	data, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	l, err := Parse(path, data)
	return err == nil && countType(l, PluginType) == 1 && l.Types()[len(l.Plugins)-1] == PluginType
}

// TestRunWatches drives the real fsnotify loop: it waits for a primary,
// re-chains a primary that rewrites its file, restores a removed binary,
// follows a token rotation, and uninstalls on exit.
func TestRunWatches(t *testing.T) {
	conf, bin, tokenDir := t.TempDir(), t.TempDir(), t.TempDir()
	kubeDir := t.TempDir()
	src := filepath.Join(t.TempDir(), PluginType)
	if err := os.WriteFile(src, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeToken := func(tok string) {
		// The kubelet swaps a ..data symlink; a rename is the same event
		// shape for the watcher (a create in the dir).
		if err := writeAtomic(tokenDir, "token", []byte(tok), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	writeToken("token-1")
	if err := os.WriteFile(filepath.Join(tokenDir, "ca.crt"), []byte("CA"), 0o644); err != nil {
		t.Fatal(err)
	}
	kubeconfig := filepath.Join(kubeDir, "sidelane", "kubeconfig")
	inst, err := New(Config{ConfDir: conf, BinDir: bin, SourceBinary: src, Options: Options{Entry: testEntry},
		KubeconfigPath: kubeconfig, TokenDir: tokenDir, Server: "https://10.96.0.1:443"})
	if err != nil {
		t.Fatal(err)
	}
	synced := make(chan error, 100)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- inst.Run(ctx, WatchOptions{CleanupOnExit: true, Synced: func(_ Plan, err error) {
			select {
			case synced <- err:
			default:
			}
		}})
	}()
	t.Cleanup(func() { cancel(); <-done })

	if err := <-synced; !errors.Is(err, ErrNoPrimary) {
		t.Fatalf("first check with an empty conf dir: %v, want ErrNoPrimary", err)
	}
	calico, err := os.ReadFile(filepath.Join("testdata", "confdirs", "calico", "10-calico.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	primary := filepath.Join(conf, "10-calico.conflist")
	// The primary installs itself the way calico's installer does: a
	// temp file renamed into place.
	if err := writeAtomic(conf, "10-calico.conflist", calico, 0o644); err != nil {
		t.Fatal(err)
	}
	d := eventually(t, "chained after the primary appeared", func() bool { return chainedIn(primary) })
	t.Logf("chained %v after the primary appeared", d)

	// The primary rewrites its file (an upgrade, a restart): in place and
	// by rename.
	if err := os.WriteFile(primary, calico, 0o644); err != nil {
		t.Fatal(err)
	}
	d = eventually(t, "re-chained after an in-place rewrite", func() bool { return chainedIn(primary) })
	t.Logf("re-chained %v after an in-place rewrite", d)
	if err := writeAtomic(conf, "10-calico.conflist", calico, 0o644); err != nil {
		t.Fatal(err)
	}
	d = eventually(t, "re-chained after a rename", func() bool { return chainedIn(primary) })
	t.Logf("re-chained %v after a rename", d)

	if err := os.Remove(filepath.Join(bin, PluginType)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "binary restored", func() bool { return sameFile(src, filepath.Join(bin, PluginType)) })

	writeToken("token-2")
	eventually(t, "kubeconfig follows the token", func() bool {
		data, err := os.ReadFile(kubeconfig)
		return err == nil && strings.Contains(string(data), "token-2")
	})
	if m := fileMode(kubeconfig, 0); m != 0o600 {
		t.Errorf("kubeconfig mode %o, want 0600", m)
	}

	cancel()
	if err := <-done; err != nil {
		t.Fatalf("run: %v", err)
	}
	done <- nil // for the cleanup
	if chainedIn(primary) {
		t.Error("entry still there after exit with CleanupOnExit")
	}
	if _, err := os.Stat(filepath.Join(bin, PluginType)); !os.IsNotExist(err) {
		t.Errorf("binary still there after exit: %v", err)
	}
	if _, err := os.Stat(kubeconfig); !os.IsNotExist(err) {
		t.Errorf("kubeconfig still there after exit: %v", err)
	}
}
