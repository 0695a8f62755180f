package xds

import (
	"context"
	"fmt"
	"net/netip"

	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/compile"
)

// Publish is the agent's one call on a policy or pod change: compile the
// policies for source-IP identity against the whole inventory (callers can
// be anywhere), keep the destinations local says run on this node, and
// publish node's snapshot. It returns the version (unchanged when the
// result is) and the compilation, whose reports feed metrics and explain.
func (s *Server) Publish(ctx context.Context, node string, policies []v1alpha1.L7Policy, inv compile.Inventory, local func(netip.Addr) bool, cfg Config) (string, *compile.Result, error) {
	res, err := compile.Compile(policies, inv, compile.Options{Identity: compile.IdentitySourceIP, TrustDomain: s.trustDomainOrDefault()})
	if err != nil {
		return "", nil, fmt.Errorf("publish %s: %w", node, err)
	}
	var dests []Destination
	for _, d := range Destinations(res) {
		if local == nil || local(d.Addr.Addr()) {
			dests = append(dests, d)
		}
	}
	rs, err := Build(dests, cfg)
	if err != nil {
		return "", nil, fmt.Errorf("publish %s: %w", node, err)
	}
	v, err := s.Set(ctx, node, rs)
	return v, res, err
}

// trustDomainOrDefault: source-IP rules only use the trust domain to match
// principals, which name Istio's default unless the mesh says otherwise.
func (s *Server) trustDomainOrDefault() string {
	if s.TrustDomain != "" {
		return s.TrustDomain
	}
	return "cluster.local"
}
