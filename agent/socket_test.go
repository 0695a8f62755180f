package agent

import (
	"log/slog"
	"path/filepath"
	"slices"
	"testing"

	"github.com/sidelane/sidelane/agent/cnirpc"
	"github.com/sidelane/sidelane/agent/metrics"
)

// TestSocketPeerPolicyWired: the agent hands its uid allow-list to the
// socket server (cnirpc.TestPeerCredentials checks the server refuses
// others), and a refused peer counts as sidelane_errors_total{op="socket_peer"}.
func TestSocketPeerPolicyWired(t *testing.T) {
	dir := t.TempDir()
	m := metrics.New(func() map[string]int { return nil })
	a, err := New(Config{Socket: filepath.Join(dir, "cni.sock"), StateDir: dir, Log: slog.New(slog.DiscardHandler),
		Metrics: m, SocketAllowUIDs: []uint32{7}})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(a.server.AllowUIDs, []uint32{7}) {
		t.Fatalf("server allow-list %v, want [7]", a.server.AllowUIDs)
	}
	a.server.Refused(cnirpc.Peer{UID: 1000})
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := -1.0
	for _, mf := range mfs {
		if mf.GetName() != "sidelane_errors_total" {
			continue
		}
		for _, mt := range mf.GetMetric() {
			for _, l := range mt.GetLabel() {
				if l.GetName() == "op" && l.GetValue() == "socket_peer" {
					got = mt.GetCounter().GetValue()
				}
			}
		}
	}
	if got != 1 {
		t.Fatalf("sidelane_errors_total{op=\"socket_peer\"} = %v, want 1", got)
	}
}
