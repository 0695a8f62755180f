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
	"time"

	"github.com/sidelane/sidelane/agent/datapath"
	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/bpf"
)

// The agent's modes (agent.ModeSidecar, agent.ModeNode; not imported to
// keep this package below the agent).
const (
	modeSidecar = "sidecar" // the pod's own Envoy captures
	modeNode    = "node"    // sidecar-free: the node proxy captures
)

// The parts of an enroll this backend reports to datapath.Phase
// (sidelane_cni_add_phase_seconds{phase}).
const (
	PhaseNetnsCookie   = "ebpf_netns_cookie"   // open the pod's netns, read its cookie
	PhaseRoutes        = "ebpf_routes"         // read its routes (excludeInterfaces only)
	PhasePut           = "ebpf_put"            // write its map entries
	PhaseInboundAttach = "ebpf_inbound_attach" // attach (or update) its inbound capture: sk_lookup (sidecar), tc (per-node)
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
	DetachInbound(netns uint64, ifname string) error
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
// left uncaptured (and any earlier capture of theirs removed). Writing over
// an existing state is one in-place update (see Move).
//
// A failed first Enroll (e.g. the pod's netns disappeared between reading
// its cookie and attaching tc) removes what it wrote under the new cookie,
// so the maps are as before; the cookie stays recorded only if that
// removal failed too, for the handler's Unenroll to finish.
func (d *Datapath) Enroll(ctx context.Context, e *store.Entry) error {
	t, err := d.target(ctx, *e)
	if err != nil {
		return err
	}
	prev := e.NetnsCookie
	err = d.apply(ctx, *e, e, t)
	if err != nil && t.captured && prev != t.cookie {
		if derr := d.pods.Delete(t.cookie); derr != nil {
			return fmt.Errorf("%w (remove the partial enroll: %w)", err, derr)
		}
		e.NetnsCookie = prev
	}
	return err
}

// Move changes a running pod's capture from old to next in place: one Put
// over the pod's entry (new rules, then the pod config, which switches new
// connections from old to next at once, then old rules removed), the tc
// inbound link updated in place or attached if missing, never detached
// first. Only a move to a mode that captures nothing deletes the pod's
// state. Any failure re-applies old the same way (datapath.ErrNotRestored
// when that fails too); bad settings or an unreadable netns fail before
// anything is written.
func (d *Datapath) Move(ctx context.Context, old store.Entry, next *store.Entry) error {
	t, err := d.target(ctx, *next)
	if err != nil {
		return err
	}
	err = d.apply(ctx, old, next, t)
	if err == nil {
		return nil
	}
	// Put old back over whatever apply left.
	now := *next
	now.NetnsCookie = old.NetnsCookie
	if t.captured {
		now.NetnsCookie = t.cookie
	}
	back := old
	rerr := func() error {
		ot, err := d.target(ctx, old)
		if err != nil {
			return err
		}
		return d.apply(ctx, now, &back, ot)
	}()
	if rerr != nil {
		d.log.Error("restore pod capture after a failed move", "attachment", old.Key.String(), "mode", old.Mode, "error", rerr)
		return fmt.Errorf("%w (restore %s mode: %w: %w)", err, old.Mode, datapath.ErrNotRestored, rerr)
	}
	return err
}

// target is what an entry asks of the maps: whether the pod is captured,
// and then its netns cookie and BPF state.
type target struct {
	captured bool
	cookie   uint64
	pod      bpf.Pod
}

// target resolves e's capture: settings planned, netns cookie and (for
// excluded interfaces) routes read. It writes nothing.
func (d *Datapath) target(ctx context.Context, e store.Entry) (target, error) {
	p, ok, err := d.plan(e)
	if err != nil || !ok {
		return target{}, err
	}
	// Never enroll what the path names now if that is not the pod's netns
	// of ADD (pid reuse behind a /proc/<pid>/ns/net path).
	if err := e.CheckNetns(); err != nil {
		return target{}, err
	}
	start := time.Now()
	cookie, err := d.cookie(e.Netns)
	if err != nil {
		return target{}, err
	}
	start = datapath.Phase(ctx, PhaseNetnsCookie, start)
	if e.Mode == modeSidecar && len(e.Capture.ExcludeInterfaces) > 0 {
		routes, err := d.routes(e.Netns, e.Capture.ExcludeInterfaces)
		if err != nil {
			return target{}, err
		}
		p = p.WithRoutes(routes)
		datapath.Phase(ctx, PhaseRoutes, start)
	}
	return target{captured: true, cookie: cookie, pod: p}, nil
}

// apply moves the maps from the state written for from to t (next's),
// recording next's cookie before writing anything under it, so an
// Unenroll(next) after a failed Enroll removes what was half-written.
func (d *Datapath) apply(ctx context.Context, from store.Entry, next *store.Entry, t target) error {
	if !t.captured {
		if from.NetnsCookie != 0 {
			if err := d.pods.Delete(from.NetnsCookie); err != nil {
				return err
			}
		}
		next.NetnsCookie = 0
		return nil
	}
	next.NetnsCookie = t.cookie
	start := time.Now()
	if err := d.pods.Put(t.cookie, t.pod); err != nil {
		return fmt.Errorf("enroll netns %s: %w", next.Netns, err)
	}
	start = datapath.Phase(ctx, PhasePut, start)
	switch {
	case inboundOn(*next):
		if err := d.pods.AttachInbound(next.Netns, t.cookie, next.IfName); err != nil {
			return err
		}
		datapath.Phase(ctx, PhaseInboundAttach, start)
	case from.NetnsCookie == t.cookie && inboundOn(from):
		// The new settings exclude the interface.
		if err := d.pods.DetachInbound(t.cookie, from.IfName); err != nil {
			return err
		}
	}
	if from.NetnsCookie != 0 && from.NetnsCookie != t.cookie {
		// The path now names another netns (the old one is gone): drop the
		// old state so nothing else is captured under its cookie.
		if err := d.pods.Delete(from.NetnsCookie); err != nil {
			return err
		}
	}
	d.log.Debug("pod enrolled", "attachment", next.Key.String(), "mode", next.Mode, "netnsCookie", t.cookie)
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
		"shortcut_to_tcp":     c.ShortcutToTCP,
		"dropped_inbound":     c.DroppedInbound,
		"timewait_reuse":      c.TimeWaitReuse,
	}
}

// NodeCounters returns the node's per-node mode counters: connects steered
// to the node proxy, those refused because it was down (fail closed), and
// those refused because no node proxy is configured. The agent exports
// them as metrics and logs when Refused grows.
func (d *Datapath) NodeCounters() (bpf.NodeCounters, error) {
	return d.pods.NodeCounters()
}

// ShortcutJoins reports the shortcut's join requests handled so far (zero
// when the loaded programs do not say).
func (d *Datapath) ShortcutJoins() bpf.JoinStats {
	if j, ok := d.pods.(interface{ ShortcutJoins() bpf.JoinStats }); ok {
		return j.ShortcutJoins()
	}
	return bpf.JoinStats{}
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
