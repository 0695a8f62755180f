package xds

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	rbacfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
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
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/status"
	grpcxds "google.golang.org/grpc/xds"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	"sigs.k8s.io/yaml"

	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/compile"
)

const (
	serverNode = "sidelane-node-1"
	clientNode = "test-client"
	target     = "backend"
)

// Pods of the test: the protected server and three callers, each caller a
// distinct loopback source address (Linux routes all of 127/8 to lo).
var (
	serverIP   = netip.MustParseAddr("127.0.0.1")
	webIP      = netip.MustParseAddr("127.0.0.2")
	promIP     = netip.MustParseAddr("127.0.0.3")
	strangerIP = netip.MustParseAddr("127.0.0.9")
)

func inventory() compile.Inventory {
	return compile.Inventory{
		Namespaces: []compile.Namespace{{Name: "shop"}, {Name: "ops", Labels: map[string]string{"team": "infra"}}},
		Pods: []compile.Pod{
			{Namespace: "shop", Name: "api-0", Labels: map[string]string{"app": "api"}, ServiceAccount: "api", IPs: []netip.Addr{serverIP}},
			{Namespace: "shop", Name: "web-0", Labels: map[string]string{"app": "web"}, ServiceAccount: "web", IPs: []netip.Addr{webIP}},
			{Namespace: "ops", Name: "prom-0", Labels: map[string]string{"app": "prometheus"}, ServiceAccount: "prometheus", IPs: []netip.Addr{promIP}},
		},
	}
}

func policies(t *testing.T, port int, doc string) []v1alpha1.L7Policy {
	t.Helper()
	var ps []v1alpha1.L7Policy
	for _, d := range strings.Split(strings.ReplaceAll(doc, "PORT", fmt.Sprint(port)), "\n---\n") {
		var p v1alpha1.L7Policy
		if err := yaml.UnmarshalStrict([]byte(d), &p); err != nil {
			t.Fatalf("policy: %v\n%s", err, d)
		}
		ps = append(ps, p)
	}
	return ps
}

const policyV1 = `metadata: {name: items, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ports:
    - port: PORT
      rules:
        - from: [{serviceAccounts: [shop/web]}]
          http: [{method: POST, path: '/shop\.Items/(Get|List)'}]
        - from: [{namespaces: [ops]}]
          http: [{path: '/grpc\.health\.v1\.Health/Check'}]
        - from: [{podSelector: {matchLabels: {app: web}}}]
          http:
            - path: /shop\.Items/Delete
              headers: [{name: X-Tenant, exact: acme}, {name: x-debug, present: false}]
        - http: [{path: '/public/.*', host: 'backend(:[0-9]+)?'}]
---
metadata: {name: gets, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ports:
    - port: PORT
      rules:
        # gRPC always sends POST: this rule can never match.
        - from: [{serviceAccounts: [shop/web]}]
          http: [{method: GET, path: '/shop\.Items/Put'}]
        - from: [{namespaceSelector: {matchLabels: {team: infra}}}]
          http: [{path: '/shop\.Items/Stats', headers: [{name: x-request-id, regex: '[0-9]+'}]}]`

// policyV2 flips two verdicts: web loses Items/Get, prometheus gains it.
const policyV2 = `metadata: {name: items, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ports:
    - port: PORT
      rules:
        - from: [{principals: ['spiffe://cluster.local/ns/ops/sa/prometheus']}]
          http: [{path: '/shop\.Items/Get'}]`

type call struct {
	name   string
	from   netip.Addr
	method string
	md     []string
	want   codes.Code
}

var tableV1 = []call{
	{"web gets an item", webIP, "/shop.Items/Get", nil, codes.OK},
	{"web lists items", webIP, "/shop.Items/List", nil, codes.OK},
	{"web cannot put (rule wants GET)", webIP, "/shop.Items/Put", nil, codes.PermissionDenied},
	{"prometheus cannot get an item", promIP, "/shop.Items/Get", nil, codes.PermissionDenied},
	{"prometheus health-checks", promIP, "/grpc.health.v1.Health/Check", nil, codes.OK},
	{"web cannot health-check", webIP, "/grpc.health.v1.Health/Check", nil, codes.PermissionDenied},
	{"web deletes for acme", webIP, "/shop.Items/Delete", []string{"x-tenant", "acme"}, codes.OK},
	{"web cannot delete for another tenant", webIP, "/shop.Items/Delete", []string{"x-tenant", "evil"}, codes.PermissionDenied},
	{"web cannot delete without tenant", webIP, "/shop.Items/Delete", nil, codes.PermissionDenied},
	{"web cannot delete with x-debug", webIP, "/shop.Items/Delete", []string{"x-tenant", "acme", "x-debug", "1"}, codes.PermissionDenied},
	{"stranger reaches public", strangerIP, "/public/ping", nil, codes.OK},
	{"stranger cannot get an item", strangerIP, "/shop.Items/Get", nil, codes.PermissionDenied},
	{"prometheus stats with request id", promIP, "/shop.Items/Stats", []string{"x-request-id", "42"}, codes.OK},
	{"prometheus stats with bad request id", promIP, "/shop.Items/Stats", []string{"x-request-id", "abc"}, codes.PermissionDenied},
	{"web cannot get stats", webIP, "/shop.Items/Stats", []string{"x-request-id", "42"}, codes.PermissionDenied},
}

// TestGRPCProxylessRBAC serves the compiled policy from this package's
// snapshot cache to a real grpc-go xDS server (RBAC HTTP filter on its
// server listener) and calls it through a real grpc-go xDS client.
func TestGRPCProxylessRBAC(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	env := startEnv(ctx, t)

	env.apply(ctx, t, policies(t, env.port, policyV1))
	for _, c := range tableV1 {
		t.Run(c.name, func(t *testing.T) {
			if got := env.call(ctx, t, c); got != c.want {
				t.Errorf("%s from %s: got %v, want %v", c.method, c.from, got, c.want)
			}
		})
	}

	// Update: the verdicts flip for new connections once the server ACKed.
	env.apply(ctx, t, policies(t, env.port, policyV2))
	env.eventually(ctx, t, call{"web lost Get", webIP, "/shop.Items/Get", nil, codes.PermissionDenied})
	env.eventually(ctx, t, call{"prometheus gained Get", promIP, "/shop.Items/Get", nil, codes.OK})
	if got := env.call(ctx, t, call{from: promIP, method: "/shop.Items/List"}); got != codes.PermissionDenied {
		t.Errorf("after update, prometheus List: got %v, want PermissionDenied", got)
	}

	// Deleting every policy unprotects the port: everything is allowed.
	env.apply(ctx, t, nil)
	env.eventually(ctx, t, call{"stranger after delete", strangerIP, "/shop.Items/Put", nil, codes.OK})
}

type testEnv struct {
	srv       *Server
	port      int
	bootstrap func(node string) []byte
	resolver  resolver.Builder
}

// serveXDS runs a Server over gRPC on a loopback port until the test ends.
func serveXDS(ctx context.Context, t *testing.T) (*Server, net.Listener) {
	t.Helper()
	srv, err := NewServer(ctx, slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn})), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	xdsLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	srv.Register(g)
	go g.Serve(xdsLis)
	t.Cleanup(g.Stop)
	return srv, xdsLis
}

func startEnv(ctx context.Context, t *testing.T) *testEnv {
	srv, xdsLis := serveXDS(ctx, t)

	bootstrap := func(node string) []byte {
		return []byte(fmt.Sprintf(`{
  "xds_servers": [{"server_uri": %q, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
  "node": {"id": %q},
  "server_listener_resource_name_template": %q
}`, xdsLis.Addr().String(), node, GRPCServerListenerTemplate))
	}

	// The protected gRPC server: handles every method, echoing an Empty.
	appLis, err := net.Listen("tcp", serverIP.String()+":0")
	if err != nil {
		t.Fatal(err)
	}
	port := appLis.Addr().(*net.TCPAddr).Port
	serving := make(chan struct{})
	var once sync.Once
	app, err := grpcxds.NewGRPCServer(
		grpc.Creds(insecure.NewCredentials()),
		grpcxds.BootstrapContentsForTesting(bootstrap(serverNode)),
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
		t.Fatal(err)
	}
	go app.Serve(appLis)
	t.Cleanup(app.Stop)

	// The client's own xDS view: listener "backend" -> cluster -> endpoint.
	if _, err := srv.Set(ctx, clientNode, clientResources(t, netip.AddrPortFrom(serverIP, uint16(port)))); err != nil {
		t.Fatal(err)
	}
	rb, err := grpcxds.NewXDSResolverWithConfigForTesting(bootstrap(clientNode))
	if err != nil {
		t.Fatal(err)
	}
	env := &testEnv{srv: srv, port: port, bootstrap: bootstrap, resolver: rb}
	env.apply(ctx, t, nil)
	select {
	case <-serving:
	case <-ctx.Done():
		t.Fatal("xDS server never started serving")
	}
	return env
}

// apply compiles ps for source-IP identity, publishes the server node's
// snapshot and waits for the gRPC server's xDS client to ACK it.
func (e *testEnv) apply(ctx context.Context, t *testing.T, ps []v1alpha1.L7Policy) {
	t.Helper()
	res, err := compile.Compile(ps, inventory(), compile.Options{Identity: compile.IdentitySourceIP, TrustDomain: "cluster.local"})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range res.Policies {
		if r.Err != nil {
			t.Fatalf("policy %s invalid: %v", r.Name, r.Err)
		}
	}
	rs, err := Build(Destinations(res), Config{GRPCServers: []netip.AddrPort{netip.AddrPortFrom(serverIP, uint16(e.port))}})
	if err != nil {
		t.Fatal(err)
	}
	v, err := e.srv.Set(ctx, serverNode, rs)
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := e.srv.WaitAck(wctx, serverNode, resource.ListenerType, v); err != nil {
		t.Fatal(err)
	}
}

// call makes one RPC on a fresh connection from c.from and returns its code.
func (e *testEnv) call(ctx context.Context, t *testing.T, c call) codes.Code {
	t.Helper()
	src := &net.TCPAddr{IP: c.from.AsSlice()}
	cc, err := grpc.NewClient("xds:///"+target,
		grpc.WithResolvers(e.resolver),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			d := net.Dialer{LocalAddr: src}
			return d.DialContext(ctx, "tcp", addr)
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if len(c.md) > 0 {
		cctx = metadata.AppendToOutgoingContext(cctx, c.md...)
	}
	err = cc.Invoke(cctx, c.method, &emptypb.Empty{}, &emptypb.Empty{}, grpc.WaitForReady(true))
	return status.Code(err)
}

// eventually retries c on new connections: after the ACK, grpc-go applies
// the new listener to connections it accepts from then on.
func (e *testEnv) eventually(ctx context.Context, t *testing.T, c call) {
	t.Helper()
	var got codes.Code
	for i := 0; i < 50; i++ {
		if got = e.call(ctx, t, c); got == c.want {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Errorf("%s: %s from %s still %v, want %v", c.name, c.method, c.from, got, c.want)
}

func clientResources(t *testing.T, backend netip.AddrPort) map[resource.Type][]types.Resource {
	router, _ := toAny(&routerv3.Router{})
	hcm, err := toAny(&hcmv3.HttpConnectionManager{
		RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
			Name: target,
			VirtualHosts: []*routev3.VirtualHost{{Name: target, Domains: []string{"*"}, Routes: []*routev3.Route{{
				Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
				Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: target}}},
			}}}},
		}},
		HttpFilters: []*hcmv3.HttpFilter{{Name: wellknown.Router, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: router}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	return map[resource.Type][]types.Resource{
		resource.ListenerType: {&listenerv3.Listener{Name: target, ApiListener: &listenerv3.ApiListener{ApiListener: hcm}}},
		resource.ClusterType: {&clusterv3.Cluster{
			Name:                 target,
			ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
			EdsClusterConfig: &clusterv3.Cluster_EdsClusterConfig{EdsConfig: &corev3.ConfigSource{
				ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
				ResourceApiVersion:    corev3.ApiVersion_V3,
			}},
			LbPolicy: clusterv3.Cluster_ROUND_ROBIN,
		}},
		resource.EndpointType: {&endpointv3.ClusterLoadAssignment{
			ClusterName: target,
			Endpoints: []*endpointv3.LocalityLbEndpoints{{Locality: &corev3.Locality{Region: "local"}, LoadBalancingWeight: wrapperspb.UInt32(1), LbEndpoints: []*endpointv3.LbEndpoint{{
				HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: socketAddress(backend)}},
			}}}},
		}},
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// TestSameNodeOutboundChainEnforcesPolicy: a per-node pod's connection to
// another per-node pod on the same node is checked on the node proxy's
// outbound listener (its upstream leg is not captured again, see
// outboundListener). The RBAC on that chain must be the destination's own
// policy: the same as its in-pod inbound listener's, and enforced the same
// way. The test takes the RBAC out of the outbound listener Build produced
// and has a real grpc-go xDS server enforce exactly that config.
func TestSameNodeOutboundChainEnforcesPolicy(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	env := startEnv(ctx, t)
	res, err := compile.Compile(policies(t, env.port, policyV1), inventory(), compile.Options{Identity: compile.IdentitySourceIP, TrustDomain: "cluster.local"})
	if err != nil {
		t.Fatal(err)
	}
	dst := netip.AddrPortFrom(serverIP, uint16(env.port))
	rs, err := Build(Destinations(res), Config{
		InboundPort: 15006,
		InPod:       []InPodListener{{Pod: "shop/api-0", Netns: "/var/run/netns/api-0", IPs: []netip.Addr{serverIP}}},
		Outbound:    netip.MustParseAddrPort("10.244.1.1:15001"),
	})
	if err != nil {
		t.Fatal(err)
	}
	chainRBAC := func(name string) *rbacfilterv3.RBAC {
		t.Helper()
		for _, r := range rs[resource.ListenerType] {
			l := r.(*listenerv3.Listener)
			if l.Name != name {
				continue
			}
			for _, fc := range l.FilterChains {
				if fc.Name != dst.String() {
					continue
				}
				var hcm hcmv3.HttpConnectionManager
				if err := fc.Filters[0].GetTypedConfig().UnmarshalTo(&hcm); err != nil {
					t.Fatal(err)
				}
				for _, f := range hcm.HttpFilters {
					if f.Name == RBACFilterName {
						var rb rbacfilterv3.RBAC
						if err := f.GetTypedConfig().UnmarshalTo(&rb); err != nil {
							t.Fatal(err)
						}
						return &rb
					}
				}
			}
		}
		t.Fatalf("listener %s has no RBAC chain for %s", name, dst)
		return nil
	}
	out, in := chainRBAC(OutboundListener), chainRBAC(InPodListenerPrefix+"shop/api-0")
	if !proto.Equal(out, in) {
		t.Fatalf("outbound chain's RBAC differs from the destination's inbound one:\n%v\n%v", out, in)
	}
	l, err := grpcServerListener(dst, out)
	if err != nil {
		t.Fatal(err)
	}
	v, err := env.srv.Set(ctx, serverNode, map[resource.Type][]types.Resource{resource.ListenerType: {l}})
	if err != nil {
		t.Fatal(err)
	}
	if err := env.srv.WaitAck(ctx, serverNode, resource.ListenerType, v); err != nil {
		t.Fatal(err)
	}
	for _, c := range tableV1 {
		t.Run(c.name, func(t *testing.T) {
			if got := env.call(ctx, t, c); got != c.want {
				t.Errorf("%s from %s: got %v, want %v", c.method, c.from, got, c.want)
			}
		})
	}
}
