package demo

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sidelane/sidelane/internal/kubelet"
	"github.com/sidelane/sidelane/internal/podnet"
)

// nodeProxy is one simulated node's per-node proxy: haproxy standing in
// for Envoy (as test/e2e runs it) in the node's own netns, listening on the
// bridge gateway (the agent's --node-proxy-address) for outbound, with one
// inbound listener inside each per-node pod's netns (fd@N; Envoy opens them
// itself from network_namespace_filepath), in a cgroup below the agents'
// attach point so the getsockopt hook answers its SO_ORIGINAL_DST.
type nodeProxy struct {
	node          *kubelet.Node
	cgroup, stats string
	cfg           string
	log           *podnet.Buffer
	proc          *podnet.NodeProxyProc
}

func (r *run) newNodeProxy(n *kubelet.Node) (*nodeProxy, error) {
	np := &nodeProxy{node: n, cgroup: filepath.Join(r.fp.Cgroup, "nodeproxy-"+n.Name),
		stats: filepath.Join(r.fp.WorkDir, n.Name+"-node-proxy.sock"),
		cfg:   filepath.Join(r.fp.WorkDir, n.Name+"-node-proxy.cfg"), log: &podnet.Buffer{}}
	if err := os.Mkdir(np.cgroup, 0o755); err != nil {
		return nil, fmt.Errorf("node proxy cgroup: %w", err)
	}
	r.defer_(np.stop)
	return np, nil
}

// start (re)starts the proxy with an inbound listener in each per-node pod.
func (np *nodeProxy) start(perNode ...*podRef) error {
	np.stop()
	var files []*os.File
	var names []string
	for _, p := range perNode {
		f, err := podnet.ListenIn("/var/run/netns/"+p.netns, 15006)
		if err != nil {
			return fmt.Errorf("inbound listener of %s: %w", p.pod.Name, err)
		}
		files = append(files, f)
		names = append(names, p.pod.Name)
	}
	proc, err := podnet.StartNodeProxy(np.node.Netns, np.cgroup, np.cfg, podnet.NodeProxy{
		Addr: gateway(np.node).String(), OutPort: 15001, Inbound: names, StatsSocket: np.stats, LogConnections: true,
	}, files, np.log)
	// Only haproxy holds the inbound listeners now: when it dies they go.
	for _, f := range files {
		f.Close()
	}
	if err != nil {
		return fmt.Errorf("node proxy on %s: %w\n%s", np.node.Name, err, tail(np.log.String(), 1000))
	}
	np.proc = proc
	return nil
}

func (np *nodeProxy) stop() {
	if np.proc != nil {
		np.proc.Stop()
		np.proc = nil
	}
}

// sessions reads one frontend's accepted sessions (0 when the proxy is down).
func (np *nodeProxy) sessions(frontend string) int {
	if np.proc == nil {
		return 0
	}
	m, err := podnet.FrontendSessions(np.stats)
	if err != nil {
		return -1
	}
	return m[frontend]
}

func (r *run) stepAmbient(ctx context.Context) error {
	ns := r.scNS
	if r.client == nil {
		return errors.New("step 1 did not bring up its pods")
	}
	// Un-injected pods of the same namespace (injection opted out), one
	// per node.
	mk := func(name string, n *kubelet.Node) (*podRef, error) {
		p, err := r.fixture("plain", ns, name)
		if err != nil {
			return nil, err
		}
		p.Annotations = map[string]string{"sidecar.istio.io/inject": "false"}
		p.Labels = map[string]string{"role": name} // step 3's policy selects by role
		if _, err := kubelet.WithStandIns(p, r.fp.WorkDir); err != nil {
			return nil, err
		}
		return r.createRunning(ctx, p, n)
	}
	reports, err := mk("reports", r.nodes[0])
	if err != nil {
		return err
	}
	ledger, err := mk("ledger", r.nodes[1])
	if err != nil {
		return err
	}
	r.reports = reports
	r.say("  pods %s (%s) and %s (%s), no sidecar (inject=false), start in mode %s and %s", reports.pod.Name, reports.node.Name,
		ledger.pod.Name, ledger.node.Name, r.mode(reports.node, ns, reports.pod.Name), r.mode(ledger.node, ns, ledger.pod.Name))
	r.say("  kubectl label ns %s istio.io/dataplane-mode=ambient   (live, no pod restarts)", ns)
	if err := r.patchNamespace(ctx, ns, `{"istio.io/dataplane-mode":"ambient"}`); err != nil {
		return err
	}
	for _, p := range []*podRef{reports, ledger} {
		err = r.eventually(ctx, func() bool { return r.mode(p.node, ns, p.pod.Name) == "node" })
		r.check(err == nil, "%s moved to mode node without a restart (sidelane explain)", p.pod.Name)
		np, err := r.cs.CoreV1().Pods(ns).Get(ctx, p.pod.Name, metav1.GetOptions{})
		r.check(err == nil && np.UID == p.pod.UID && len(np.Status.ContainerStatuses) == len(p.pod.Status.ContainerStatuses),
			"same pod UID %s, not restarted", p.pod.UID)
	}
	ex, _, err := r.explain(r.client.node, ns, r.client.pod.Name)
	if err == nil && len(ex.Attachments) == 1 {
		r.check(ex.Attachments[0].Mode == "sidecar", "frontend keeps its sidecar (Istio: a pod with a sidecar is not captured by ambient): %s", ex.Attachments[0].Reason)
	}

	// A node proxy on each node: haproxy as the Envoy stand-in.
	proxyA, err := r.newNodeProxy(reports.node)
	if err != nil {
		return err
	}
	proxyB, err := r.newNodeProxy(ledger.node)
	if err != nil {
		return err
	}
	if err := proxyA.start(reports); err != nil {
		return err
	}
	if err := proxyB.start(ledger); err != nil {
		return err
	}
	r.say("  node proxies (haproxy as Envoy, `server orig 0.0.0.0`): %s:15001 on %s, %s:15001 on %s, inbound :15006 inside each per-node pod",
		gateway(reports.node), reports.node.Name, gateway(ledger.node), ledger.node.Name)
	addr := ledger.pod.Status.PodIP + ":8080"
	through := func(msg string) {
		outA, inB := proxyA.sessions("outbound"), proxyB.sessions("inbound_"+ledger.pod.Name)
		peer, got, err := sendPeer(ctx, reports, addr, msg)
		if err != nil {
			r.check(false, "reports -> ledger %s: %v", addr, firstLine(err))
			return
		}
		if !r.check(got == msg, "reports -> ledger %s: sent %q, echoed %q", addr, msg, got) {
			return
		}
		outA2, inB2 := proxyA.sessions("outbound"), proxyB.sessions("inbound_"+ledger.pod.Name)
		r.check(outA2 > outA, "%s's node proxy outbound sessions %d -> %d (haproxy stats)", reports.node.Name, outA, outA2)
		r.check(inB2 > inB, "%s's node proxy inbound_%s sessions %d -> %d (haproxy stats)", ledger.node.Name, ledger.pod.Name, inB, inB2)
		r.check(peer == gateway(ledger.node).String(), "ledger's app saw the connection from %s (its node proxy, want %s)", peer, gateway(ledger.node))
	}
	through("invoice 1")

	r.say("  node proxy on %s stopped", reports.node.Name)
	proxyA.stop()
	_, _, err = sendPeer(ctx, reports, addr, "proxy down")
	r.check(err != nil && strings.Contains(err.Error(), "Connection refused"),
		"reports -> ledger fails closed while its node proxy is down (connection refused, never around the mesh): %v", firstLine(err))
	logPath := filepath.Join(filepath.Dir(reports.node.StateDir), "agent.log")
	err = r.eventually(ctx, func() bool {
		b, _ := os.ReadFile(logPath)
		return strings.Contains(string(b), "node proxy down or unreachable")
	})
	r.check(err == nil, "the agent on %s logged \"node proxy down or unreachable\"", reports.node.Name)

	r.say("  node proxy on %s started again (no agent action)", reports.node.Name)
	if err := proxyA.start(reports); err != nil {
		return err
	}
	through("invoice 2")
	return nil
}

func firstLine(err error) string {
	if err == nil {
		return "no error"
	}
	l, _, _ := strings.Cut(err.Error(), "\n")
	return l
}
