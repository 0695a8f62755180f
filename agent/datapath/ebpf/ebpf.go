// Package ebpf is the eBPF capture backend: it implements datapath.Datapath
// over the programs and maps of package bpf, keyed by each pod's network
// namespace cookie.
package ebpf

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"

	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/bpf"
)

// modeSidecar is the agent's mode for pods with an Istio sidecar (the
// agent's ModeSidecar; not imported to keep this package below the agent).
const modeSidecar = "sidecar"

// Pods is what the backend needs from the loaded programs (*bpf.Capture).
type Pods interface {
	Put(netns uint64, p bpf.Pod) error
	Delete(netns uint64) error
	Verify(netns uint64, p bpf.Pod) error
	AttachInbound(netnsPath string, netns uint64, ifname string) error
	VerifyInbound(netns uint64, ifname string) error
	Enrolled() ([]uint64, error)
	Counters(netns uint64) (bpf.Counters, error)
}

// Datapath captures sidecar pods with eBPF.
type Datapath struct {
	pods   Pods
	cookie func(netnsPath string) (uint64, error)
	routes func(netnsPath string, excluded []string) ([]bpf.Route, error)
	log    *slog.Logger
}

// New returns the backend over loaded programs (see bpf.Load).
func New(pods Pods, log *slog.Logger) *Datapath {
	if log == nil {
		log = slog.Default()
	}
	return &Datapath{pods: pods, cookie: bpf.NetnsCookie, routes: bpf.PodRoutes, log: log}
}

// Name implements datapath.Datapath.
func (d *Datapath) Name() string { return "ebpf" }

// Enroll writes the pod's capture state, keyed by its netns cookie, which
// it records in e. Pods not in sidecar mode are left uncaptured (and any
// earlier capture of theirs removed).
func (d *Datapath) Enroll(_ context.Context, e *store.Entry) error {
	if e.Mode != modeSidecar || e.Capture == nil {
		if e.NetnsCookie != 0 {
			if err := d.pods.Delete(e.NetnsCookie); err != nil {
				return err
			}
			e.NetnsCookie = 0
		}
		return nil
	}
	p, err := bpf.PlanPod(e.IPs, *e.Capture)
	if err != nil {
		return fmt.Errorf("capture settings: %w", err)
	}
	cookie, err := d.cookie(e.Netns)
	if err != nil {
		return err
	}
	if len(e.Capture.ExcludeInterfaces) > 0 {
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
	d.log.Debug("pod enrolled", "attachment", e.Key.String(), "netnsCookie", cookie)
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
	if e.Mode != modeSidecar || e.Capture == nil {
		return nil
	}
	if e.NetnsCookie == 0 {
		return errors.New("pod has no netns cookie: never enrolled")
	}
	p, err := bpf.PlanPod(e.IPs, *e.Capture)
	if err != nil {
		return fmt.Errorf("capture settings: %w", err)
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
	return e.IfName != "" && !slices.Contains(e.Capture.ExcludeInterfaces, e.IfName)
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

// Counters returns the pod's capture counters (for the agent's metrics).
func (d *Datapath) Counters(e store.Entry) (bpf.Counters, error) {
	if e.NetnsCookie == 0 {
		return bpf.Counters{}, errors.New("pod has no netns cookie: never enrolled")
	}
	return d.pods.Counters(e.NetnsCookie)
}
