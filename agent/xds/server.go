package xds

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	clusterservice "github.com/envoyproxy/go-control-plane/envoy/service/cluster/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	endpointservice "github.com/envoyproxy/go-control-plane/envoy/service/endpoint/v3"
	listenerservice "github.com/envoyproxy/go-control-plane/envoy/service/listener/v3"
	routeservice "github.com/envoyproxy/go-control-plane/envoy/service/route/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
)

// Log attribute keys.
const (
	attrNode    = "node"
	attrVersion = "version"
	attrType    = "type"
)

// Server holds one snapshot per node ID and tells when a node ACKed one.
type Server struct {
	// TrustDomain is the mesh's SPIFFE trust domain used by Publish to
	// resolve principals (default cluster.local).
	TrustDomain string

	log     *slog.Logger
	cache   cachev3.SnapshotCache
	xds     serverv3.Server
	metrics *metrics

	mu      sync.Mutex
	counter uint64
	current map[string]string    // node -> version last set
	setAt   map[string]time.Time // node/version -> when it was set
	acked   map[ackKey]string    // node+type -> version last ACKed
	streams map[int64]string     // stream id -> node id
	changed chan struct{}        // closed and replaced on every ACK
}

type ackKey struct{ node, typeURL string }

// NewServer builds a server; reg receives its metrics (nil: not exported).
func NewServer(ctx context.Context, log *slog.Logger, reg prometheus.Registerer) (*Server, error) {
	m, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	s := &Server{
		log:     log,
		metrics: m,
		current: map[string]string{},
		setAt:   map[string]time.Time{},
		acked:   map[ackKey]string{},
		streams: map[int64]string{},
		changed: make(chan struct{}),
	}
	// Not ADS-consistent mode: grpc-go opens separate watches per type and
	// an ADS-ordered cache would hold responses back (see ENVIRONMENT.md).
	s.cache = cachev3.NewSnapshotCache(false, cachev3.IDHash{}, nil)
	s.xds = serverv3.NewServer(ctx, s.cache, serverv3.CallbackFuncs{
		StreamRequestFunc: s.onRequest,
		StreamClosedFunc: func(id int64, _ *corev3.Node) {
			s.mu.Lock()
			delete(s.streams, id)
			s.mu.Unlock()
		},
	})
	return s, nil
}

// Register adds the ADS and per-type discovery services to g.
func (s *Server) Register(g *grpc.Server) {
	discovery.RegisterAggregatedDiscoveryServiceServer(g, s.xds)
	listenerservice.RegisterListenerDiscoveryServiceServer(g, s.xds)
	routeservice.RegisterRouteDiscoveryServiceServer(g, s.xds)
	clusterservice.RegisterClusterDiscoveryServiceServer(g, s.xds)
	endpointservice.RegisterEndpointDiscoveryServiceServer(g, s.xds)
}

// Set publishes resources for node and returns the snapshot version. The
// version is "<n>-<content hash>": identical content keeps its version (and
// is not pushed again); after an agent restart a stale proxy version can
// never collide with different content.
func (s *Server) Set(ctx context.Context, node string, rs map[resource.Type][]types.Resource) (string, error) {
	h, err := hashResources(rs)
	if err != nil {
		return "", err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if v := s.current[node]; v != "" && v[len(v)-len(h):] == h {
		return v, nil
	}
	s.counter++
	version := fmt.Sprintf("%d-%s", s.counter, h)
	snap, err := cachev3.NewSnapshot(version, rs)
	if err != nil {
		return "", fmt.Errorf("snapshot for %s: %w", node, err)
	}
	if err := s.cache.SetSnapshot(ctx, node, snap); err != nil {
		return "", fmt.Errorf("set snapshot for %s: %w", node, err)
	}
	delete(s.setAt, node+"/"+s.current[node])
	s.current[node] = version
	s.setAt[node+"/"+version] = time.Now()
	s.metrics.snapshots.Inc()
	s.log.Info("xds snapshot set", attrNode, node, attrVersion, version)
	return version, nil
}

// WaitAck blocks until node has ACKed version for typeURL, or ctx ends.
func (s *Server) WaitAck(ctx context.Context, node, typeURL, version string) error {
	for {
		s.mu.Lock()
		got, ch := s.acked[ackKey{node, typeURL}], s.changed
		s.mu.Unlock()
		if got == version {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s to ack %s version %s (last %q): %w", node, typeURL, version, got, ctx.Err())
		case <-ch:
		}
	}
}

// onRequest records ACKs and NACKs. In SotW xDS a request carrying a
// response nonce acknowledges that response: version_info is the version
// now applied, error_detail is set on a NACK.
func (s *Server) onRequest(id int64, req *discovery.DiscoveryRequest) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := req.GetNode().GetId(); n != "" {
		s.streams[id] = n // the node is only sent on a stream's first request
	}
	node := s.streams[id]
	if req.GetResponseNonce() == "" {
		return nil
	}
	if req.GetErrorDetail() != nil {
		s.metrics.nacks.WithLabelValues(req.GetTypeUrl()).Inc()
		s.log.Warn("xds nack", attrNode, node, attrType, req.GetTypeUrl(), attrVersion, req.GetVersionInfo(), "error", req.GetErrorDetail().GetMessage())
		return nil
	}
	k := ackKey{node, req.GetTypeUrl()}
	if s.acked[k] == req.GetVersionInfo() {
		return nil
	}
	s.acked[k] = req.GetVersionInfo()
	s.metrics.acks.WithLabelValues(req.GetTypeUrl()).Inc()
	if t, ok := s.setAt[node+"/"+req.GetVersionInfo()]; ok && req.GetTypeUrl() == resource.ListenerType {
		s.metrics.ackLatency.Observe(time.Since(t).Seconds())
	}
	close(s.changed)
	s.changed = make(chan struct{})
	return nil
}

func hashResources(rs map[resource.Type][]types.Resource) (string, error) {
	h := sha256.New()
	typeURLs := make([]string, 0, len(rs))
	for t := range rs {
		typeURLs = append(typeURLs, t)
	}
	sort.Strings(typeURLs)
	opts := proto.MarshalOptions{Deterministic: true}
	for _, t := range typeURLs {
		fmt.Fprintf(h, "%s\x00", t)
		for _, r := range rs[t] {
			b, err := opts.Marshal(r)
			if err != nil {
				return "", fmt.Errorf("hash %s: %w", t, err)
			}
			fmt.Fprintf(h, "%d\x00", len(b))
			h.Write(b)
		}
	}
	return hex.EncodeToString(h.Sum(nil))[:12], nil
}

type metrics struct {
	snapshots  prometheus.Counter
	acks       *prometheus.CounterVec
	nacks      *prometheus.CounterVec
	ackLatency prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		snapshots: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sidelane_xds_snapshots_total", Help: "xDS snapshots published (pushes)."}),
		acks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sidelane_xds_acks_total", Help: "xDS responses ACKed, by type URL."}, []string{"type"}),
		nacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sidelane_xds_nacks_total", Help: "xDS responses rejected (NACK), by type URL."}, []string{"type"}),
		ackLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "sidelane_xds_push_ack_seconds", Help: "Time from publishing a snapshot to the listener ACK.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.snapshots, m.acks, m.nacks, m.ackLatency} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("register xds metrics: %w", err)
			}
		}
	}
	return m, nil
}
