package iptables

import (
	"log/slog"
	"net/netip"

	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/istio/capture"
)

// Log attribute keys.
const (
	logNetns  = "netns"
	logFamily = "family"
	logRules  = "rules"
)

// Backend implements datapath.Datapath with Istio's iptables rules.
type Backend struct {
	log *slog.Logger
}

// New returns the iptables backend.
func New(log *slog.Logger) *Backend {
	if log == nil {
		log = slog.Default()
	}
	return &Backend{log: log}
}

// Name implements datapath.Datapath.
func (*Backend) Name() string { return "iptables" }

// modeSidecar is agent.ModeSidecar (not imported: the agent imports
// backends, not the other way round). Other modes get no rules.
const modeSidecar = "sidecar"

// Desired is the rule set for an entry, per family. IPv6 rules are empty
// when Istio would not capture IPv6 in this pod (see
// capture.Settings.CaptureIPv6); a nil Capture in sidecar mode means
// Istio's defaults (fail closed).
func Desired(e store.Entry) (v4, v6 []Rule) {
	if e.Mode != modeSidecar {
		return nil, nil
	}
	s := capture.Defaults()
	if e.Capture != nil {
		s = *e.Capture
	}
	v4 = Rules(s, IPv4)
	addrs := make([]netip.Addr, 0, len(e.IPs))
	for _, p := range e.IPs {
		addrs = append(addrs, p.Addr())
	}
	if s.CaptureIPv6(addrs) {
		v6 = Rules(s, IPv6)
	}
	return v4, v6
}
