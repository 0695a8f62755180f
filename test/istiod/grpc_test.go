package istiod

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"log/slog"
	"math/big"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
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
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	xdscreds "google.golang.org/grpc/credentials/xds"
	"google.golang.org/grpc/status"
	grpcxds "google.golang.org/grpc/xds"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	sidelanexds "github.com/sidelane/sidelane/agent/xds"
)

// policyMTLS is agent/xds's TestGRPCProxylessRBACPeerCertificate policy
// (same rules, same callers, same verdicts), on api-0's port 8080.
const policyMTLS = `apiVersion: sidelane.io/v1alpha1
kind: L7Policy
metadata: {name: api, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ports:
    - port: 8080
      rules:
        - from: [{serviceAccounts: [shop/web]}]
          http: [{path: '/shop\.Items/Get'}]
        - from: [{namespaces: [ops]}]
          http: [{path: '/grpc\.health\.v1\.Health/Check'}]
        - from: [{principals: ['spiffe://cluster.local/ns/ops/*']}]
          http: [{path: '/shop\.Items/Stats'}]
        - from: [{podSelector: {matchLabels: {app: web}}}]
          http: [{path: '/shop\.Items/Delete'}]
`

// identities of the callers: certificate provider instance -> SPIFFE ID.
var identities = map[string]string{
	"server":   "spiffe://cluster.local/ns/shop/sa/api",
	"web":      "spiffe://cluster.local/ns/shop/sa/web",
	"prom":     "spiffe://cluster.local/ns/ops/sa/prometheus",
	"stranger": "spiffe://other.example/ns/shop/sa/web",
}

type verdict struct {
	from, method string
	want         codes.Code
}

// verdictsMTLS are agent/xds's verdicts for policyMTLS.
var verdictsMTLS = []verdict{
	{"web", "/shop.Items/Get", codes.OK},
	{"prom", "/shop.Items/Get", codes.PermissionDenied},
	{"stranger", "/shop.Items/Get", codes.PermissionDenied}, // same ns/sa, other trust domain
	{"prom", "/grpc.health.v1.Health/Check", codes.OK},
	{"web", "/grpc.health.v1.Health/Check", codes.PermissionDenied},
	{"prom", "/shop.Items/Stats", codes.OK},
	{"web", "/shop.Items/Stats", codes.PermissionDenied},
	{"web", "/shop.Items/Delete", codes.OK},
	{"stranger", "/shop.Items/Delete", codes.PermissionDenied},
}

const (
	grpcServerNode = "api-0"
	grpcTarget     = "backend"
)

// enforce serves rbac (taken from istiod's LDS), after the HTTP filters
// before (Istio's own, also from istiod's LDS), on a real grpc-go xDS
// server listener with mTLS (client certificate required, callers named by
// the SPIFFE URI SAN as in Istio) and checks the verdicts.
// appLis is the protected server's listener (nil: a new one on a free
// loopback port).
func enforce(ctx context.Context, t *testing.T, appLis net.Listener, before []*hcmv3.HttpFilter, rbac *rbacfilterv3.RBAC, verdicts []verdict) {
	providers := writeCerts(t)
	srv, err := sidelanexds.NewServer(ctx, slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn})), prometheus.NewRegistry())
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
	bootstrap := func(node string) []byte {
		b, err := json.Marshal(map[string]any{
			"xds_servers":                            []any{map[string]any{"server_uri": xdsLis.Addr().String(), "channel_creds": []any{map[string]any{"type": "insecure"}}, "server_features": []string{"xds_v3"}}},
			"node":                                   map[string]any{"id": node},
			"server_listener_resource_name_template": sidelanexds.GRPCServerListenerTemplate,
			"certificate_providers":                  providers,
		})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}

	if appLis == nil {
		if appLis, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
	}
	appAddr := netip.MustParseAddrPort(appLis.Addr().String())
	serverCreds, err := xdscreds.NewServerCredentials(xdscreds.ServerOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		t.Fatal(err)
	}
	serving := make(chan struct{}, 1)
	app, err := grpcxds.NewGRPCServer(grpc.Creds(serverCreds),
		grpcxds.BootstrapContentsForTesting(bootstrap(grpcServerNode)),
		grpcxds.ServingModeCallback(func(_ net.Addr, a grpcxds.ServingModeChangeArgs) {
			if a.Mode == connectivity.ServingModeServing {
				select {
				case serving <- struct{}{}:
				default:
				}
			}
		}),
		grpc.UnknownServiceHandler(func(_ any, st grpc.ServerStream) error {
			var m emptypb.Empty
			if err := st.RecvMsg(&m); err != nil {
				return err
			}
			return st.SendMsg(&m)
		}))
	if err != nil {
		t.Fatal(err)
	}
	go app.Serve(appLis)
	t.Cleanup(app.Stop)

	// istiod's RBAC, unchanged, in grpc-go's server-listener shape.
	rs, err := sidelanexds.Build([]sidelanexds.Destination{{Addr: appAddr, RBAC: rbac}}, sidelanexds.Config{GRPCServers: []netip.AddrPort{appAddr}})
	if err != nil {
		t.Fatal(err)
	}
	downstream, err := anypb.New(&tlsv3.DownstreamTlsContext{
		RequireClientCertificate: wrapperspb.Bool(true),
		CommonTlsContext:         tlsContext("server"),
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rs[resource.ListenerType] {
		for _, fc := range r.(*listenerv3.Listener).FilterChains {
			fc.TransportSocket = &corev3.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: downstream}}
			if len(before) == 0 {
				continue
			}
			for _, f := range fc.Filters {
				var h hcmv3.HttpConnectionManager
				if err := f.GetTypedConfig().UnmarshalTo(&h); err != nil {
					t.Fatal(err)
				}
				h.HttpFilters = append(slices.Clone(before), h.HttpFilters...)
				a, err := anypb.New(&h)
				if err != nil {
					t.Fatal(err)
				}
				f.ConfigType = &listenerv3.Filter_TypedConfig{TypedConfig: a}
			}
		}
	}
	v, err := srv.Set(ctx, grpcServerNode, rs)
	if err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	defer wcancel()
	if err := srv.WaitAck(wctx, grpcServerNode, resource.ListenerType, v); err != nil {
		t.Fatal(err)
	}
	select {
	case <-serving:
	case <-ctx.Done():
		t.Fatal("grpc-go xDS server never started serving")
	}

	clientCreds, err := xdscreds.NewClientCredentials(xdscreds.ClientOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		t.Fatal(err)
	}
	conns := map[string]*grpc.ClientConn{}
	for id := range identities {
		if id == "server" {
			continue
		}
		node := "client-" + id
		upstream, err := anypb.New(&tlsv3.UpstreamTlsContext{CommonTlsContext: tlsContext(id)})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := srv.Set(ctx, node, clientResources(t, appAddr, upstream)); err != nil {
			t.Fatal(err)
		}
		rb, err := grpcxds.NewXDSResolverWithConfigForTesting(bootstrap(node))
		if err != nil {
			t.Fatal(err)
		}
		cc, err := grpc.NewClient("xds:///"+grpcTarget, grpc.WithResolvers(rb), grpc.WithTransportCredentials(clientCreds))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cc.Close() })
		conns[id] = cc
	}
	for _, c := range verdicts {
		t.Run(c.from+c.method, func(t *testing.T) {
			cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			defer cancel()
			err := conns[c.from].Invoke(cctx, c.method, &emptypb.Empty{}, &emptypb.Empty{}, grpc.WaitForReady(true))
			if got := status.Code(err); got != c.want {
				t.Errorf("%s as %s: got %v (%v), want %v", c.method, identities[c.from], got, err, c.want)
			}
		})
	}
}

func tlsContext(instance string) *tlsv3.CommonTlsContext {
	return &tlsv3.CommonTlsContext{
		TlsCertificateProviderInstance: &tlsv3.CertificateProviderPluginInstance{InstanceName: instance},
		ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			CaCertificateProviderInstance: &tlsv3.CertificateProviderPluginInstance{InstanceName: instance}}},
	}
}

// clientResources is a caller's xDS view: listener "backend" -> cluster
// (presenting the caller's certificate) -> the server's address.
func clientResources(t *testing.T, backend netip.AddrPort, upstream *anypb.Any) map[resource.Type][]types.Resource {
	router, err := anypb.New(&routerv3.Router{})
	if err != nil {
		t.Fatal(err)
	}
	hcm, err := anypb.New(&hcmv3.HttpConnectionManager{
		RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
			Name: grpcTarget,
			VirtualHosts: []*routev3.VirtualHost{{Name: grpcTarget, Domains: []string{"*"}, Routes: []*routev3.Route{{
				Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
				Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: grpcTarget}}},
			}}}},
		}},
		HttpFilters: []*hcmv3.HttpFilter{{Name: wellknown.Router, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: router}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	addr := &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: backend.Addr().String(), PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(backend.Port())}}}}
	return map[resource.Type][]types.Resource{
		resource.ListenerType: {&listenerv3.Listener{Name: grpcTarget, ApiListener: &listenerv3.ApiListener{ApiListener: hcm}}},
		resource.ClusterType: {&clusterv3.Cluster{
			Name:                 grpcTarget,
			ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
			EdsClusterConfig: &clusterv3.Cluster_EdsClusterConfig{EdsConfig: &corev3.ConfigSource{
				ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
				ResourceApiVersion:    corev3.ApiVersion_V3,
			}},
			LbPolicy:        clusterv3.Cluster_ROUND_ROBIN,
			TransportSocket: &corev3.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: upstream}},
		}},
		resource.EndpointType: {&endpointv3.ClusterLoadAssignment{
			ClusterName: grpcTarget,
			Endpoints: []*endpointv3.LocalityLbEndpoints{{Locality: &corev3.Locality{Region: "local"}, LoadBalancingWeight: wrapperspb.UInt32(1), LbEndpoints: []*endpointv3.LbEndpoint{{
				HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: addr}},
			}}}},
		}},
	}
}

// writeCerts makes a CA and one certificate per identity (URI SAN = the
// SPIFFE ID, like Istio's workload certificates) and returns grpc-go's
// bootstrap certificate_providers (file_watcher plugin) for them.
func writeCerts(t *testing.T) map[string]any {
	dir := t.TempDir()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test-ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(dir, "ca.pem")
	writePEM(t, caFile, "CERTIFICATE", caDER)
	providers := map[string]any{}
	serial := int64(2)
	for name, id := range identities {
		u, err := url.Parse(id)
		if err != nil {
			t.Fatal(err)
		}
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), URIs: []*url.URL{u},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			KeyUsage:    x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
		serial++
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		keyDER, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		certFile, keyFile := filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem")
		writePEM(t, certFile, "CERTIFICATE", der)
		writePEM(t, keyFile, "EC PRIVATE KEY", keyDER)
		providers[name] = map[string]any{"plugin_name": "file_watcher", "config": map[string]any{
			"certificate_file": certFile, "private_key_file": keyFile, "ca_certificate_file": caFile, "refresh_interval": "600s"}}
	}
	return providers
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}
