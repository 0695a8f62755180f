package main

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/sidelane/sidelane/policy/controller"
)

// startPolicyWriter runs the L7 policy controller in the agent that holds
// the writer Lease; every other agent waits as a standby, so exactly one
// writes EnvoyFilters and policy status without a separate Deployment.
func startPolicyWriter(ctx context.Context, log *slog.Logger, rc *rest.Config, cs kubernetes.Interface, namespace, identity, trustDomain string, reg prometheus.Registerer) error {
	if namespace == "" {
		namespace = "sidelane-system"
	}
	// Without the CRDs (sidelane's L7Policy, Istio's EnvoyFilter) there is
	// nothing to write: say so once instead of failing informers forever.
	for _, gv := range []string{"sidelane.io/v1alpha1", "networking.istio.io/v1alpha3"} {
		if _, err := cs.Discovery().ServerResourcesForGroupVersion(gv); err != nil {
			log.Warn("L7 policy writer off: API group not served (install the chart's CRDs and Istio's)", "groupVersion", gv, "error", err)
			return nil
		}
	}
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		return fmt.Errorf("dynamic client: %w", err)
	}
	c, err := controller.New(log, cs, dyn, trustDomain, reg)
	if err != nil {
		return fmt.Errorf("l7 policy writer: %w", err)
	}
	go func() {
		err := controller.RunLeader(ctx, log, cs, namespace, identity, func(ctx context.Context) {
			if err := c.Run(ctx); err != nil && ctx.Err() == nil {
				log.Error("l7 policy writer stopped", "error", err)
			}
		})
		if err != nil && ctx.Err() == nil {
			log.Error("l7 policy writer election", "error", err)
		}
	}()
	return nil
}
