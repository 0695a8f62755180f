package nftables

import (
	"log/slog"
	"net/netip"

	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/istio/capture"
)

// Log attribute keys.
const (
	logNetns  = "netns"
	logTables = "tables"
)

// Backend implements datapath.Datapath with Istio's nftables rules.
type Backend struct {
	log *slog.Logger
}

// New returns the nftables backend.
func New(log *slog.Logger) *Backend {
	if log == nil {
		log = slog.Default()
	}
	return &Backend{log: log}
}

// Name implements datapath.Datapath.
func (*Backend) Name() string { return "nftables" }

// modeSidecar is agent.ModeSidecar (not imported: the agent imports
// backends, not the other way round). Other modes get no tables.
const modeSidecar = "sidecar"

// Desired is the tables for an entry. IPv6 is captured when Istio's
// iptables backend would capture it (capture.Settings.CaptureIPv6); a nil
// Capture in sidecar mode means Istio's defaults (fail closed).
func Desired(e store.Entry) []Table {
	t, _ := desired(e)
	return t
}

// desired is Desired and whether it captures IPv6 (the pod then needs ::6
// on its lo, passthrough.AddIPv6).
func desired(e store.Entry) ([]Table, bool) {
	if e.Mode != modeSidecar {
		return nil, false
	}
	s := capture.Defaults()
	if e.Capture != nil {
		s = *e.Capture
	}
	addrs := make([]netip.Addr, 0, len(e.IPs))
	for _, p := range e.IPs {
		addrs = append(addrs, p.Addr())
	}
	v6 := s.CaptureIPv6(addrs)
	return Tables(s, v6), v6
}
