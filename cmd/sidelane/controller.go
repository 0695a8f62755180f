package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/sidelane/sidelane/agent/kube"
	"github.com/sidelane/sidelane/agent/ops"
	"github.com/sidelane/sidelane/nodetaint"
	"github.com/sidelane/sidelane/policy/controller"
)

// DefaultControllerMetricsAddr is the controller's /healthz, /readyz and
// /metrics: next to the agent's 15095, outside the ports Istio uses.
const DefaultControllerMetricsAddr = "127.0.0.1:15096"

// runController is the cluster-wide L7 policy controller (a Deployment):
// it compiles L7Policies into Istio EnvoyFilters, writes them, owns policy
// status and garbage collection. Replicas elect one writer with a Lease.
func runController(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("controller", flag.ContinueOnError)
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig file (default: in-cluster config when running in a pod)")
	metricsAddr := fs.String("metrics-addr", DefaultControllerMetricsAddr, "address of /healthz, /readyz and /metrics (empty: off)")
	namespace := fs.String("namespace", envOr("POD_NAMESPACE", "sidelane-system"), "namespace of the leader election Lease "+controller.LeaseName+" ($POD_NAMESPACE when set)")
	identity := fs.String("identity", os.Getenv("POD_NAME"), "this replica's unique leader election identity (default $POD_NAME, else hostname plus a random suffix)")
	trustDomain := fs.String("trust-domain", "cluster.local", "the mesh's SPIFFE trust domain, for L7 policy principals")
	taints := fs.Bool("manage-node-taints", true, "add the "+kube.TaintKey+" taint to a node whose agent pod is not ready (crashed, restarting) and remove it once the pod is ready")
	agentSelector := fs.String("agent-selector", "app.kubernetes.io/name=sidelane,app.kubernetes.io/component=agent", "label selector of the agent DaemonSet's pods (in --namespace), for --manage-node-taints")
	var e controller.Election
	fs.DurationVar(&e.LeaseDuration, "lease-duration", 15*time.Second, "how long a Lease holds without renewal")
	fs.DurationVar(&e.RenewDeadline, "renew-deadline", 10*time.Second, "a leader that cannot renew within this stops writing (less than --lease-duration)")
	fs.DurationVar(&e.RetryPeriod, "retry-period", 2*time.Second, "how often replicas try to acquire or renew the Lease (less than --renew-deadline)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if e.Identity = *identity; e.Identity == "" {
		var err error
		if e.Identity, err = uniqueIdentity(); err != nil {
			return err
		}
	}
	e.Namespace = *namespace
	if err := e.Complete(); err != nil {
		return err
	}
	rc, err := restConfig(*kubeconfig)
	if err != nil {
		return err
	}
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		return fmt.Errorf("dynamic client: %w", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	c, err := controller.New(log, cs, dyn, *trustDomain, reg)
	if err != nil {
		return err
	}

	var nt *nodetaint.Controller
	if *taints {
		sel, err := labels.Parse(*agentSelector)
		if err != nil {
			return fmt.Errorf("--agent-selector: %w", err)
		}
		if nt, err = nodetaint.New(log, nodetaint.Config{Client: cs, Namespace: *namespace, Selector: sel, Key: kube.TaintKey, Effect: kube.TaintEffect}, reg); err != nil {
			return err
		}
	}

	var apisServed atomic.Bool
	ready := func() (bool, string) {
		switch {
		case !apisServed.Load():
			return false, "waiting for the L7Policy and EnvoyFilter APIs"
		case !c.Synced(), nt != nil && !nt.Synced():
			return false, "informer caches not synced"
		}
		return true, ""
	}
	if *metricsAddr != "" {
		go func() {
			if err := ops.Serve(ctx, log, *metricsAddr, controller.Handler(ready, reg)); err != nil {
				log.Error("operator endpoints", "error", err)
			}
		}()
	}
	if err := controller.WaitForAPIs(ctx, log, cs.Discovery(), 10*time.Second); err != nil {
		return nil // shut down while waiting
	}
	apisServed.Store(true)
	c.Start(ctx)
	if nt != nil {
		nt.Start(ctx)
	}
	log.Info("l7 policy controller started", "identity", e.Identity, "leaseNamespace", e.Namespace, "manageNodeTaints", nt != nil)
	return controller.RunLeader(ctx, log, cs, e, func(ctx context.Context) {
		if nt != nil {
			done := make(chan struct{})
			go func() { defer close(done); nt.Run(ctx) }()
			defer func() { <-done }()
		}
		if err := c.Run(ctx); err != nil && ctx.Err() == nil {
			log.Error("l7 policy controller stopped", "error", err)
		}
	})
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// uniqueIdentity is the hostname plus a random suffix: two processes on one
// host must never share an identity, or both would think they lead.
func uniqueIdentity() (string, error) {
	host, err := os.Hostname()
	if err != nil {
		return "", fmt.Errorf("identity: %w", err)
	}
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("identity: %w", err)
	}
	return host + "_" + hex.EncodeToString(b), nil
}
