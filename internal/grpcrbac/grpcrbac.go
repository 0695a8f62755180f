// Package grpcrbac runs a real xDS client/server pair from grpc-go
// (proxyless gRPC) fed by sidelane's own xDS server (agent/xds): the gRPC
// server enforces the RBAC HTTP filter of the listener it receives, built
// from an L7 policy compilation, and the gRPC client reaches it through its
// own xDS view. It is how the demo shows an L7 policy's verdicts without
// Envoy (there is none on this machine); agent/xds's grpcxds tests do the
// same inside their test package.
package grpcrbac

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/status"
	grpcxds "google.golang.org/grpc/xds"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/sidelane/sidelane/agent/xds"
	"github.com/sidelane/sidelane/policy/compile"
)

// xDS node IDs of the two grpc-go xDS clients, and the client's target.
const (
	ServerNode = "sidelane-grpc-server"
	ClientNode = "sidelane-grpc-client"
	Target     = "backend"
)

// Options configure a Pair.
type Options struct {
	Log *slog.Logger
	// Listener is the protected gRPC server's listener. Its address names
	// the server's xDS listener, so it must be the real address the
	// policy protects (not a wildcard).
	Listener net.Listener
	// Dial opens one client connection from src to addr (nil: a
	// net.Dialer bound to src).
	Dial func(ctx context.Context, src netip.Addr, addr string) (net.Conn, error)
}

// Pair is the running xDS server, gRPC server and client resolver.
type Pair struct {
	addr     netip.AddrPort
	srv      *xds.Server
	grpcSrv  *grpc.Server
	app      *grpcxds.GRPCServer
	resolver resolver.Builder
	dial     func(ctx context.Context, src netip.Addr, addr string) (net.Conn, error)
	cancel   context.CancelFunc
}

// Start serves xDS on a loopback port, starts the protected gRPC server on
// o.Listener (every method answered with an Empty), publishes an
// unprotected listener and returns once the server serves with it.
func Start(ctx context.Context, o Options) (_ *Pair, err error) {
	ap, err := netip.ParseAddrPort(o.Listener.Addr().String())
	if err != nil || ap.Addr().IsUnspecified() {
		return nil, fmt.Errorf("listener address %s: want a specific address and port", o.Listener.Addr())
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	p := &Pair{addr: ap, dial: o.Dial}
	if p.dial == nil {
		p.dial = func(ctx context.Context, src netip.Addr, addr string) (net.Conn, error) {
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}}
			return d.DialContext(ctx, "tcp", addr)
		}
	}
	var xctx context.Context
	xctx, p.cancel = context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			p.Close()
		}
	}()
	p.srv, err = xds.NewServer(xctx, o.Log, prometheus.NewRegistry())
	if err != nil {
		return nil, err
	}
	xdsLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("xds listener: %w", err)
	}
	p.grpcSrv = grpc.NewServer()
	p.srv.Register(p.grpcSrv)
	go func() { _ = p.grpcSrv.Serve(xdsLis) }()
	bootstrap := func(node string) []byte {
		return fmt.Appendf(nil, `{
  "xds_servers": [{"server_uri": %q, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
  "node": {"id": %q},
  "server_listener_resource_name_template": %q
}`, xdsLis.Addr().String(), node, xds.GRPCServerListenerTemplate)
	}

	serving := make(chan struct{})
	var once sync.Once
	p.app, err = grpcxds.NewGRPCServer(
		grpc.Creds(insecure.NewCredentials()),
		grpcxds.BootstrapContentsForTesting(bootstrap(ServerNode)),
		grpcxds.ServingModeCallback(func(_ net.Addr, a grpcxds.ServingModeChangeArgs) {
			if a.Mode == connectivity.ServingModeServing {
				once.Do(func() { close(serving) })
			}
		}),
		grpc.UnknownServiceHandler(func(_ any, st grpc.ServerStream) error {
			var m emptypb.Empty
			if err := st.RecvMsg(&m); err != nil {
				return err
			}
			return st.SendMsg(&m)
		}),
	)
	if err != nil {
		return nil, fmt.Errorf("grpc xds server: %w", err)
	}
	go func() { _ = p.app.Serve(o.Listener) }()

	cres, err := clientResources(ap)
	if err != nil {
		return nil, err
	}
	if _, err := p.srv.Set(ctx, ClientNode, cres); err != nil {
		return nil, err
	}
	p.resolver, err = grpcxds.NewXDSResolverWithConfigForTesting(bootstrap(ClientNode))
	if err != nil {
		return nil, fmt.Errorf("grpc xds resolver: %w", err)
	}
	if _, err := p.Apply(ctx, &compile.Result{}); err != nil {
		return nil, err
	}
	select {
	case <-serving:
	case <-ctx.Done():
		return nil, fmt.Errorf("grpc xds server never started serving: %w", ctx.Err())
	}
	return p, nil
}

// Addr is the protected server's address.
func (p *Pair) Addr() netip.AddrPort { return p.addr }

// Apply builds the gRPC server's listener from res (agent/xds.Build, the
// node proxy's compilation: source-IP identities), publishes it and waits
// until the server ACKs it. It returns the snapshot version. New
// connections get the new rules.
func (p *Pair) Apply(ctx context.Context, res *compile.Result) (string, error) {
	rs, err := xds.Build(xds.Destinations(res), xds.Config{GRPCServers: []netip.AddrPort{p.addr}})
	if err != nil {
		return "", err
	}
	v, err := p.srv.Set(ctx, ServerNode, rs)
	if err != nil {
		return "", err
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := p.srv.WaitAck(wctx, ServerNode, resource.ListenerType, v); err != nil {
		return "", err
	}
	return v, nil
}

// Call makes one RPC (an Empty) on a new connection from src and returns
// its status code; err is set when the call could not be made at all.
func (p *Pair) Call(ctx context.Context, src netip.Addr, method string) (codes.Code, error) {
	cc, err := grpc.NewClient("xds:///"+Target,
		grpc.WithResolvers(p.resolver),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) { return p.dial(ctx, src, addr) }))
	if err != nil {
		return codes.Unknown, fmt.Errorf("grpc client: %w", err)
	}
	defer cc.Close()
	cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	err = cc.Invoke(cctx, method, &emptypb.Empty{}, &emptypb.Empty{}, grpc.WaitForReady(true))
	code := status.Code(err)
	if errors.Is(cctx.Err(), context.DeadlineExceeded) {
		return code, fmt.Errorf("%s from %s: %w", method, src, err)
	}
	return code, nil
}

// Close stops the servers.
func (p *Pair) Close() {
	if p.app != nil {
		p.app.Stop()
	}
	if p.grpcSrv != nil {
		p.grpcSrv.Stop()
	}
	p.cancel()
}

// clientResources is the client's xDS view: listener Target -> cluster ->
// the one endpoint backend.
func clientResources(backend netip.AddrPort) (map[resource.Type][]types.Resource, error) {
	router, err := anypb.New(&routerv3.Router{})
	if err != nil {
		return nil, err
	}
	hcm, err := anypb.New(&hcmv3.HttpConnectionManager{
		RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
			Name: Target,
			VirtualHosts: []*routev3.VirtualHost{{Name: Target, Domains: []string{"*"}, Routes: []*routev3.Route{{
				Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
				Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: Target}}},
			}}}},
		}},
		HttpFilters: []*hcmv3.HttpFilter{{Name: wellknown.Router, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: router}}},
	})
	if err != nil {
		return nil, err
	}
	addr := &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: backend.Addr().String(), PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(backend.Port())},
	}}}
	return map[resource.Type][]types.Resource{
		resource.ListenerType: {&listenerv3.Listener{Name: Target, ApiListener: &listenerv3.ApiListener{ApiListener: hcm}}},
		resource.ClusterType: {&clusterv3.Cluster{
			Name:                 Target,
			ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
			EdsClusterConfig: &clusterv3.Cluster_EdsClusterConfig{EdsConfig: &corev3.ConfigSource{
				ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
				ResourceApiVersion:    corev3.ApiVersion_V3,
			}},
			LbPolicy: clusterv3.Cluster_ROUND_ROBIN,
		}},
		resource.EndpointType: {&endpointv3.ClusterLoadAssignment{
			ClusterName: Target,
			Endpoints: []*endpointv3.LocalityLbEndpoints{{Locality: &corev3.Locality{Region: "local"}, LoadBalancingWeight: wrapperspb.UInt32(1), LbEndpoints: []*endpointv3.LbEndpoint{{
				HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: addr}},
			}}}},
		}},
	}, nil
}
