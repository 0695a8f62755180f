package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"k8s.io/apimachinery/pkg/types"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/sidelane/sidelane/agent"
	"github.com/sidelane/sidelane/agent/bpfmetrics"
	"github.com/sidelane/sidelane/agent/cnirpc"
	"github.com/sidelane/sidelane/agent/kube"
	"github.com/sidelane/sidelane/agent/metrics"
	"github.com/sidelane/sidelane/agent/nodeproxy"
	"github.com/sidelane/sidelane/agent/ops"
	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/bpf"
	"github.com/sidelane/sidelane/istio/capture"
	"github.com/sidelane/sidelane/istio/classify"
	"github.com/sidelane/sidelane/policy/compile"
)

// DefaultMetricsAddr is where /healthz, /readyz and /metrics listen. 15095
// is outside the ports Istio uses (15000-15090 are taken by Envoy,
// pilot-agent, istiod and ztunnel).
const DefaultMetricsAddr = "127.0.0.1:15095"

func runAgent(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("agent", flag.ContinueOnError)
	socket := fs.String("socket", agent.DefaultSocket, "Unix socket the CNI plugin talks to")
	stateDir := fs.String("state-dir", agent.DefaultStateDir, "directory for the agent's pod state")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	metricsAddr := fs.String("metrics-addr", DefaultMetricsAddr, "address of /healthz, /readyz and /metrics (empty: off)")
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig file (default: in-cluster config when running in a pod)")
	nodeName := fs.String("node-name", os.Getenv("NODE_NAME"), "this node's name (default $NODE_NAME)")
	excluded := fs.String("excluded-namespaces", classify.DefaultExcludedNS, "comma-separated namespaces never captured")
	agentNS := fs.String("agent-namespace", os.Getenv("POD_NAMESPACE"), "namespace of the agent's own pods (default $POD_NAMESPACE; empty: any)")
	agentLabel := fs.String("agent-pod-label", classify.AgentLabelDefault+"="+classify.AgentLabelValue, "key=value label identifying the agent's own pods, never captured")
	podWait := fs.Duration("pod-wait", kube.DefaultWait, "how long ADD waits for a pod the agent's cache has not seen yet")
	taint := fs.Bool("manage-taint", true, "remove the "+kube.TaintKey+" node taint when ready (with --pod-name: once kubelet reports that pod Ready) and re-add it on shutdown")
	podName := fs.String("pod-name", os.Getenv("POD_NAME"), "the agent's own pod (in --agent-namespace; default $POD_NAME): the taint is removed once kubelet reports it Ready, as the controller's taint loop does (empty: as soon as the agent is ready)")
	daemonSet := fs.String("daemonset", "", "the agent's own DaemonSet (in --agent-namespace): on shutdown the taint is re-added only while it exists, not on uninstall (empty: always)")
	standalone := fs.Bool("standalone", false, "run without Kubernetes: every pod gets --standalone-mode (default when there is no --kubeconfig and no in-cluster config)")
	standaloneMode := fs.String("standalone-mode", agent.ModeNone, "mode of every pod when standalone: none, or sidecar with Istio's default capture settings (benchmarks and tests of the enroll path without Kubernetes)")
	var dpf datapathFlags
	dpf.register(fs)
	trustDomain := fs.String("trust-domain", "cluster.local", "the mesh's SPIFFE trust domain, for L7 policy principals")
	xdsSocket := fs.String("xds-socket", "", "per-node mode: Unix socket to serve the node proxy's xDS on (listeners, L7 policy); needs --node-proxy-address (empty: off)")
	xdsGID := fs.Int("xds-socket-gid", 1337, "group given read-write access to --xds-socket (the node proxy's; -1: root only)")
	allowUIDs := fs.String("socket-allow-uids", "0", "comma-separated peer uids served on --socket besides the agent's own (SO_PEERCRED); others are refused and counted")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	// Bad flags fail before the datapath is opened.
	standaloneCls, err := standaloneClassifier(*standaloneMode)
	if err != nil {
		return err
	}

	var st *agent.Agent
	m := metrics.New(func() map[string]int { return countModes(st) })
	dp, err := dpf.open(log)
	if err != nil {
		return err
	}
	defer dp.Close()
	if err := m.Register(datapathInfo(dpf.kind, dp)); err != nil {
		return err
	}
	cfg := agent.Config{Socket: *socket, StateDir: *stateDir, Log: log, Metrics: m, Datapath: dp.Datapath}
	if cfg.SocketAllowUIDs, err = parseUIDs(*allowUIDs); err != nil {
		return fmt.Errorf("--socket-allow-uids: %w", err)
	}
	var ctrl *kube.Controller
	startNodeProxyFeed := func(func() []store.Entry) {}
	if !*standalone && *kubeconfig == "" && os.Getenv("KUBERNETES_SERVICE_HOST") == "" {
		log.Warn("no --kubeconfig and not running in a pod: standalone, every pod gets --standalone-mode", "mode", *standaloneMode)
		*standalone = true
	}
	if *standalone {
		cfg.Classifier = standaloneCls
	} else {
		ccfg := classify.DefaultConfig()
		var err error
		if ccfg.ExcludedNamespaces, err = classify.ParseNamespaces(*excluded); err != nil {
			return fmt.Errorf("--excluded-namespaces: %w", err)
		}
		ccfg.AgentNamespace = *agentNS
		if ccfg.AgentLabels, err = parseLabel(*agentLabel); err != nil {
			return fmt.Errorf("--agent-pod-label: %w", err)
		}
		if *nodeName == "" {
			return errors.New("--node-name (or $NODE_NAME) is required unless --standalone")
		}
		if *daemonSet != "" && *agentNS == "" {
			return errors.New("--daemonset needs --agent-namespace (or $POD_NAMESPACE)")
		}
		if *podName != "" && *agentNS == "" {
			return errors.New("--pod-name needs --agent-namespace (or $POD_NAMESPACE)")
		}
		rc, err := restConfig(*kubeconfig)
		if err != nil {
			return err
		}
		cs, err := kubernetes.NewForConfig(rc)
		if err != nil {
			return fmt.Errorf("kubernetes client: %w", err)
		}
		ctrl, err = kube.New(kube.Config{
			Client: cs, NodeName: *nodeName, Classify: ccfg, Log: log, Metrics: m,
			Wait: *podWait, ManageTaint: *taint, Capture: kube.IstioCapture,
			DaemonSet: types.NamespacedName{Namespace: *agentNS, Name: *daemonSet},
			Self:      types.NamespacedName{Namespace: *agentNS, Name: *podName},
		})
		if err != nil {
			return err
		}
		cfg.Classifier, cfg.Startup, cfg.OnReady = ctrl, ctrl.Start, ctrl.OnReady
		if *xdsSocket != "" {
			np, err := dpf.nodeProxy()
			if err != nil {
				return err
			}
			if np == nil {
				return errors.New("--xds-socket needs --node-proxy-address")
			}
			// explain reports the policy the feed compiled last.
			var compiled atomic.Pointer[compile.Result]
			cfg.L7 = func(namespace, name string) *cnirpc.ExplainedL7 {
				if res := compiled.Load(); res != nil {
					return nodeproxy.L7For(res, namespace, name)
				}
				return nil
			}
			startNodeProxyFeed = func(local func() []store.Entry) {
				go func() {
					if err := runNodeProxyFeed(ctx, log, rc, cs, np, *xdsSocket, *xdsGID, *nodeName, *trustDomain, m.Registry, local, compiled.Store); err != nil {
						log.Error("node proxy xDS", "error", err)
					}
				}()
			}
		}
	}
	a, err := agent.New(cfg)
	if err == nil && dp.EBPF != nil {
		// Drop pinned state of pods the agent no longer knows (deleted
		// while it was down); the agent re-verifies the rest at start.
		if rerr := dp.EBPF.Reconcile(ctx, a.Store().List()); rerr != nil {
			log.Error("reconcile pinned eBPF state", "error", rerr)
		}
		if rerr := m.Register(bpfmetrics.New(dp.EBPF, a.Store().List)); rerr != nil {
			return rerr
		}
		go bpfmetrics.WatchNodeProxy(ctx, log, dp.EBPF.ReportNodeProxy, 5*time.Second)
		// Self-repair: put back links and pins another process removed.
		go dp.EBPF.WatchRepairs(ctx, dpf.repair, a.Store().List, func(r bpf.Repaired) {
			m.DatapathRepair(r.What)
			if ctrl != nil {
				ctrl.NodeEventf(kube.EventDatapathRepaired, "sidelane re-attached its eBPF datapath: %s", r)
			}
		})
	}
	if err != nil {
		return err
	}
	st = a
	startNodeProxyFeed(a.Store().List)
	if ctrl != nil {
		ctrl.SetTarget(a)
		defer ctrl.Shutdown()
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if *metricsAddr != "" {
		go func() {
			if err := ops.Serve(ctx, log, *metricsAddr, ops.Handler(a, m)); err != nil {
				log.Error("operator endpoints", "error", err)
			}
		}()
	}
	return a.Run(ctx)
}

// standaloneClassifier gives every pod the mode --standalone-mode names.
func standaloneClassifier(mode string) (agent.Classifier, error) {
	switch mode {
	case agent.ModeNone:
		return agent.StaticClassifier{Mode: agent.ModeNone, Reason: "standalone (--standalone-mode none)"}, nil
	case agent.ModeSidecar:
		s := capture.Defaults()
		return agent.StaticClassifier{Mode: agent.ModeSidecar, Reason: "standalone (--standalone-mode sidecar)", Capture: &s}, nil
	}
	return nil, fmt.Errorf("--standalone-mode %q: want %s or %s", mode, agent.ModeNone, agent.ModeSidecar)
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig != "" {
		c, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("--kubeconfig %s: %w", kubeconfig, err)
		}
		return c, nil
	}
	c, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("no --kubeconfig and not in a pod (%w); use --standalone to run without Kubernetes", err)
	}
	return c, nil
}

func parseLabel(s string) (map[string]string, error) {
	if s == "" {
		return nil, nil
	}
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return nil, fmt.Errorf("%q is not key=value", s)
	}
	return map[string]string{k: v}, nil
}

func countModes(a *agent.Agent) map[string]int {
	out := map[string]int{agent.ModeNone: 0, agent.ModeSidecar: 0, agent.ModeNode: 0}
	if a == nil {
		return out
	}
	for _, e := range a.Store().List() {
		out[e.Mode]++
	}
	return out
}

// parseUIDs reads a comma-separated uid list; "" is an empty list (only
// the agent's own uid).
func parseUIDs(s string) ([]uint32, error) {
	uids := []uint32{}
	for f := range strings.SplitSeq(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		u, err := strconv.ParseUint(f, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("uid %q: %w", f, err)
		}
		uids = append(uids, uint32(u))
	}
	return uids, nil
}
