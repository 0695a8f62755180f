// Package xds serves the per-node Envoy of the sidecar-free mode (and any
// proxyless gRPC server on the node) from a go-control-plane snapshot cache:
// a listener for the redirected inbound traffic that forwards each connection
// to its original destination, with the compiled L7 policy (Envoy RBAC HTTP
// filter) in front of every protected destination pod and port. Callers are
// identified by source IP: the agent knows every pod's address.
package xds

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	rbacfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	origdstv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/sidelane/sidelane/policy/compile"
)

// Resource names the per-node Envoy sees.
const (
	InboundListener    = "sidelane_inbound"
	OriginalDstCluster = "sidelane_original_dst"
	// BlackHoleCluster has no endpoints: a connection sent there is
	// closed at once (Istio's BlackHoleCluster).
	BlackHoleCluster = "sidelane_blackhole"
	// BlackHoleChain names the filter chain that catches connections whose
	// original destination is the listener itself.
	BlackHoleChain = "blackhole"
	// RBACFilterName is the HTTP filter's name; Envoy picks the
	// implementation by the typed_config type URL.
	RBACFilterName = "sidelane.l7policy"
	// GRPCServerListenerTemplate is grpc-go's default
	// server_listener_resource_name_template: a proxyless gRPC server asks
	// for the listener named after its real listen address.
	GRPCServerListenerTemplate = "grpc/server?xds.resource.listening_address=%s"
)

// Config shapes the node's resources.
type Config struct {
	// InboundPort is where the capture layer redirects inbound pod traffic
	// for the node Envoy (0: no Envoy listener).
	InboundPort uint32
	// GRPCServers are proxyless gRPC servers on the node (their listen
	// addresses); each gets a server listener with the same RBAC rules.
	GRPCServers []netip.AddrPort
	// InPod are the node's per-node pods. With any, the inbound listener
	// is one per pod, opened inside the pod's netns on InboundPort (Envoy
	// network_namespace_filepath), where the eBPF inbound capture hands
	// connections to, instead of the one host listener.
	InPod []InPodListener
	// Outbound is the node proxy's outbound listener, where the eBPF
	// connect hooks send per-node pods' connections (invalid: none).
	Outbound netip.AddrPort
	// UpstreamSource is the address upstream connections leave from: the
	// node proxy's address, which inbound capture lets through, so a
	// connection is never captured twice (invalid: the kernel's choice).
	UpstreamSource netip.Addr
}

// InPodListener is one per-node pod's inbound listener.
type InPodListener struct {
	Pod   string       // namespace/name, for the listener's name
	Netns string       // path of the pod's network namespace
	IPs   []netip.Addr // the pod's addresses: its protected destinations
}

// OutboundListener is the node proxy's outbound listener name;
// InPodListenerPrefix + "<namespace>/<name>" names a pod's inbound one.
const (
	OutboundListener    = "sidelane_outbound"
	InPodListenerPrefix = "sidelane_inbound/"
)

// Destination is one protected pod address and port.
type Destination struct {
	Addr netip.AddrPort
	RBAC *rbacfilterv3.RBAC
}

// Destinations flattens a compilation into per-address rules, sorted.
func Destinations(res *compile.Result) []Destination {
	seen := map[netip.AddrPort]bool{}
	var out []Destination
	for _, g := range res.Groups {
		for _, pod := range g.Pods {
			for _, ip := range pod.IPs {
				for _, p := range g.Ports {
					ap := netip.AddrPortFrom(ip, uint16(p.Port))
					if seen[ap] { // two pods claiming one IP (hostNetwork): first wins
						continue
					}
					seen[ap] = true
					out = append(out, Destination{Addr: ap, RBAC: p.RBAC})
				}
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Addr.Compare(out[j].Addr) < 0 })
	return out
}

// Build returns the node's listeners and clusters. Routes are inline in each
// HTTP connection manager and the one cluster needs no endpoints, so the
// snapshot is self-contained (no RDS/EDS ordering to get wrong).
func Build(dests []Destination, cfg Config) (map[resource.Type][]types.Resource, error) {
	out := map[resource.Type][]types.Resource{}
	needCluster := false
	// local: the protected destinations of this node's per-node pods.
	var local []Destination
	switch {
	case cfg.InboundPort != 0 && len(cfg.InPod) > 0:
		for _, p := range cfg.InPod {
			var mine []Destination
			for _, d := range dests {
				if slices.Contains(p.IPs, d.Addr.Addr()) {
					mine = append(mine, d)
				}
			}
			l, err := inboundListener(mine, cfg.InboundPort)
			if err != nil {
				return nil, err
			}
			local = append(local, mine...)
			l.Name = InPodListenerPrefix + p.Pod
			l.Address.GetSocketAddress().NetworkNamespaceFilepath = p.Netns
			out[resource.ListenerType] = append(out[resource.ListenerType], l)
		}
		needCluster = true
	case cfg.InboundPort != 0:
		l, err := inboundListener(dests, cfg.InboundPort)
		if err != nil {
			return nil, err
		}
		out[resource.ListenerType] = append(out[resource.ListenerType], l)
		needCluster = true
	}
	if cfg.Outbound.IsValid() {
		l, err := outboundListener(cfg.Outbound, local)
		if err != nil {
			return nil, err
		}
		out[resource.ListenerType] = append(out[resource.ListenerType], l)
		needCluster = true
	}
	if needCluster {
		c := &clusterv3.Cluster{
			Name:                 OriginalDstCluster,
			ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_ORIGINAL_DST},
			LbPolicy:             clusterv3.Cluster_CLUSTER_PROVIDED,
			ConnectTimeout:       durationpb.New(5 * time.Second),
		}
		if cfg.UpstreamSource.IsValid() {
			c.UpstreamBindConfig = &corev3.BindConfig{SourceAddress: socketAddress(netip.AddrPortFrom(cfg.UpstreamSource, 0)).GetSocketAddress()}
		}
		out[resource.ClusterType] = append(out[resource.ClusterType], c,
			&clusterv3.Cluster{
				Name:                 BlackHoleCluster,
				ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
				ConnectTimeout:       durationpb.New(time.Second),
			})
	}
	byAddr := map[netip.AddrPort]*rbacfilterv3.RBAC{}
	for _, d := range dests {
		byAddr[d.Addr] = d.RBAC
	}
	for _, ap := range cfg.GRPCServers {
		l, err := grpcServerListener(ap, byAddr[ap])
		if err != nil {
			return nil, err
		}
		out[resource.ListenerType] = append(out[resource.ListenerType], l)
	}
	for typ, rs := range out {
		for _, r := range rs {
			if v, ok := r.(interface{ ValidateAll() error }); ok {
				if err := v.ValidateAll(); err != nil {
					return nil, fmt.Errorf("build %s: %w", typ, err)
				}
			}
		}
	}
	return out, nil
}

// inboundListener receives redirected connections, restores their original
// destination (original_dst listener filter) and picks the filter chain by
// destination pod IP and port: protected ones go through HTTP + RBAC, the
// rest are passed through as TCP. A connection whose destination is the
// listener's own port (reached directly, so no original destination to
// restore) goes to the black hole: passing it through would connect the
// proxy to itself, again and again, until it runs out of descriptors.
func inboundListener(dests []Destination, port uint32) (*listenerv3.Listener, error) {
	od, err := toAny(&origdstv3.OriginalDst{})
	if err != nil {
		return nil, err
	}
	tp, err := tcpProxy("sidelane_passthrough", OriginalDstCluster)
	if err != nil {
		return nil, err
	}
	bh, err := tcpProxy("sidelane_blackhole", BlackHoleCluster)
	if err != nil {
		return nil, err
	}
	l := &listenerv3.Listener{
		Name:            InboundListener,
		Address:         socketAddress(netip.AddrPortFrom(netip.IPv4Unspecified(), uint16(port))),
		ListenerFilters: []*listenerv3.ListenerFilter{{Name: wellknown.OriginalDestination, ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: od}}},
		DefaultFilterChain: &listenerv3.FilterChain{
			Name:    "passthrough",
			Filters: []*listenerv3.Filter{{Name: wellknown.TCPProxy, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: tp}}},
		},
		FilterChains: []*listenerv3.FilterChain{{
			Name:             BlackHoleChain,
			FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(port)},
			Filters:          []*listenerv3.Filter{{Name: wellknown.TCPProxy, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: bh}}},
		}},
	}
	for _, d := range dests {
		route := &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: OriginalDstCluster}}}
		hcm, err := httpManager(d.Addr, route, d.RBAC)
		if err != nil {
			return nil, err
		}
		l.FilterChains = append(l.FilterChains, &listenerv3.FilterChain{
			Name: d.Addr.String(),
			FilterChainMatch: &listenerv3.FilterChainMatch{
				PrefixRanges:    []*corev3.CidrRange{cidr(d.Addr.Addr())},
				DestinationPort: wrapperspb.UInt32(uint32(d.Addr.Port())),
			},
			Filters: []*listenerv3.Filter{hcm},
		})
	}
	return l, nil
}

// outboundListener takes the per-node pods' redirected connections and
// passes them to their original destination (SO_ORIGINAL_DST, answered by
// sidelane's getsockopt hook). Policy applies at the destination's proxy:
// a sidecar, another node's proxy (its in-pod inbound listener), or, for
// a per-node pod on this node (local), here. The proxy's upstream leg to a
// same-node per-node pod leaves from the node proxy's address, which
// inbound capture trusts (it is also how the in-pod listeners' own
// upstream legs reach their pod), so that pod's chains must be on this
// listener, where the caller is still the real client.
func outboundListener(ap netip.AddrPort, local []Destination) (*listenerv3.Listener, error) {
	l, err := inboundListener(local, uint32(ap.Port()))
	if err != nil {
		return nil, err
	}
	l.Name = OutboundListener
	l.Address = socketAddress(ap)
	return l, nil
}

// grpcServerListener is the same policy in the shape grpc-go's xDS server
// accepts: named after the listen address, no listener filters, a chain
// matched on the destination IP only (grpc-go drops chains that match on
// destination_port), and the non-forwarding route action servers require.
// rbac nil means the address is not protected.
func grpcServerListener(ap netip.AddrPort, rbac *rbacfilterv3.RBAC) (*listenerv3.Listener, error) {
	hcm, err := httpManager(ap, &routev3.Route_NonForwardingAction{NonForwardingAction: &routev3.NonForwardingAction{}}, rbac)
	if err != nil {
		return nil, err
	}
	return &listenerv3.Listener{
		Name:    fmt.Sprintf(GRPCServerListenerTemplate, ap),
		Address: socketAddress(ap),
		FilterChains: []*listenerv3.FilterChain{{
			Name:             ap.String(),
			FilterChainMatch: &listenerv3.FilterChainMatch{PrefixRanges: []*corev3.CidrRange{cidr(ap.Addr())}},
			Filters:          []*listenerv3.Filter{hcm},
		}},
	}, nil
}

func httpManager(ap netip.AddrPort, action any, rbac *rbacfilterv3.RBAC) (*listenerv3.Filter, error) {
	route := &routev3.Route{Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}}}
	switch a := action.(type) {
	case *routev3.Route_Route:
		route.Action = a
	case *routev3.Route_NonForwardingAction:
		route.Action = a
	}
	var filters []*hcmv3.HttpFilter
	if rbac != nil {
		f, err := HTTPFilter(rbac)
		if err != nil {
			return nil, err
		}
		filters = append(filters, f)
	}
	router, err := toAny(&routerv3.Router{})
	if err != nil {
		return nil, err
	}
	filters = append(filters, &hcmv3.HttpFilter{Name: wellknown.Router, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: router}})
	m := &hcmv3.HttpConnectionManager{
		// Dots separate Envoy stat name segments: keep the address one segment.
		StatPrefix: "sidelane_inbound_" + strings.NewReplacer(".", "_", ":", "_", "[", "", "]", "").Replace(ap.String()),
		CodecType:  hcmv3.HttpConnectionManager_AUTO,
		RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
			Name: "inbound|" + ap.String(),
			VirtualHosts: []*routev3.VirtualHost{{
				Name: "inbound", Domains: []string{"*"}, Routes: []*routev3.Route{route},
			}},
		}},
		HttpFilters: filters,
	}
	a, err := toAny(m)
	if err != nil {
		return nil, err
	}
	return &listenerv3.Filter{Name: wellknown.HTTPConnectionManager, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: a}}, nil
}

// HTTPFilter wraps a compiled RBAC config as an HTTP filter.
func HTTPFilter(rbac *rbacfilterv3.RBAC) (*hcmv3.HttpFilter, error) {
	a, err := toAny(rbac)
	if err != nil {
		return nil, fmt.Errorf("rbac filter: %w", err)
	}
	return &hcmv3.HttpFilter{Name: RBACFilterName, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: a}}, nil
}

func tcpProxy(stat, cluster string) (*anypb.Any, error) {
	return toAny(&tcpproxyv3.TcpProxy{StatPrefix: stat, ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: cluster}})
}

func socketAddress(ap netip.AddrPort) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address:       ap.Addr().String(),
		PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(ap.Port())},
	}}}
}

func cidr(ip netip.Addr) *corev3.CidrRange {
	return &corev3.CidrRange{AddressPrefix: ip.String(), PrefixLen: wrapperspb.UInt32(uint32(ip.BitLen()))}
}

// toAny marshals deterministically (RBAC policies are a map), so equal
// configs give equal bytes and equal snapshot versions.
func toAny(m proto.Message) (*anypb.Any, error) {
	a := &anypb.Any{}
	if err := anypb.MarshalFrom(a, m, proto.MarshalOptions{Deterministic: true}); err != nil {
		return nil, err
	}
	return a, nil
}
