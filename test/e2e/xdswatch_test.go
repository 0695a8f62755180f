package e2e

import (
	"context"
	"sync"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// xdsWatch is a real gRPC ADS client of the agent's node proxy socket, as
// the node Envoy would be: it subscribes to listeners as node, ACKs every
// response and keeps the latest set.
type xdsWatch struct {
	mu        sync.Mutex
	listeners map[string]*listenerv3.Listener
	version   string
}

func watchListeners(t *testing.T, socket, node string) *xdsWatch {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); conn.Close() })
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: node}, TypeUrl: resource.ListenerType}); err != nil {
		t.Fatal(err)
	}
	w := &xdsWatch{}
	go func() {
		for {
			resp, err := stream.Recv()
			if err != nil {
				return
			}
			ls := map[string]*listenerv3.Listener{}
			for _, a := range resp.GetResources() {
				var l listenerv3.Listener
				if err := a.UnmarshalTo(&l); err != nil {
					t.Errorf("xDS listener: %v", err)
					return
				}
				ls[l.GetName()] = &l
			}
			w.mu.Lock()
			w.listeners, w.version = ls, resp.GetVersionInfo()
			w.mu.Unlock()
			_ = stream.Send(&discoveryv3.DiscoveryRequest{TypeUrl: resource.ListenerType, VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()})
		}
	}()
	return w
}

func (w *xdsWatch) get(name string) *listenerv3.Listener {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.listeners[name]
}

func (w *xdsWatch) names() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []string
	for n := range w.listeners {
		out = append(out, n)
	}
	return out
}
