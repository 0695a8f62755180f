package istiod

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	netrbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"

	"github.com/sidelane/sidelane/policy/envoyfilter"
)

// virtualInbound is the sidecar's inbound listener (all captured inbound
// traffic, one filter chain per destination port and transport).
const virtualInbound = "virtualInbound"

// tcpFilterName is sidelane's network RBAC filter on the TCP chains of a
// protected port.
const tcpFilterName = envoyfilter.NetworkFilterName

// hcmChain is one HTTP connection manager istiod put in a filter chain.
type hcmChain struct {
	Listener  string
	Chain     string
	Port      uint32 // filter_chain_match.destination_port, 0 when unset
	Transport string // filter_chain_match.transport_protocol
	Filters   []string
	Sidelane  *rbacfilterv3.RBAC // sidelane's filter config, nil when absent
	sidelanes int
	// IstioRBAC is Istio's own RBAC HTTP filter (AuthorizationPolicy), as sent.
	IstioRBAC *hcmv3.HttpFilter
}

func (c hcmChain) String() string {
	return fmt.Sprintf("%s/%s (port %d, %s): %s", c.Listener, c.Chain, c.Port, c.Transport, strings.Join(c.Filters, " > "))
}

// tcpChain is a filter chain without an HTTP connection manager.
type tcpChain struct {
	Listener, Chain string
	Port            uint32
	Filters         []string        // network filter names
	Sidelane        *netrbacv3.RBAC // sidelane's network RBAC config, nil when absent
	sidelanes       int
}

func (c tcpChain) String() string {
	return fmt.Sprintf("%s/%s (port %d): %s", c.Listener, c.Chain, c.Port, strings.Join(c.Filters, " > "))
}

// view splits a proxy's listeners into HTTP and TCP filter chains.
func view(t *testing.T, ls []*listenerv3.Listener) (httpChains []hcmChain, tcpChains []tcpChain) {
	t.Helper()
	for _, l := range ls {
		chains := slices.Clone(l.GetFilterChains())
		if d := l.GetDefaultFilterChain(); d != nil {
			chains = append(chains, d)
		}
		for _, fc := range chains {
			port := fc.GetFilterChainMatch().GetDestinationPort().GetValue()
			var netNames []string
			isHTTP := false
			tc := tcpChain{Listener: l.GetName(), Chain: fc.GetName(), Port: port}
			for _, f := range fc.GetFilters() {
				netNames = append(netNames, f.GetName())
				if f.GetName() == tcpFilterName {
					tc.sidelanes++
					var r netrbacv3.RBAC
					if err := f.GetTypedConfig().UnmarshalTo(&r); err != nil {
						t.Fatalf("listener %s chain %s: sidelane network filter is not network RBAC (%s): %v", l.GetName(), fc.GetName(), f.GetTypedConfig().GetTypeUrl(), err)
					}
					tc.Sidelane = &r
				}
				if f.GetName() != wellknown.HTTPConnectionManager {
					continue
				}
				isHTTP = true
				var h hcmv3.HttpConnectionManager
				if err := f.GetTypedConfig().UnmarshalTo(&h); err != nil {
					t.Fatalf("listener %s chain %s: hcm: %v", l.GetName(), fc.GetName(), err)
				}
				c := hcmChain{Listener: l.GetName(), Chain: fc.GetName(), Port: port, Transport: fc.GetFilterChainMatch().GetTransportProtocol()}
				for _, hf := range h.GetHttpFilters() {
					c.Filters = append(c.Filters, hf.GetName())
					if hf.GetName() == wellknown.HTTPRoleBasedAccessControl {
						c.IstioRBAC = hf
					}
					if hf.GetName() != envoyfilter.FilterName {
						continue
					}
					c.sidelanes++
					var r rbacfilterv3.RBAC
					if err := hf.GetTypedConfig().UnmarshalTo(&r); err != nil {
						t.Fatalf("%s: sidelane filter is not RBAC (%s): %v", c, hf.GetTypedConfig().GetTypeUrl(), err)
					}
					c.Sidelane = &r
				}
				httpChains = append(httpChains, c)
			}
			if !isHTTP {
				tc.Filters = netNames
				tcpChains = append(tcpChains, tc)
			}
		}
	}
	return httpChains, tcpChains
}

// inboundTCP returns the virtualInbound TCP chains of port.
func inboundTCP(chains []tcpChain, port uint32) []tcpChain {
	var out []tcpChain
	for _, c := range chains {
		if c.Listener == virtualInbound && c.Port == port {
			out = append(out, c)
		}
	}
	return out
}

// inbound returns the virtualInbound HTTP chains of port.
func inbound(chains []hcmChain, port uint32) []hcmChain {
	var out []hcmChain
	for _, c := range chains {
		if c.Listener == virtualInbound && c.Port == port {
			out = append(out, c)
		}
	}
	return out
}
