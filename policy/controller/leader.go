package controller

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

// LeaseName is the coordination.k8s.io Lease the agents compete for.
const LeaseName = "sidelane-l7-writer"

// RunLeader runs run while this agent (identity, usually the node name)
// holds the Lease in namespace, and returns when ctx ends. Losing the lease
// cancels run's context; the Lease is released on shutdown so another agent
// takes over at once instead of after LeaseDuration.
func RunLeader(ctx context.Context, log *slog.Logger, kube kubernetes.Interface, namespace, identity string, run func(context.Context)) error {
	if identity == "" {
		return fmt.Errorf("leader election: identity is empty")
	}
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Name: LeaseName, Namespace: namespace},
		Client:     kube.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: identity},
	}
	le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock:            lock,
		LeaseDuration:   15 * time.Second,
		RenewDeadline:   10 * time.Second,
		RetryPeriod:     2 * time.Second,
		ReleaseOnCancel: true,
		Name:            LeaseName,
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(ctx context.Context) {
				log.Info("l7 writer: leading", "identity", identity)
				run(ctx)
			},
			OnStoppedLeading: func() { log.Info("l7 writer: not leading", "identity", identity) },
		},
	})
	if err != nil {
		return fmt.Errorf("leader election: %w", err)
	}
	// Run returns when leadership is lost; compete again until ctx ends.
	for ctx.Err() == nil {
		le.Run(ctx)
	}
	return nil
}
