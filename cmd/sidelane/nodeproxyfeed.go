package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/sidelane/sidelane/agent/datapath/ebpf"
	"github.com/sidelane/sidelane/agent/nodeproxy"
	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/policy/compile"
)

// runNodeProxyFeed serves the node proxy's xDS (package nodeproxy). Without
// the L7Policy CRD it still serves the listeners, with no policy.
func runNodeProxyFeed(ctx context.Context, log *slog.Logger, rc *rest.Config, cs kubernetes.Interface, np *ebpf.NodeProxyOptions,
	socket string, gid int, node, trustDomain string, reg prometheus.Registerer, local func() []store.Entry, onCompiled func(*compile.Result)) error {
	addr := np.IPv4
	if !addr.IsValid() {
		addr = np.IPv6
	}
	var dyn dynamic.Interface
	if _, err := cs.Discovery().ServerResourcesForGroupVersion("sidelane.io/v1alpha1"); err != nil {
		log.Warn("node proxy xDS without L7 policy: sidelane.io/v1alpha1 not served (install the chart's CRDs)", "error", err)
	} else if dyn, err = dynamic.NewForConfig(rc); err != nil {
		return fmt.Errorf("dynamic client: %w", err)
	}
	return nodeproxy.Run(ctx, nodeproxy.Config{
		Socket: socket, SocketGID: gid, Node: node, Kube: cs, Dyn: dyn, Local: local,
		Outbound: netip.AddrPortFrom(addr, np.OutboundPort), InboundPort: np.InboundPort,
		TrustDomain: trustDomain, Log: log, Registerer: reg, OnCompiled: onCompiled,
	})
}
