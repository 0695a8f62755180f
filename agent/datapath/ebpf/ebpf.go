// Package ebpf is the eBPF capture backend: it implements datapath.Datapath
// over the programs and maps of package bpf, keyed by each pod's network
// namespace cookie.
package ebpf

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"

	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/bpf"
)

// The agent's modes (agent.ModeSidecar, agent.ModeNode; not imported to
// keep this package below the agent).
const (
	modeSidecar = "sidecar" // the pod's own Envoy captures
	modeNode    = "node"    // sidecar-free: the node proxy captures
)

// DefaultNodeInboundPort is where the node proxy listens inside each
// per-node pod's netns for the pod's inbound traffic.
const DefaultNodeInboundPort = 15006

// Pods is what the backend needs from the loaded programs (*bpf.Capture).
type Pods interface {
	Put(netns uint64, p bpf.Pod) error
	Delete(netns uint64) error
	Verify(netns uint64, p bpf.Pod) error
	AttachInbound(netnsPath string, netns uint64, ifname string) error
	VerifyInbound(netns uint64, ifname string) error
	Enrolled() ([]uint64, error)
	Counters(netns uint64) (bpf.Counters, error)
	NodeCounters() (bpf.NodeCounters, error)
}

// Datapath captures sidecar pods with eBPF.
type Datapath struct {
	pods   Pods
	cookie func(netnsPath string) (uint64, error)
	routes func(netnsPath string, excluded []string) ([]bpf.Route, error)
	log    *slog.Logger
	// nodeInboundPort is the node proxy's in-pod inbound listener port.
	nodeInboundPort uint16
}

// New returns the backend over loaded programs (see bpf.Load).
func New(pods Pods, log *slog.Logger) *Datapath {
	if log == nil {
		log = slog.Default()
	}
	return &Datapath{pods: pods, cookie: bpf.NetnsCookie, routes: bpf.PodRoutes, log: log,
		nodeInboundPort: DefaultNodeInboundPort}
}

// SetNodeInboundPort changes the node proxy's in-pod inbound listener port
// for pods enrolled afterwards (0: DefaultNodeInboundPort).
func (d *Datapath) SetNodeInboundPort(port uint16) {
	if port == 0 {
		port = DefaultNodeInboundPort
	}
	d.nodeInboundPort = port
}

// plan turns the entry into the pod's BPF state; ok is false when the pod
// is not captured at all (mode none, or a sidecar pod without settings).
func (d *Datapath) plan(e store.Entry) (p bpf.Pod, ok bool, err error) {
	switch {
	case e.Mode == modeSidecar && e.Capture != nil:
		p, err = bpf.PlanPod(e.IPs, *e.Capture)
		if err != nil {
			return bpf.Pod{}, false, fmt.Errorf("capture settings: %w", err)
		}
		return p, true, nil
	case e.Mode == modeNode:
		// The pod's Istio exclusion annotations, when it has any, apply
		// to the node proxy's capture too.
		s := bpf.NodePodSettings{InboundPort: d.nodeInboundPort}
		if e.Capture != nil {
			s.ExcludeOutboundCIDRs = e.Capture.ExcludeOutboundCIDRs
			s.ExcludeOutboundPorts = e.Capture.ExcludeOutboundPorts
			s.ExcludeInboundPorts = e.Capture.ExcludeInboundPorts
		}
		p, err = bpf.PlanNodePod(e.IPs, s)
		if err != nil {
			return bpf.Pod{}, false, fmt.Errorf("per-node capture settings: %w", err)
		}
		return p, true, nil
	}
	return bpf.Pod{}, false, nil
}

// Name implements datapath.Datapath.
func (d *Datapath) Name() string { return "ebpf" }

// Enroll writes the pod's capture state, keyed by its netns cookie, which
// it records in e: sidecar mode captures to the pod's own proxy, per-node
// mode to the node proxy (bpf.Capture.SetNodeProxy). Pods in neither are
// left uncaptured (and any earlier capture of theirs removed). A mode
// change is one Put over the previous state: new connections follow it,
// established ones keep their path.
func (d *Datapath) Enroll(_ context.Context, e *store.Entry) error {
	p, ok, err := d.plan(*e)
	if err != nil {
		return err
	}
	if !ok {
		if e.NetnsCookie != 0 {
			if err := d.pods.Delete(e.NetnsCookie); err != nil {
				return err
			}
			e.NetnsCookie = 0
		}
		return nil
	}
	// Never enroll what the path names now if that is not the pod's netns
	// of ADD (pid reuse behind a /proc/<pid>/ns/net path).
	if err := e.CheckNetns(); err != nil {
		return err
	}
	cookie, err := d.cookie(e.Netns)
	if err != nil {
		return err
	}
	if e.Mode == modeSidecar && len(e.Capture.ExcludeInterfaces) > 0 {
		routes, err := d.routes(e.Netns, e.Capture.ExcludeInterfaces)
		if err != nil {
			return err
		}
		p = p.WithRoutes(routes)
	}
	if e.NetnsCookie != 0 && e.NetnsCookie != cookie {
		// The path now names another netns (the old one is gone): drop the
		// old state so nothing else is captured under its cookie.
		if err := d.pods.Delete(e.NetnsCookie); err != nil {
			return err
		}
	}
	e.NetnsCookie = cookie
	if err := d.pods.Put(cookie, p); err != nil {
		return fmt.Errorf("enroll netns %s: %w", e.Netns, err)
	}
	if inboundOn(*e) {
		if err := d.pods.AttachInbound(e.Netns, cookie, e.IfName); err != nil {
			return err
		}
	}
	d.log.Debug("pod enrolled", "attachment", e.Key.String(), "mode", e.Mode, "netnsCookie", cookie)
	return nil
}

// Unenroll removes everything Enroll wrote. It works from the recorded
// cookie, so it needs no netns (which may be gone).
func (d *Datapath) Unenroll(_ context.Context, e store.Entry) error {
	if e.NetnsCookie == 0 {
		return nil
	}
	return d.pods.Delete(e.NetnsCookie)
}

// Verify checks the pod's state is in the maps exactly as its settings say.
func (d *Datapath) Verify(_ context.Context, e store.Entry) error {
	p, ok, err := d.plan(e)
	if err != nil || !ok {
		return err
	}
	if e.NetnsCookie == 0 {
		return errors.New("pod has no netns cookie: never enrolled")
	}
	if err := d.pods.Verify(e.NetnsCookie, p); err != nil {
		return err
	}
	if inboundOn(e) {
		return d.pods.VerifyInbound(e.NetnsCookie, e.IfName)
	}
	return nil
}

// inboundOn says whether inbound capture goes on the attachment's
// interface: not when Istio's excludeInterfaces names it.
func inboundOn(e store.Entry) bool {
	if e.IfName == "" {
		return false
	}
	return e.Capture == nil || !slices.Contains(e.Capture.ExcludeInterfaces, e.IfName)
}

// Reconcile removes pinned state of pods the agent no longer knows (e.g.
// deleted while it was down). Call it at start with every stored entry,
// then Enroll each of them again to repair anything missing.
func (d *Datapath) Reconcile(_ context.Context, known []store.Entry) error {
	keep := make(map[uint64]bool, len(known))
	for _, e := range known {
		if e.NetnsCookie != 0 {
			keep[e.NetnsCookie] = true
		}
	}
	enrolled, err := d.pods.Enrolled()
	if err != nil {
		return err
	}
	var errs []error
	for _, cookie := range enrolled {
		if keep[cookie] {
			continue
		}
		d.log.Info("removing pinned state of an unknown pod", "netnsCookie", cookie)
		errs = append(errs, d.pods.Delete(cookie))
	}
	return errors.Join(errs...)
}

// PodCounters returns the pod's capture counters (for the agent's metrics).
func (d *Datapath) PodCounters(e store.Entry) (bpf.Counters, error) {
	if e.NetnsCookie == 0 {
		return bpf.Counters{}, errors.New("pod has no netns cookie: never enrolled")
	}
	return d.pods.Counters(e.NetnsCookie)
}

// Counters implements datapath.CounterReader for `sidelane explain`.
func (d *Datapath) Counters(_ context.Context, e store.Entry) (map[string]uint64, error) {
	c, err := d.PodCounters(e)
	if err != nil {
		return nil, err
	}
	return CounterMap(c), nil
}

// CounterMap names each counter as the metrics and explain show it.
func CounterMap(c bpf.Counters) map[string]uint64 {
	return map[string]uint64{
		"redirected_outbound": c.RedirectedOutbound,
		"redirected_inbound":  c.RedirectedInbound,
		"redirected_dns":      c.RedirectedDNS,
		"excluded":            c.Excluded,
		"orig_dst_answered":   c.OrigDstAnswered,
		"shortcut_messages":   c.ShortcutMessages,
		"shortcut_bytes":      c.ShortcutBytes,
		"dropped_inbound":     c.DroppedInbound,
	}
}

// NodeCounters returns the node's per-node mode counters: connects steered
// to the node proxy, those refused because it was down (fail closed), and
// those refused because no node proxy is configured. The agent exports
// them as metrics and logs when Refused grows.
func (d *Datapath) NodeCounters() (bpf.NodeCounters, error) {
	return d.pods.NodeCounters()
}

// NodeProxyOptions say where the node proxy of per-node mode listens.
type NodeProxyOptions struct {
	// IPv4 and IPv6 are the node proxy's outbound listener addresses in
	// the host netns, reachable from every pod on the node and used by the
	// proxy as the source of its upstream connections to pods (inbound
	// capture lets connections from it through, so a per-node pod is
	// never captured twice). The CNI bridge's gateway address (e.g.
	// 10.244.1.1) fits: every pod has a route to it. At least one.
	IPv4, IPv6 netip.Addr
	// OutboundPort is the outbound listener's port (default 15001).
	OutboundPort uint16
	// InboundPort is the port of the listener the node proxy opens inside
	// each per-node pod's netns (default 15006).
	InboundPort uint16
	// HostNetns is the netns the node proxy runs in (default
	// /proc/self/ns/net: the agent runs with hostNetwork, like the proxy).
	HostNetns string
}

// ReportNodeProxy reads the per-node mode counters and logs a warning when
// connects were refused since prev (the node proxy is down, or not
// configured). The agent calls it from its metrics loop with the previous
// result and exports the returned counters.
func (d *Datapath) ReportNodeProxy(prev bpf.NodeCounters) (bpf.NodeCounters, error) {
	cur, err := d.pods.NodeCounters()
	if err != nil {
		return prev, err
	}
	if n := cur.Refused - prev.Refused; cur.Refused > prev.Refused {
		d.log.Warn("per-node pods' connections refused: node proxy down or unreachable (failing closed)", "refused", n)
	}
	if n := cur.Unconfigured - prev.Unconfigured; cur.Unconfigured > prev.Unconfigured {
		d.log.Warn("per-node pods' connections refused: no node proxy configured", "refused", n)
	}
	return cur, nil
}
