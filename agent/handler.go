package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/sidelane/sidelane/agent/cnirpc"
	"github.com/sidelane/sidelane/agent/datapath"
	"github.com/sidelane/sidelane/agent/metrics"
	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/istio/capture"
)

// Classifier decides a pod's datapath mode and capture settings. The
// Kubernetes-backed one waits (bounded) for the pod to appear in its cache.
type Classifier interface {
	Classify(ctx context.Context, pod cnirpc.PodRef) (Decision, error)
}

// Decision is a classifier's verdict for one pod.
type Decision struct {
	// Mode is one of the Mode* constants.
	Mode string
	// Reason says why, in words an operator understands (shown by explain).
	Reason string
	// Capture is what to capture in sidecar mode; nil otherwise.
	Capture *capture.Settings
	// Rule is the classifier's rule code, recorded at ADD (store.Entry.Rule).
	Rule string
}

// The datapath modes.
const (
	ModeNone    = "none"    // sidelane leaves the pod alone
	ModeSidecar = "sidecar" // Istio sidecar: capture to the pod's own Envoy
	ModeNode    = "node"    // sidecar-free: steer to the per-node proxy
)

// StaticClassifier gives every pod the same decision. It serves the agent
// when it runs without Kubernetes (tests, conformance).
type StaticClassifier Decision

func (c StaticClassifier) Classify(context.Context, cnirpc.PodRef) (Decision, error) {
	return Decision(c), nil
}

// Readiness reports whether the agent can serve ADD, and why not.
type Readiness interface {
	Ready() (bool, string)
}

// cniHandler implements the agent side of the plugin protocol.
type cniHandler struct {
	log        *slog.Logger
	store      *store.Store
	datapath   datapath.Datapath
	classifier Classifier
	readiness  Readiness
	now        func() time.Time
	locks      *attachLocks // shared with Agent; see Agent.locks
	l7         func(namespace, name string) *cnirpc.ExplainedL7
	metrics    *metrics.Metrics
}

func (h *cniHandler) Handle(ctx context.Context, req *cnirpc.Request) (rep *cnirpc.Reply, err error) {
	start := h.now()
	defer func() { h.metrics.CNIRequest(string(req.Op), h.now().Sub(start), err) }()
	switch req.Op {
	case cnirpc.OpAdd:
		return h.add(ctx, req)
	case cnirpc.OpDel:
		return h.del(ctx, req)
	case cnirpc.OpCheck:
		return h.check(ctx, req)
	case cnirpc.OpGC:
		return h.gc(ctx, req)
	case cnirpc.OpStatus:
		ready, reason := h.readiness.Ready()
		return &cnirpc.Reply{Ready: ready, Reason: reason}, nil
	case cnirpc.OpExplain:
		return h.explain(ctx, req)
	}
	return nil, fmt.Errorf("unknown op %q", req.Op)
}

func keyOf(req *cnirpc.Request) store.Key {
	return store.Key{Network: req.Network, ContainerID: req.ContainerID, IfName: req.IfName}
}

// The phases of an ADD inside the agent (sidelane_cni_add_phase_seconds);
// datapaths report their own (e.g. ebpf_put) through datapath.Phase.
const (
	phaseNetns      = "netns"
	phaseClassify   = "classify"
	phaseLockWait   = "lock_wait"
	phaseEnroll     = "enroll"
	phaseStateWrite = "state_write"
)

func (h *cniHandler) add(ctx context.Context, req *cnirpc.Request) (*cnirpc.Reply, error) {
	if ready, reason := h.readiness.Ready(); !ready {
		return nil, fmt.Errorf("agent not ready: %s: %w", reason, cnirpc.ErrRetry)
	}
	ctx = datapath.WithPhases(ctx, h.metrics.CNIAddPhase)
	t := time.Now()
	netnsDev, netnsIno, err := podNetns(req.Netns)
	if err != nil {
		return nil, err
	}
	t = datapath.Phase(ctx, phaseNetns, t)
	dec, err := h.classifier.Classify(ctx, req.Pod)
	if err != nil {
		return nil, fmt.Errorf("classify pod %s/%s: %w", req.Pod.Namespace, req.Pod.Name, err)
	}
	t = datapath.Phase(ctx, phaseClassify, t)
	e := store.Entry{
		Key:          keyOf(req),
		Netns:        req.Netns,
		PodNamespace: req.Pod.Namespace,
		PodName:      req.Pod.Name,
		PodUID:       req.Pod.UID,
		IPs:          req.IPs,
		Mode:         dec.Mode,
		Reason:       dec.Reason,
		Rule:         dec.Rule,
		Capture:      dec.Capture,
		// Datapaths re-open Netns later (restart, mode moves); they check
		// it still names this namespace (store.Entry.CheckNetns).
		NetnsDev: netnsDev,
		NetnsIno: netnsIno,
		Added:    h.now().UTC(),
	}
	defer h.locks.sandbox(req.ContainerID)()
	t = datapath.Phase(ctx, phaseLockWait, t)
	if err := h.datapath.Enroll(ctx, &e); err != nil {
		// Nothing half-applied: undo whatever Enroll managed before failing.
		if uerr := h.datapath.Unenroll(ctx, e); uerr != nil {
			h.log.Error("undo failed enroll", "attachment", e.Key.String(), "error", uerr)
		}
		return nil, fmt.Errorf("enroll pod %s/%s in %s datapath: %w", req.Pod.Namespace, req.Pod.Name, h.datapath.Name(), err)
	}
	t = datapath.Phase(ctx, phaseEnroll, t)
	if err := h.store.Put(e); err != nil {
		_ = h.datapath.Unenroll(ctx, e)
		return nil, fmt.Errorf("record attachment: %w", err)
	}
	datapath.Phase(ctx, phaseStateWrite, t)
	h.log.Info("pod added", "attachment", e.Key.String(), "pod", req.Pod.Namespace+"/"+req.Pod.Name, "mode", dec.Mode)
	return &cnirpc.Reply{Mode: dec.Mode}, nil
}

func (h *cniHandler) del(ctx context.Context, req *cnirpc.Request) (*cnirpc.Reply, error) {
	k := keyOf(req)
	defer h.locks.sandbox(k.ContainerID)()
	e, ok := h.store.Get(k)
	if !ok {
		// DEL for an attachment we never saw (or already removed) succeeds.
		return &cnirpc.Reply{}, nil
	}
	if err := h.datapath.Unenroll(ctx, e); err != nil {
		return nil, fmt.Errorf("unenroll %s: %w", k, err)
	}
	if _, _, err := h.store.Delete(k); err != nil {
		return nil, fmt.Errorf("forget attachment: %w", err)
	}
	h.log.Info("pod deleted", "attachment", k.String())
	return &cnirpc.Reply{}, nil
}

func (h *cniHandler) check(ctx context.Context, req *cnirpc.Request) (*cnirpc.Reply, error) {
	k := keyOf(req)
	e, ok := h.store.Get(k)
	if !ok {
		return nil, fmt.Errorf("agent has no state for attachment %s (container %s, interface %s): the pod is not captured", req.Network, req.ContainerID, req.IfName)
	}
	if err := h.datapath.Verify(ctx, e); err != nil {
		return nil, fmt.Errorf("%s datapath state for %s is not in place: %w", h.datapath.Name(), k, err)
	}
	return &cnirpc.Reply{Mode: e.Mode}, nil
}

func (h *cniHandler) gc(ctx context.Context, req *cnirpc.Request) (*cnirpc.Reply, error) {
	valid := make(map[store.Key]bool, len(req.ValidAttachments))
	for _, a := range req.ValidAttachments {
		valid[store.Key{Network: req.Network, ContainerID: a.ContainerID, IfName: a.IfName}] = true
	}
	defer h.locks.every()()
	var errs []error
	removed := 0
	for _, e := range h.store.List() {
		if e.Network != req.Network || valid[e.Key] {
			continue
		}
		if err := h.datapath.Unenroll(ctx, e); err != nil {
			errs = append(errs, fmt.Errorf("unenroll %s: %w", e.Key, err))
			continue
		}
		if _, _, err := h.store.Delete(e.Key); err != nil {
			errs = append(errs, err)
			continue
		}
		removed++
		h.log.Info("stale attachment removed", "attachment", e.Key.String())
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("gc network %s: %w", req.Network, err)
	}
	return &cnirpc.Reply{Removed: removed}, nil
}

// explain reports the pod's attachments as stored, the classifier's
// current verdict, and the datapath's counters.
func (h *cniHandler) explain(ctx context.Context, req *cnirpc.Request) (*cnirpc.Reply, error) {
	ex := &cnirpc.Explanation{Pod: req.Pod, Datapath: h.datapath.Name(), Attachments: []cnirpc.ExplainedAttachment{}}
	counters, _ := h.datapath.(datapath.CounterReader)
	for _, e := range h.store.List() {
		if e.PodNamespace != req.Pod.Namespace || e.PodName != req.Pod.Name {
			continue
		}
		a := cnirpc.ExplainedAttachment{
			Network: e.Network, ContainerID: e.ContainerID, IfName: e.IfName, Netns: e.Netns,
			IPs: e.IPs, Mode: e.Mode, Reason: e.Reason, Capture: e.Capture, Added: e.Added,
		}
		if counters != nil {
			c, err := counters.Counters(ctx, e)
			if err != nil {
				h.log.Warn("read datapath counters", "attachment", e.Key.String(), "error", err)
			}
			a.Counters = c
		}
		ex.Attachments = append(ex.Attachments, a)
	}
	if h.l7 != nil {
		ex.L7 = h.l7(req.Pod.Namespace, req.Pod.Name)
	}
	dec, err := h.classifier.Classify(ctx, req.Pod)
	if err != nil {
		ex.CurrentError = err.Error()
	} else {
		ex.Current = &cnirpc.ExplainedDecision{Mode: dec.Mode, Reason: dec.Reason, Capture: dec.Capture}
	}
	return &cnirpc.Reply{Explain: ex}, nil
}
