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
	if e.Mode != modeSidecar {
		return nil
	}
	s := capture.Defaults()
	if e.Capture != nil {
		s = *e.Capture
	}
	return Tables(s, captureIPv6(e, s))
}

// captureIPv6 says whether e's pod has its IPv6 captured (and so needs ::6
// on its lo, passthrough.AddIPv6).
func captureIPv6(e store.Entry, s capture.Settings) bool {
	addrs := make([]netip.Addr, 0, len(e.IPs))
	for _, p := range e.IPs {
		addrs = append(addrs, p.Addr())
	}
	return s.CaptureIPv6(addrs)
}

// wantsPassthroughIPv6 is captureIPv6 for an entry in sidecar mode.
func wantsPassthroughIPv6(e store.Entry) bool {
	if e.Mode != modeSidecar {
		return false
	}
	s := capture.Defaults()
	if e.Capture != nil {
		s = *e.Capture
	}
	return captureIPv6(e, s)
}
