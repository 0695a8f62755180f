//go:build linux

package bpf

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/sidelane/sidelane/bpf/internal/layoutv2"
)

func pinnedMaxEntries(t *testing.T, pinDir, name string) uint32 {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, name), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	return m.MaxEntries()
}

// An upgrade whose object changes a map's layout (layoutv2: the pods map
// holds 32,768 pods) loads over the old version's pins while 8 streams
// run and a connect loop dials: the pods are migrated into the new map,
// the links move to the new programs, and no byte is lost and no connect
// goes uncaptured or fails. Loading the old object again migrates back.
func TestLoadMigratesMapLayout(t *testing.T) {
	v2, err := layoutv2.Spec()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []string{"pods", "pod_counters"} {
		if got := v2.Maps[m].MaxEntries; got != 32768 {
			t.Fatalf("layoutv2 %s map holds %d, want 32768", m, got)
		}
	}
	e := newEnv(t)
	e.startSidecar()
	pod := e.enroll(defaultSettings())
	if err := e.cap.AttachInbound(e.podPath, e.cookie, "eth0"); err != nil {
		t.Fatal(err)
	}
	// The old layout's map is what a plain Load refuses to reuse.
	if got := pinnedMaxEntries(t, e.pinDir, "pods"); got != 16384 {
		t.Fatalf("pinned pods map holds %d, want 16384", got)
	}

	const streams = 8
	var outs [streams]strings.Builder
	var cmds [streams]*exec.Cmd
	for i := range cmds {
		cmds[i] = e.app("stream", ap(remoteIP, 8080).String(), false)
		cmds[i].Stdout, cmds[i].Stderr = &outs[i], &outs[i]
		if err := cmds[i].Start(); err != nil {
			t.Fatal(err)
		}
	}
	var stop atomic.Bool
	var dials, uncaptured, failed atomic.Int32
	var loop sync.WaitGroup
	loop.Add(1)
	go func() {
		defer loop.Done()
		for !stop.Load() {
			dials.Add(1)
			out, err := e.app("dial", ap(remoteIP, 8080).String(), false).CombinedOutput()
			if err != nil {
				failed.Add(1)
				t.Logf("connect during the upgrade: %v: %s", err, out)
				continue
			}
			if parseReply(t, string(out)).peer.Addr() != sidecarSrc {
				uncaptured.Add(1)
			}
		}
	}()
	t.Cleanup(func() { stop.Store(true); loop.Wait() })
	time.Sleep(300 * time.Millisecond) // streams and the loop under way

	upgrade := func(spec *ebpf.CollectionSpec) {
		t.Helper()
		if err := e.cap.Close(); err != nil {
			t.Fatal(err)
		}
		e.cap = nil
		c, err := Load(Config{Cgroup: e.cgroup, PinDir: e.pinDir, EnableShortcut: true, spec: spec})
		if err != nil {
			t.Fatal(err)
		}
		e.cap = c
	}
	upgrade(v2)
	time.Sleep(300 * time.Millisecond) // more connects on the new version
	for i, c := range cmds {
		if err := c.Wait(); err != nil {
			t.Errorf("stream %d: %v: %s", i, err, outs[i].String())
		}
	}
	stop.Store(true)
	loop.Wait()

	h := sha256.New()
	for i := 0; i < streamChunks; i++ {
		h.Write(chunk(i))
	}
	want := hex.EncodeToString(h.Sum(nil))
	for i := range outs {
		r := parseReply(t, outs[i].String())
		if r.peer.Addr() != sidecarSrc || r.bytes != streamChunks*16<<10 || r.sha != want {
			t.Errorf("stream %d: server saw peer %s, %d bytes (sha %s), want the sidecar, %d bytes (sha %s)",
				i, r.peer, r.bytes, r.sha, streamChunks*16<<10, want)
		}
	}
	t.Logf("connect loop: %d dials during the upgrade", dials.Load())
	if dials.Load() < 2 || uncaptured.Load() != 0 || failed.Load() != 0 {
		t.Errorf("connect loop: %d dials, %d uncaptured, %d failed; want some, 0, 0", dials.Load(), uncaptured.Load(), failed.Load())
	}
	for _, m := range []string{"pods", "pod_counters"} {
		if got := pinnedMaxEntries(t, e.pinDir, m); got != 32768 {
			t.Errorf("pinned %s map holds %d after the upgrade, want the new layout's 32768", m, got)
		}
	}
	// The counters came along: the connects before the upgrade are in them.
	if c, err := e.cap.Counters(e.cookie); err != nil || c.RedirectedOutbound < uint64(streams) {
		t.Errorf("counters after the upgrade: %+v, %v; want at least the %d streams counted", c, err, streams)
	}
	if got, err := e.cap.Enrolled(); err != nil || !slices.Equal(got, []uint64{e.cookie}) {
		t.Errorf("enrolled after the upgrade: %v, %v", got, err)
	}
	if err := e.cap.Verify(e.cookie, pod); err != nil {
		t.Errorf("pod after the upgrade: %v", err)
	}
	if r, err := e.dialFromRemote(ap(podIP, 8080)); err != nil || r.peer.Addr().Unmap().String() != "127.0.0.6" {
		t.Errorf("inbound after the upgrade: %v, app saw %s", err, r.peer)
	}

	// Back to the committed object (a rollback): migrated the other way.
	v1, err := loadCapture()
	if err != nil {
		t.Fatal(err)
	}
	upgrade(v1)
	if got := pinnedMaxEntries(t, e.pinDir, "pods"); got != 16384 {
		t.Errorf("pinned pods map holds %d after the rollback, want 16384", got)
	}
	if r := e.dial(ap(remoteIP, 8080), false); r.peer.Addr() != sidecarSrc {
		t.Errorf("after the rollback: server saw %s, want the sidecar", r.peer)
	}

	// A change that cannot be migrated (the key) still fails, and leaves
	// the pins as they were.
	bad := v1.Copy()
	bad.Maps["pods"].KeySize = 16
	if err := e.cap.Close(); err != nil {
		t.Fatal(err)
	}
	e.cap = nil
	if _, err := Load(Config{Cgroup: e.cgroup, PinDir: e.pinDir, spec: bad}); !errors.Is(err, ebpf.ErrMapIncompatible) {
		t.Errorf("Load with a changed key: %v, want ErrMapIncompatible", err)
	}
	e.load()
	if r := e.dial(ap(remoteIP, 8080), false); r.peer.Addr() != sidecarSrc {
		t.Errorf("after the refused upgrade: server saw %s, want the sidecar", r.peer)
	}
}

// A map an older version pinned and this one no longer has (accepted, the
// per-socket storage SO_ORIGINAL_DST used to read) loses its pin when this
// version loads over it, and so at uninstall.
func TestLoadRemovesRetiredPins(t *testing.T) {
	e := newEnv(t)
	pin := filepath.Join(e.pinDir, "accepted")
	retire := func() {
		t.Helper()
		// Any map will do: only the pin name matters.
		m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 4, ValueSize: 1, MaxEntries: 1})
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		if err := m.Pin(pin); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.cap.Close(); err != nil {
		t.Fatal(err)
	}
	e.cap = nil
	retire()
	c, err := Load(Config{Cgroup: e.cgroup, PinDir: e.pinDir})
	if err != nil {
		t.Fatal(err)
	}
	e.cap = c
	if _, err := os.Stat(pin); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("retired pin after Load: %v, want it gone", err)
	}
	retire()
	if err := e.cap.Uninstall(); err != nil {
		t.Fatal(err)
	}
	e.cap = nil
	if _, err := os.Stat(e.pinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin dir after Uninstall: %v, want it gone", err)
	}
}
