// Package xdsbench measures how long an L7 policy change takes to reach a
// real xDS consumer: compile, build and publish a snapshot on agent/xds, and
// wait until grpc-go's xDS server (proxyless gRPC, in this process, over
// loopback) ACKs the new listener. It is separate from agent/xds so the agent
// binary does not link grpc-go's xDS server. The benchmarks issue calls
// Measure; `go test -bench . ./agent/xds/xdsbench` reports the same.
package xdsbench

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	grpcxds "google.golang.org/grpc/xds"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sidelane/sidelane/agent/xds"
	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/compile"
)

// Result summarises n policy-change-to-ACK latencies.
type Result struct {
	Samples       []time.Duration
	P50, P99, Max time.Duration
}

func (r Result) String() string {
	return fmt.Sprintf("policy change -> grpc-go xDS ACK: n=%d p50=%v p99=%v max=%v", len(r.Samples), r.P50, r.P99, r.Max)
}

const node = "xdsbench-node"

// Measure makes n policy changes and times each from the change (before
// compiling) to the grpc-go server's ACK of the resulting listener.
func Measure(ctx context.Context, n int) (Result, error) {
	if n < 1 {
		return Result{}, fmt.Errorf("xdsbench: n must be positive, got %d", n)
	}
	srv, err := xds.NewServer(ctx, slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	if err != nil {
		return Result{}, err
	}
	xdsLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return Result{}, err
	}
	g := grpc.NewServer()
	srv.Register(g)
	go g.Serve(xdsLis)
	defer g.Stop()

	appLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return Result{}, err
	}
	appAddr := netip.MustParseAddrPort(appLis.Addr().String())
	bootstrap := fmt.Sprintf(`{"xds_servers": [{"server_uri": %q, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
  "node": {"id": %q}, "server_listener_resource_name_template": %q}`, xdsLis.Addr(), node, xds.GRPCServerListenerTemplate)
	serving := make(chan struct{}, 1)
	app, err := grpcxds.NewGRPCServer(grpc.Creds(insecure.NewCredentials()),
		grpcxds.BootstrapContentsForTesting([]byte(bootstrap)),
		grpcxds.ServingModeCallback(func(_ net.Addr, a grpcxds.ServingModeChangeArgs) {
			if a.Mode == connectivity.ServingModeServing {
				select {
				case serving <- struct{}{}:
				default:
				}
			}
		}))
	if err != nil {
		return Result{}, err
	}
	go app.Serve(appLis)
	defer app.Stop()

	inv := compile.Inventory{Pods: []compile.Pod{
		{Namespace: "bench", Name: "server", Labels: map[string]string{"app": "server"}, IPs: []netip.Addr{appAddr.Addr()}},
		{Namespace: "bench", Name: "client", Labels: map[string]string{"app": "client"}, IPs: []netip.Addr{netip.MustParseAddr("127.0.0.2")}},
	}}
	change := func(i int) (string, error) {
		p := v1alpha1.L7Policy{
			ObjectMeta: metav1.ObjectMeta{Name: "bench", Namespace: "bench"},
			Spec: v1alpha1.L7PolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "server"}},
				Ports: []v1alpha1.PortRules{{Port: int32(appAddr.Port()), Rules: []v1alpha1.Rule{{
					From: []v1alpha1.Peer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "client"}}}},
					HTTP: []v1alpha1.HTTPRule{{Path: fmt.Sprintf("/bench.Service/Method%d", i)}},
				}}}},
			},
		}
		res, err := compile.Compile([]v1alpha1.L7Policy{p}, inv, compile.Options{Identity: compile.IdentitySourceIP, TrustDomain: "cluster.local"})
		if err != nil {
			return "", err
		}
		rs, err := xds.Build(xds.Destinations(res), xds.Config{GRPCServers: []netip.AddrPort{appAddr}})
		if err != nil {
			return "", err
		}
		return srv.Set(ctx, node, rs)
	}
	wait := func(v string) error {
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		return srv.WaitAck(wctx, node, resource.ListenerType, v)
	}

	// Warm up: the first snapshot also brings the server to SERVING.
	v, err := change(-1)
	if err != nil {
		return Result{}, err
	}
	if err := wait(v); err != nil {
		return Result{}, err
	}
	select {
	case <-serving:
	case <-ctx.Done():
		return Result{}, ctx.Err()
	}
	var r Result
	for i := range n {
		start := time.Now()
		v, err := change(i)
		if err != nil {
			return Result{}, err
		}
		if err := wait(v); err != nil {
			return Result{}, err
		}
		r.Samples = append(r.Samples, time.Since(start))
	}
	s := slices.Clone(r.Samples)
	slices.Sort(s)
	r.P50, r.P99, r.Max = s[(len(s)-1)/2], s[(len(s)-1)*99/100], s[len(s)-1]
	return r, nil
}
