package xds

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	xdscreds "google.golang.org/grpc/credentials/xds"
	"google.golang.org/grpc/status"
	grpcxds "google.golang.org/grpc/xds"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/sidelane/sidelane/policy/compile"
)

// identities of the mTLS test: certificate provider instance -> SPIFFE ID.
var identities = map[string]string{
	"server":   "spiffe://cluster.local/ns/shop/sa/api",
	"web":      "spiffe://cluster.local/ns/shop/sa/web",
	"prom":     "spiffe://cluster.local/ns/ops/sa/prometheus",
	"stranger": "spiffe://other.example/ns/shop/sa/web",
}

const policyMTLS = `metadata: {name: items, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ports:
    - port: PORT
      rules:
        - from: [{serviceAccounts: [shop/web]}]
          http: [{path: '/shop\.Items/Get'}]
        - from: [{namespaces: [ops]}]
          http: [{path: '/grpc\.health\.v1\.Health/Check'}]
        - from: [{principals: ['spiffe://cluster.local/ns/ops/*']}]
          http: [{path: '/shop\.Items/Stats'}]
        - from: [{podSelector: {matchLabels: {app: web}}}]
          http: [{path: '/shop\.Items/Delete'}]`

// TestGRPCProxylessRBACPeerCertificate checks the sidecar-mode rules
// (compile.IdentityPeerCertificate: callers by the SPIFFE URI SAN of their
// mTLS certificate, as in Istio) in grpc-go's RBAC engine: every caller
// connects from the same IP, only the certificate differs.
func TestGRPCProxylessRBACPeerCertificate(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	providers := writeCerts(t)
	srv, xdsLis := serveXDS(ctx, t)
	bootstrap := func(node string) []byte {
		b, err := json.Marshal(map[string]any{
			"xds_servers":                            []any{map[string]any{"server_uri": xdsLis.Addr().String(), "channel_creds": []any{map[string]any{"type": "insecure"}}, "server_features": []string{"xds_v3"}}},
			"node":                                   map[string]any{"id": node},
			"server_listener_resource_name_template": GRPCServerListenerTemplate,
			"certificate_providers":                  providers,
		})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}

	appLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	appAddr := netip.MustParseAddrPort(appLis.Addr().String())
	serverCreds, err := xdscreds.NewServerCredentials(xdscreds.ServerOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		t.Fatal(err)
	}
	serving := make(chan struct{}, 1)
	app, err := grpcxds.NewGRPCServer(grpc.Creds(serverCreds),
		grpcxds.BootstrapContentsForTesting(bootstrap(serverNode)),
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

	// The protected server's listener, compiled for peer-certificate
	// identity, with mTLS (client certificate required) on its chain.
	inv := inventory()
	inv.Pods[0].IPs = []netip.Addr{appAddr.Addr()}
	res, err := compile.Compile(policies(t, int(appAddr.Port()), policyMTLS), inv,
		compile.Options{Identity: compile.IdentityPeerCertificate, TrustDomain: "cluster.local"})
	if err != nil {
		t.Fatal(err)
	}
	rs, err := Build(Destinations(res), Config{GRPCServers: []netip.AddrPort{appAddr}})
	if err != nil {
		t.Fatal(err)
	}
	downstream, err := toAny(&tlsv3.DownstreamTlsContext{
		RequireClientCertificate: wrapperspb.Bool(true),
		CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsCertificateProviderInstance: &tlsv3.CertificateProviderPluginInstance{InstanceName: "server"},
			ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
				CaCertificateProviderInstance: &tlsv3.CertificateProviderPluginInstance{InstanceName: "server"}}},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rs[resource.ListenerType] {
		for _, fc := range r.(*listenerv3.Listener).FilterChains {
			fc.TransportSocket = &corev3.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: downstream}}
		}
	}
	v, err := srv.Set(ctx, serverNode, rs)
	if err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	defer wcancel()
	if err := srv.WaitAck(wctx, serverNode, resource.ListenerType, v); err != nil {
		t.Fatal(err)
	}
	select {
	case <-serving:
	case <-ctx.Done():
		t.Fatal("xDS server never started serving")
	}

	// One client node per identity: its cluster presents that identity.
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
		crs := clientResources(t, appAddr)
		upstream, err := toAny(&tlsv3.UpstreamTlsContext{CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsCertificateProviderInstance: &tlsv3.CertificateProviderPluginInstance{InstanceName: id},
			ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
				CaCertificateProviderInstance: &tlsv3.CertificateProviderPluginInstance{InstanceName: id}}},
		}})
		if err != nil {
			t.Fatal(err)
		}
		crs[resource.ClusterType][0].(*clusterv3.Cluster).TransportSocket = &corev3.TransportSocket{
			Name: "envoy.transport_sockets.tls", ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: upstream}}
		if _, err := srv.Set(ctx, node, crs); err != nil {
			t.Fatal(err)
		}
		rb, err := grpcxds.NewXDSResolverWithConfigForTesting(bootstrap(node))
		if err != nil {
			t.Fatal(err)
		}
		cc, err := grpc.NewClient("xds:///"+target, grpc.WithResolvers(rb), grpc.WithTransportCredentials(clientCreds))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cc.Close() })
		conns[id] = cc
	}

	for _, c := range []struct {
		from, method string
		want         codes.Code
	}{
		{"web", "/shop.Items/Get", codes.OK},
		{"prom", "/shop.Items/Get", codes.PermissionDenied},
		{"stranger", "/shop.Items/Get", codes.PermissionDenied}, // same ns/sa, other trust domain
		{"prom", "/grpc.health.v1.Health/Check", codes.OK},
		{"web", "/grpc.health.v1.Health/Check", codes.PermissionDenied},
		{"prom", "/shop.Items/Stats", codes.OK},
		{"web", "/shop.Items/Stats", codes.PermissionDenied},
		{"web", "/shop.Items/Delete", codes.OK},
		{"stranger", "/shop.Items/Delete", codes.PermissionDenied},
	} {
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

// writeCerts makes a CA and one certificate per identity (URI SAN = the
// SPIFFE ID, like Istio's workload certificates) and returns grpc-go's
// bootstrap certificate_providers (file_watcher plugin) for them.
func writeCerts(t *testing.T) map[string]any {
	dir := t.TempDir()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test-ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	caFile := filepath.Join(dir, "ca.pem")
	writePEM(t, caFile, "CERTIFICATE", caDER)
	providers := map[string]any{}
	serial := int64(2)
	for name, id := range identities {
		u, _ := url.Parse(id)
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), URIs: []*url.URL{u},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			KeyUsage:    x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
		serial++
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		keyDER, _ := x509.MarshalECPrivateKey(key)
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
