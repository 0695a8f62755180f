package istiodharness

import (
	"context"
	"fmt"
	"strings"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/structpb"
)

// Proxy is the sidecar (or gateway) a fake Envoy claims to be.
type Proxy struct {
	// Type is the node type: "sidecar" (default) or "router" (a gateway).
	Type           string
	IP             string
	Pod, Namespace string
	ServiceAccount string
	Labels         map[string]string
}

// NodeID is the Envoy node ID pilot-agent would send for p:
// <type>~<ip>~<pod>.<ns>~<ns>.svc.cluster.local.
func (p Proxy) NodeID() string {
	typ := p.Type
	if typ == "" {
		typ = "sidecar"
	}
	return fmt.Sprintf("%s~%s~%s.%s~%s.svc.cluster.local", typ, p.IP, p.Pod, p.Namespace, p.Namespace)
}

func (p Proxy) node(istioVersion string) (*corev3.Node, error) {
	labels := map[string]any{}
	for k, v := range p.Labels {
		labels[k] = v
	}
	md, err := structpb.NewStruct(map[string]any{
		"NAMESPACE":         p.Namespace,
		"NAME":              p.Pod,
		"LABELS":            labels,
		"ISTIO_VERSION":     istioVersion,
		"CLUSTER_ID":        ClusterID,
		"INTERCEPTION_MODE": "REDIRECT",
		"SERVICE_ACCOUNT":   p.ServiceAccount,
		"INSTANCE_IPS":      p.IP,
	})
	if err != nil {
		return nil, err
	}
	return &corev3.Node{Id: p.NodeID(), Cluster: p.Pod + "." + p.Namespace, Metadata: md}, nil
}

// Listeners opens an ADS stream to istiod as p, asks for every listener
// (LDS, state of the world) and returns istiod's first answer. Each call
// is a new connection, so it sees istiod's current configuration.
func (i *Istiod) Listeners(ctx context.Context, p Proxy) ([]*listenerv3.Listener, error) {
	node, err := p.node(i.ProxyVersion)
	if err != nil {
		return nil, err
	}
	cc, err := grpc.NewClient(i.XDSAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("dial istiod %s: %w", i.XDSAddr, err)
	}
	defer cc.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(cc).StreamAggregatedResources(ctx)
	if err != nil {
		return nil, fmt.Errorf("ads stream: %w", err)
	}
	if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resource.ListenerType}); err != nil {
		return nil, fmt.Errorf("send lds request: %w", err)
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			return nil, fmt.Errorf("lds for %s: %w", p.NodeID(), err)
		}
		if resp.TypeUrl != resource.ListenerType {
			continue
		}
		out := make([]*listenerv3.Listener, 0, len(resp.Resources))
		for _, a := range resp.Resources {
			var l listenerv3.Listener
			if err := a.UnmarshalTo(&l); err != nil {
				return nil, fmt.Errorf("lds for %s: listener: %w", p.NodeID(), err)
			}
			out = append(out, &l)
		}
		return out, nil
	}
}

// ListenerNames lists the listeners' names, for messages.
func ListenerNames(ls []*listenerv3.Listener) string {
	names := make([]string, len(ls))
	for i, l := range ls {
		names[i] = l.GetName()
	}
	return strings.Join(names, ",")
}

// ListenerWatch is one long-lived ADS stream to istiod as a proxy,
// subscribed to every listener, as a real sidecar holds it: istiod pushes
// a new LDS whenever the proxy's listeners change, and Next ACKs each.
type ListenerWatch struct {
	cc     *grpc.ClientConn
	stream discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	cancel context.CancelFunc
	node   *corev3.Node
}

// Push is one LDS response and when it arrived.
type Push struct {
	At        time.Time
	Version   string
	Listeners []*listenerv3.Listener
}

// WatchListeners opens the stream and sends the first LDS request; call
// Next for istiod's answers and Close when done.
func (i *Istiod) WatchListeners(ctx context.Context, p Proxy) (*ListenerWatch, error) {
	node, err := p.node(i.ProxyVersion)
	if err != nil {
		return nil, err
	}
	cc, err := grpc.NewClient(i.XDSAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("dial istiod %s: %w", i.XDSAddr, err)
	}
	ctx, cancel := context.WithCancel(ctx)
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(cc).StreamAggregatedResources(ctx)
	if err == nil {
		err = stream.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resource.ListenerType})
	}
	if err != nil {
		cancel()
		cc.Close()
		return nil, fmt.Errorf("lds stream for %s: %w", p.NodeID(), err)
	}
	return &ListenerWatch{cc: cc, stream: stream, cancel: cancel, node: node}, nil
}

// Next blocks for istiod's next LDS push, ACKs it and returns it, stamped
// with the time it was received (before decoding).
func (w *ListenerWatch) Next() (Push, error) {
	for {
		resp, err := w.stream.Recv()
		at := time.Now()
		if err != nil {
			return Push{}, fmt.Errorf("lds for %s: %w", w.node.GetId(), err)
		}
		if resp.TypeUrl != resource.ListenerType {
			continue
		}
		ack := &discoveryv3.DiscoveryRequest{TypeUrl: resource.ListenerType, VersionInfo: resp.VersionInfo, ResponseNonce: resp.Nonce}
		if err := w.stream.Send(ack); err != nil {
			return Push{}, fmt.Errorf("ack lds for %s: %w", w.node.GetId(), err)
		}
		out := Push{At: at, Version: resp.VersionInfo, Listeners: make([]*listenerv3.Listener, 0, len(resp.Resources))}
		for _, a := range resp.Resources {
			var l listenerv3.Listener
			if err := a.UnmarshalTo(&l); err != nil {
				return Push{}, fmt.Errorf("lds for %s: listener: %w", w.node.GetId(), err)
			}
			out.Listeners = append(out.Listeners, &l)
		}
		return out, nil
	}
}

// Close ends the stream.
func (w *ListenerWatch) Close() {
	w.cancel()
	w.cc.Close()
}
