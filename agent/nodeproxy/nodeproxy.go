// Package nodeproxy feeds the per-node proxy of the sidecar-free mode. It
// serves xDS on a Unix socket (the chart's node Envoy reads it) and, on
// every L7 policy change, pod change or local mode change, publishes the
// node's snapshot: the outbound listener on the node proxy address, one
// inbound listener inside each per-node pod's netns (where the eBPF inbound
// capture hands connections), and the compiled L7 policy of this node's
// destinations (callers identified by source IP).
package nodeproxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/sidelane/sidelane/agent/cnirpc"
	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/agent/xds"
	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/compile"
	"github.com/sidelane/sidelane/policy/input"
)

// ModeNode is the store's mode of per-node pods.
const ModeNode = "node"

// Config configures Run.
type Config struct {
	// Socket is the Unix socket xDS is served on; SocketGID is given
	// read-write access to it (the proxy's group, 1337; -1: root only).
	Socket    string
	SocketGID int
	// Node is the xDS node ID the proxy presents (Envoy --service-node:
	// the node name).
	Node string
	Kube kubernetes.Interface
	// Dyn reads L7Policies; nil when the CRD is not installed (no policy:
	// every connection is passed through).
	Dyn dynamic.Interface
	// Local lists the agent's pods on this node (its store).
	Local func() []store.Entry
	// Outbound is the node proxy's outbound listener (address:15001),
	// also the source of its upstream connections.
	Outbound    netip.AddrPort
	InboundPort uint16
	TrustDomain string
	Log         *slog.Logger
	Registerer  prometheus.Registerer
	// Poll is how often the local pods' modes are compared (default
	// 200ms): a namespace toggle reaches the proxy within it.
	Poll time.Duration
	// OnCompiled, if set, receives every compilation (explain reads it).
	OnCompiled func(*compile.Result)
}

// L7For is what res says of one pod: the selecting policies and the
// protected ports (none: not protected).
func L7For(res *compile.Result, namespace, name string) *cnirpc.ExplainedL7 {
	out := &cnirpc.ExplainedL7{Policies: []string{}}
	g, ok := res.ForPod(namespace, name)
	if !ok {
		return out
	}
	out.Policies = append(out.Policies, g.Policies...)
	for _, p := range g.Ports {
		out.Ports = append(out.Ports, p.Port)
	}
	return out
}

// Run serves xDS and publishes until ctx ends.
func Run(ctx context.Context, c Config) error {
	if c.Socket == "" || c.Node == "" || c.Kube == nil || c.Local == nil || !c.Outbound.IsValid() || c.InboundPort == 0 {
		return errors.New("nodeproxy: socket, node, kube client, local pods, outbound address and inbound port are required")
	}
	if c.Poll <= 0 {
		c.Poll = 200 * time.Millisecond
	}
	srv, err := xds.NewServer(ctx, c.Log, c.Registerer)
	if err != nil {
		return err
	}
	srv.TrustDomain = c.TrustDomain
	lis, err := listen(c.Socket, c.SocketGID)
	if err != nil {
		return err
	}
	g := grpc.NewServer()
	srv.Register(g)
	go func() { <-ctx.Done(); g.Stop() }()
	go func() {
		if err := g.Serve(lis); err != nil && ctx.Err() == nil {
			c.Log.Error("xds server", "error", err)
		}
	}()

	trigger := make(chan struct{}, 1)
	poke := func() {
		select {
		case trigger <- struct{}{}:
		default:
		}
	}
	h := cache.ResourceEventHandlerFuncs{AddFunc: func(any) { poke() }, UpdateFunc: func(any, any) { poke() }, DeleteFunc: func(any) { poke() }}
	kf := informers.NewSharedInformerFactory(c.Kube, 0)
	pods := kf.Core().V1().Pods()
	if _, err := pods.Informer().AddEventHandler(h); err != nil {
		return err
	}
	nss := kf.Core().V1().Namespaces() // labels, for namespaceSelectors
	if _, err := nss.Informer().AddEventHandler(h); err != nil {
		return err
	}
	synced := []cache.InformerSynced{pods.Informer().HasSynced, nss.Informer().HasSynced}
	var policies cache.GenericLister
	if c.Dyn != nil {
		df := dynamicinformer.NewDynamicSharedInformerFactory(c.Dyn, 0)
		inf := df.ForResource(input.L7PolicyGVR)
		if _, err := inf.Informer().AddEventHandler(h); err != nil {
			return err
		}
		synced = append(synced, inf.Informer().HasSynced)
		policies = inf.Lister()
		df.Start(ctx.Done())
	}
	kf.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return fmt.Errorf("nodeproxy: caches did not sync: %w", ctx.Err())
	}
	c.Log.Info("serving xDS to the node proxy", "socket", c.Socket, "node", c.Node, "outbound", c.Outbound)

	tick := time.NewTicker(c.Poll)
	defer tick.Stop()
	last := ""
	poke()
	for {
		inPod := inPodListeners(c.Local())
		key := fmt.Sprint(inPod)
		select {
		case <-ctx.Done():
			return nil
		case <-trigger:
		case <-tick.C:
			if key == last {
				continue
			}
		}
		last = key
		var ps []v1alpha1.L7Policy
		if policies != nil {
			objs, err := policies.List(labels.Everything())
			if err != nil {
				return err
			}
			ps = input.DecodePolicies(c.Log, objs)
		}
		all, err := pods.Lister().List(labels.Everything())
		if err != nil {
			return err
		}
		namespaces, err := nss.Lister().List(labels.Everything())
		if err != nil {
			return err
		}
		v, err := publish(ctx, srv, c, ps, input.Inventory(all, namespaces), inPod)
		if err != nil {
			c.Log.Error("publish node proxy config", "error", err)
			continue
		}
		c.Log.Debug("node proxy config published", "version", v, "inPodListeners", len(inPod), "policies", len(ps))
	}
}

func publish(ctx context.Context, srv *xds.Server, c Config, ps []v1alpha1.L7Policy, inv compile.Inventory, inPod []xds.InPodListener) (string, error) {
	local := map[netip.Addr]bool{}
	for _, p := range inPod {
		for _, ip := range p.IPs {
			local[ip] = true
		}
	}
	v, res, err := srv.Publish(ctx, c.Node, ps, inv, func(a netip.Addr) bool { return local[a] }, xds.Config{
		InboundPort: uint32(c.InboundPort), InPod: inPod, Outbound: c.Outbound, UpstreamSource: c.Outbound.Addr(),
	})
	if err == nil && c.OnCompiled != nil {
		c.OnCompiled(res)
	}
	return v, err
}

// inPodListeners picks the per-node pods from the agent's entries, sorted.
func inPodListeners(entries []store.Entry) []xds.InPodListener {
	var out []xds.InPodListener
	for _, e := range entries {
		if e.Mode != ModeNode || e.Netns == "" {
			continue
		}
		l := xds.InPodListener{Pod: e.PodNamespace + "/" + e.PodName, Netns: e.Netns}
		for _, p := range e.IPs {
			l.IPs = append(l.IPs, p.Addr())
		}
		out = append(out, l)
	}
	slices.SortFunc(out, func(a, b xds.InPodListener) int { return strings.Compare(a.Pod+a.Netns, b.Pod+b.Netns) })
	return out
}

// listen replaces a stale socket and lets gid (the proxy) connect.
func listen(path string, gid int) (net.Listener, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("nodeproxy: remove stale socket: %w", err)
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("nodeproxy: %w", err)
	}
	mode := os.FileMode(0o600)
	if gid >= 0 {
		if err := os.Chown(path, -1, gid); err != nil {
			lis.Close()
			return nil, fmt.Errorf("nodeproxy: chown socket: %w", err)
		}
		mode = 0o660
	}
	if err := os.Chmod(path, mode); err != nil {
		lis.Close()
		return nil, fmt.Errorf("nodeproxy: chmod socket: %w", err)
	}
	return lis, nil
}
