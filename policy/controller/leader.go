package controller

import (
	"context"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

// LeaseName is the coordination.k8s.io Lease the controller replicas
// compete for.
const LeaseName = "sidelane-l7-writer"

// Election configures RunLeader. Zero durations take the defaults (15 s
// lease, 10 s renew deadline, 2 s retry period, as kube-controller-manager).
type Election struct {
	Namespace string // of the Lease
	Identity  string // unique per replica (the pod name)
	// A leader that cannot renew within RenewDeadline stops writing (its
	// context is cancelled) before LeaseDuration lets another replica
	// acquire the Lease, so two replicas never write at the same time
	// unless their clocks drift by more than the difference.
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
}

// Complete fills in default durations and checks the configuration.
func (e *Election) Complete() error {
	if e.Identity == "" {
		return fmt.Errorf("leader election: identity is empty")
	}
	if e.Namespace == "" {
		return fmt.Errorf("leader election: namespace is empty")
	}
	if e.LeaseDuration == 0 {
		e.LeaseDuration = 15 * time.Second
	}
	if e.RenewDeadline == 0 {
		e.RenewDeadline = 10 * time.Second
	}
	if e.RetryPeriod == 0 {
		e.RetryPeriod = 2 * time.Second
	}
	if e.RenewDeadline >= e.LeaseDuration || e.RetryPeriod >= e.RenewDeadline || e.RetryPeriod <= 0 {
		return fmt.Errorf("leader election: need 0 < retry period (%s) < renew deadline (%s) < lease duration (%s)", e.RetryPeriod, e.RenewDeadline, e.LeaseDuration)
	}
	return nil
}

// RunLeader runs run while this replica holds the Lease, and returns when
// ctx ends. Losing the lease cancels run's context; RunLeader waits for run
// to return before competing again, so one process never runs two terms at
// once. The Lease is released on shutdown so another replica takes over at
// once instead of after LeaseDuration.
func RunLeader(ctx context.Context, log *slog.Logger, kube kubernetes.Interface, e Election, run func(context.Context)) error {
	if err := e.Complete(); err != nil {
		return err
	}
	for ctx.Err() == nil {
		lock := &heldLock{Interface: &resourcelock.LeaseLock{
			LeaseMeta:  metav1.ObjectMeta{Name: LeaseName, Namespace: e.Namespace},
			Client:     kube.CoordinationV1(),
			LockConfig: resourcelock.ResourceLockConfig{Identity: e.Identity},
		}}
		termDone := make(chan struct{})
		le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
			Lock:            lock,
			LeaseDuration:   e.LeaseDuration,
			RenewDeadline:   e.RenewDeadline,
			RetryPeriod:     e.RetryPeriod,
			ReleaseOnCancel: true,
			Name:            LeaseName,
			Callbacks: leaderelection.LeaderCallbacks{
				OnStartedLeading: func(ctx context.Context) {
					defer close(termDone)
					log.Info("l7 writer: leading", "identity", e.Identity)
					run(ctx)
				},
				OnStoppedLeading: func() {},
			},
		})
		if err != nil {
			return fmt.Errorf("leader election: %w", err)
		}
		// Run returns when leadership is lost or ctx ends; it starts
		// OnStartedLeading in a goroutine once the Lease is written with
		// this identity, which heldLock records.
		le.Run(ctx)
		if lock.held.Load() {
			<-termDone
			log.Info("l7 writer: not leading", "identity", e.Identity)
		}
	}
	return nil
}

// heldLock records whether this replica ever wrote the Lease as its holder
// (then the leader elector has started, or is about to start, a term).
type heldLock struct {
	resourcelock.Interface
	held atomic.Bool
}

func (l *heldLock) Create(ctx context.Context, r resourcelock.LeaderElectionRecord) error {
	err := l.Interface.Create(ctx, r)
	l.record(r, err)
	return err
}

func (l *heldLock) Update(ctx context.Context, r resourcelock.LeaderElectionRecord) error {
	err := l.Interface.Update(ctx, r)
	l.record(r, err)
	return err
}

func (l *heldLock) record(r resourcelock.LeaderElectionRecord, err error) {
	if err == nil && r.HolderIdentity == l.Identity() {
		l.held.Store(true)
	}
}
