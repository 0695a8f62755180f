package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"google.golang.org/protobuf/proto"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/sidelane/sidelane/agent/xds"
	"github.com/sidelane/sidelane/internal/kubelet"
	"github.com/sidelane/sidelane/internal/podnet"
	"github.com/sidelane/sidelane/internal/testenv"
)

// gateway is a node's bridge gateway: the node proxy's address.
func gateway(n *kubelet.Node) netip.Addr { return n.Subnet.Addr().Next() }

// nodeProxy is the per-node proxy of one simulated node: haproxy standing
// in for Envoy in the node's own netns (its "host" netns) and in a cgroup
// below the agents' attach point, so sidelane's getsockopt hook answers
// its SO_ORIGINAL_DST (`server orig 0.0.0.0`). Outbound listener
// gateway:15001; one inbound listener on 15006 inside each per-node pod's
// netns, created here and handed over as fd@N (Envoy opens them itself from
// network_namespace_filepath); upstream connections from the gateway.
type nodeProxy struct {
	e      *env
	node   *kubelet.Node
	cgroup string
	out    *podnet.Buffer // every run's log, in order
	proc   *podnet.NodeProxyProc
}

func (e *env) newNodeProxy(n *kubelet.Node) *nodeProxy {
	e.t.Helper()
	cg := filepath.Join(e.cgroup, "nodeproxy-"+n.Name)
	if err := os.Mkdir(cg, 0o755); err != nil {
		e.t.Fatal(err)
	}
	np := &nodeProxy{e: e, node: n, cgroup: cg, out: &podnet.Buffer{}}
	e.t.Cleanup(np.stop)
	return np
}

// start runs the proxy with inbound listeners in the given per-node pods.
func (np *nodeProxy) start(perNode ...*podRef) {
	t := np.e.t
	t.Helper()
	np.stop()
	var files []*os.File
	var names []string
	for _, p := range perNode {
		f, err := podnet.ListenIn("/var/run/netns/"+p.netns, 15006)
		if err != nil {
			t.Fatalf("inbound listener of %s: %v", p, err)
		}
		files = append(files, f)
		names = append(names, p.pod.Name)
	}
	proc, err := podnet.StartNodeProxy(np.node.Netns, np.cgroup, filepath.Join(np.e.dir, np.node.Name+"-node-proxy.cfg"),
		podnet.NodeProxy{Addr: gateway(np.node).String(), OutPort: 15001, Inbound: names, LogConnections: true}, files, np.out)
	// Only haproxy holds the inbound listeners now: when it dies they go.
	for _, f := range files {
		f.Close()
	}
	if err != nil {
		t.Fatalf("node proxy on %s: %v\n%s", np.node.Name, err, np.out.String())
	}
	np.proc = proc
}

func (np *nodeProxy) stop() {
	if np.proc != nil {
		np.proc.Stop()
		np.proc = nil
	}
}

// sighting is one connection a proxy logged, written as
// "<proxy>/<frontend> <client> -> <original dst>".
type proxyLogs struct {
	nodes    []*nodeProxy
	sidecars []*podRef
}

func (l proxyLogs) read(t *testing.T) []string {
	var out []string
	add := func(who, log string) {
		for _, c := range podnet.ParseConnLog(log) {
			fe := c.Frontend
			if strings.HasPrefix(fe, "inbound_") {
				fe = "inbound"
			}
			out = append(out, fmt.Sprintf("%s/%s %s -> %s", who, fe, c.Client, c.OrigDst))
		}
	}
	for _, np := range l.nodes {
		add("node-proxy:"+np.node.Name, np.out.String())
	}
	for _, p := range l.sidecars {
		b, err := os.ReadFile(p.node.ContainerLog(p.pod.Namespace, p.pod.Name, "istio-proxy"))
		if err != nil {
			t.Fatal(err)
		}
		add("sidecar:"+p.pod.Name, string(b))
	}
	return out
}

// since waits until at least n sightings follow mark (haproxy logs a
// connection when it ends, just after the client saw its reply), then a
// little longer so an unexpected extra one (a double capture) shows too.
func (l proxyLogs) since(t *testing.T, mark []string, n int) []string {
	t.Helper()
	var now []string
	for i := 0; i < 60; i++ {
		now = l.read(t)
		if len(now)-len(mark) >= n {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	now = l.read(t)
	// Sightings are appended per proxy, so remove mark's as a multiset.
	rest := slices.Clone(now)
	for _, m := range mark {
		if i := slices.Index(rest, m); i >= 0 {
			rest = slices.Delete(rest, i, i+1)
		}
	}
	slices.Sort(rest)
	return rest
}

// cellWant is what one connection from src to dst must look like: the
// proxies that see it, in order, and the peer the destination app sees.
func cellWant(src, dst *podRef, mode map[*podRef]string) (sightings []string, peer string) {
	orig := dst.addr()
	last := src.pod.Status.PodIP // who the next hop sees as the client
	switch mode[src] {
	case "sidecar":
		// The connect hook points the app's socket at 127.0.0.1:15001
		// before the kernel picks a source, so the sidecar's downstream
		// peer is loopback; its upstream leaves from the pod IP.
		sightings = append(sightings, fmt.Sprintf("sidecar:%s/outbound 127.0.0.1 -> %s", src.pod.Name, orig))
	case "node":
		sightings = append(sightings, fmt.Sprintf("node-proxy:%s/outbound %s -> %s", src.node.Name, last, orig))
		last = gateway(src.node).String()
	}
	switch mode[dst] {
	case "sidecar":
		sightings = append(sightings, fmt.Sprintf("sidecar:%s/inbound %s -> %s", dst.pod.Name, last, orig))
		peer = "127.0.0.6"
	case "node":
		if mode[src] == "node" && src.node == dst.node {
			// Already through this node's proxy: not captured twice.
			peer = last
			break
		}
		sightings = append(sightings, fmt.Sprintf("node-proxy:%s/inbound %s -> %s", dst.node.Name, last, orig))
		peer = gateway(dst.node).String()
	default:
		peer = last
	}
	slices.Sort(sightings)
	return sightings, peer
}

func TestPerNode(t *testing.T) {
	e := newEnv(t, cluster)
	if !e.capturing() {
		t.Skip("per-node mode needs the eBPF datapath (" + DatapathEnv + "=noop set)")
	}
	testenv.RequireTool(t, "haproxy")
	ctx := context.Background()
	nodeA, nodeB := e.nodes[0], e.nodes[1]
	// The L7Policy CRD, so the agents' xDS feed reads policies.
	out, err := exec.Command(e.cluster.Kubectl, "--kubeconfig", e.cluster.Kubeconfig, "apply", "--server-side", "-f", "../../charts/sidelane/crds/sidelane.io_l7policies.yaml").CombinedOutput()
	if err != nil {
		t.Fatalf("install the L7Policy CRD: %v\n%s", err, out)
	}
	if out, err := exec.Command(e.cluster.Kubectl, "--kubeconfig", e.cluster.Kubeconfig, "wait", "--for=condition=Established", "--timeout=60s", "crd/l7policies.sidelane.io").CombinedOutput(); err != nil {
		t.Fatalf("L7Policy CRD not established: %v\n%s", err, out)
	}
	xdsSocket := func(n *kubelet.Node) string { return filepath.Join(filepath.Dir(n.StateDir), "xds.sock") }
	e.agentArgs = func(n *kubelet.Node) []string {
		return []string{"--node-proxy-address", gateway(n).String(), "--node-proxy-netns", "/var/run/netns/" + n.Netns,
			"--xds-socket", xdsSocket(n), "--xds-socket-gid", "-1"}
	}
	agentA := e.startAgent(nodeA)
	e.startAgent(nodeB)
	start := map[string]bpfState{}
	for _, n := range e.nodes {
		start[n.Name] = readBPFState(t, e.pinDirs[n.Name])
	}

	plainNS, scNS, ambNS, moveNS := testenv.UniqueName("plain-"), testenv.UniqueName("sc-"), testenv.UniqueName("amb-"), testenv.UniqueName("move-")
	e.namespace(plainNS, nil)
	e.namespace(scNS, map[string]string{"istio-injection": "enabled"})
	e.namespace(ambNS, map[string]string{"istio.io/dataplane-mode": "ambient"})
	e.namespace(moveNS, nil)

	mode := map[*podRef]string{}
	// "<mode>-a" are the sources, "<mode>-a2" their same-node and
	// "<mode>-b" their cross-node destinations.
	pods := map[string]*podRef{}
	for _, n := range []struct {
		node *kubelet.Node
		sfx  string
	}{{nodeA, "a"}, {nodeA, "a2"}, {nodeB, "b"}} {
		for _, m := range []struct{ mode, ns, fixture string }{
			{"plain", plainNS, "plain"}, {"sidecar", scNS, "sidecar-classic"}, {"node", ambNS, "plain"},
		} {
			p := e.run(fixture(t, m.fixture, m.ns, m.mode+"-"+n.sfx), n.node)
			pods[m.mode+"-"+n.sfx] = p
			mode[p] = m.mode
			if got := e.mode(n.node, m.ns, p.pod.Name); got != map[string]string{"plain": "none", "sidecar": "sidecar", "node": "node"}[m.mode] {
				t.Fatalf("%s: mode %q", p, got)
			}
		}
	}
	mover := e.run(fixture(t, "plain", moveNS, "mover"), nodeA)
	mode[mover] = "plain"

	xdsA := watchListeners(t, xdsSocket(nodeA), nodeA.Name)
	inPod := func(p *podRef) string { return "sidelane_inbound/" + p.pod.Namespace + "/" + p.pod.Name }

	t.Run("agent serves the node proxy's xDS", func(t *testing.T) {
		e.eventually("node A's listeners over xDS", func() bool {
			return xdsA.get("sidelane_outbound") != nil && xdsA.get(inPod(pods["node-a"])) != nil && xdsA.get(inPod(pods["node-a2"])) != nil
		})
		if got := len(xdsA.names()); got != 3 {
			t.Errorf("node A listeners %v, want the outbound one and one per per-node pod", xdsA.names())
		}
		out := xdsA.get("sidelane_outbound").GetAddress().GetSocketAddress()
		if out.GetAddress() != gateway(nodeA).String() || out.GetPortValue() != 15001 {
			t.Errorf("outbound listener on %s:%d, want %s:15001", out.GetAddress(), out.GetPortValue(), gateway(nodeA))
		}
		in := xdsA.get(inPod(pods["node-a"])).GetAddress().GetSocketAddress()
		if in.GetNetworkNamespaceFilepath() != "/var/run/netns/"+pods["node-a"].netns || in.GetPortValue() != 15006 {
			t.Errorf("inbound listener of node-a: netns %q port %d, want /var/run/netns/%s and 15006", in.GetNetworkNamespaceFilepath(), in.GetPortValue(), pods["node-a"].netns)
		}
		// An L7 policy for node-a2's port 8080 becomes an RBAC filter chain
		// in node-a2's inbound listener only.
		policy := fmt.Sprintf(`apiVersion: sidelane.io/v1alpha1
kind: L7Policy
metadata: {name: health-only, namespace: %s}
spec:
  podSelector: {matchLabels: {app: web}}
  ports:
    - port: 8080
      rules: [{http: [{method: GET, path: /healthz}]}]
`, ambNS)
		cmd := exec.Command(e.cluster.Kubectl, "--kubeconfig", e.cluster.Kubeconfig, "apply", "-f", "-")
		cmd.Stdin = strings.NewReader(policy)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("kubectl apply L7Policy: %v\n%s", err, out)
		}
		chain := pods["node-a2"].pod.Status.PodIP + ":8080"
		e.eventually("RBAC chain for node-a2 over xDS", func() bool {
			return slices.ContainsFunc(xdsA.get(inPod(pods["node-a2"])).GetFilterChains(), func(c *listenerv3.FilterChain) bool { return c.GetName() == chain })
		})
		b, err := proto.Marshal(xdsA.get(inPod(pods["node-a2"])))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(b), "envoy.extensions.filters.http.rbac.v3.RBAC") || !strings.Contains(string(b), "/healthz") {
			t.Errorf("node-a2's chain lacks the RBAC filter for GET /healthz: %s", b)
		}
		// sidelane explain names the policy from the same compilation.
		e.eventually("explain lists the policy", func() bool {
			ex, _ := e.explain(nodeA, ambNS, "node-a2")
			return ex.L7 != nil && slices.Equal(ex.L7.Policies, []string{"health-only"}) && slices.Equal(ex.L7.Ports, []int32{8080})
		})
		if ex, text := e.explain(nodeA, plainNS, "plain-a"); ex.L7 == nil || len(ex.L7.Policies) != 0 || !strings.Contains(text, "none selects this pod") {
			t.Errorf("explain for an unselected pod: %+v\n%s", ex.L7, text)
		}
		if n := len(policyChains(xdsA.get(inPod(pods["node-a"])))); n != 1 {
			// node-a (same labels) is protected too: its own chain, never node-a2's.
			t.Errorf("node-a's inbound listener has %d policy chains, want its own one", n)
		}
		// The node proxy's upstream leg to a same-node per-node pod is not
		// captured again (it leaves from the trusted node-proxy address), so
		// the outbound listener carries that pod's policy too: a per-node
		// pod on node A reaching node-a2 is checked where it is still the
		// real client (issue 20, finding 1).
		if !slices.ContainsFunc(xdsA.get("sidelane_outbound").GetFilterChains(), func(c *listenerv3.FilterChain) bool { return c.GetName() == chain }) {
			t.Errorf("node A's outbound listener lacks node-a2's policy chain %s: same-node per-node traffic would skip its policy", chain)
		}
	})

	proxyA, proxyB := e.newNodeProxy(nodeA), e.newNodeProxy(nodeB)
	proxyA.start(pods["node-a"], pods["node-a2"])
	proxyB.start(pods["node-b"])
	logs := proxyLogs{nodes: []*nodeProxy{proxyA, proxyB}, sidecars: []*podRef{pods["sidecar-a"], pods["sidecar-a2"], pods["sidecar-b"]}}

	// check sends one connection from src to dst and compares what every
	// proxy logged, and the peer the destination app saw, with cellWant.
	check := func(t *testing.T, src, dst *podRef) {
		t.Helper()
		want, wantPeer := cellWant(src, dst, mode)
		mark := logs.read(t)
		r := mustEcho(t, src, dst.addr(), "from "+src.pod.Name)
		got := logs.since(t, mark, len(want))
		t.Logf("%s (%s) -> %s (%s): proxies %q, app saw peer %s", src, mode[src], dst, mode[dst], got, r.peer)
		if !slices.Equal(got, want) {
			t.Errorf("%s (%s) -> %s (%s): proxies saw\n  %s\nwant\n  %s", src, mode[src], dst, mode[dst],
				strings.Join(got, "\n  "), strings.Join(want, "\n  "))
		}
		if r.peer != wantPeer {
			t.Errorf("%s -> %s: destination app saw peer %s, want %s", src, dst, r.peer, wantPeer)
		}
	}

	t.Run("matrix", func(t *testing.T) {
		for _, sm := range []string{"plain", "sidecar", "node"} {
			for _, dm := range []string{"plain", "sidecar", "node"} {
				for _, where := range []string{"same-node", "cross-node"} {
					src, dst := pods[sm+"-a"], pods[dm+"-a2"]
					if where == "cross-node" {
						dst = pods[dm+"-b"]
					}
					t.Run(fmt.Sprintf("%s to %s %s", sm, dm, where), func(t *testing.T) { check(t, src, dst) })
				}
			}
		}
	})

	t.Run("plain pod on another node cannot bypass the destination node proxy", func(t *testing.T) {
		// Any port of the per-node pod, not only the one a policy names.
		check(t, pods["plain-b"], pods["node-a"])
		proxyA.stop()
		if _, err := send(t, pods["plain-b"], pods["node-a"].addr(), "proxy down"); err == nil {
			t.Fatal("plain pod on node B reached the per-node pod on node A while A's node proxy was down")
		}
		proxyA.start(pods["node-a"], pods["node-a2"])
		check(t, pods["plain-b"], pods["node-a"])
	})

	t.Run("host netns and the node proxy are never captured", func(t *testing.T) {
		// A hostNetwork process (a kubelet probe) below the attach point:
		// the node's netns is never enrolled, and it connects from the
		// gateway, which inbound capture trusts like the proxy.
		host := &podRef{node: nodeA, pod: pods["node-a"].pod.DeepCopy(), netns: nodeA.Netns, cgroup: proxyA.cgroup}
		host.pod.Name, host.pod.Status.PodIP = "host", gateway(nodeA).String()
		for _, dst := range []*podRef{pods["node-a"], pods["plain-a"]} {
			mark := logs.read(t)
			r := mustEcho(t, host, dst.addr(), "probe")
			if got := logs.since(t, mark, 0); len(got) != 0 || r.peer != gateway(nodeA).String() {
				t.Errorf("host -> %s: proxies saw %v, app saw %s; want no proxy and the gateway", dst, got, r.peer)
			}
		}
	})

	t.Run("node proxy down fails closed", func(t *testing.T) {
		before := nodeProxyRefused(t, agentA)
		proxyA.stop()
		_, err := send(t, pods["node-a"], pods["plain-b"].addr(), "proxy down")
		if err == nil || !strings.Contains(err.Error(), "Connection refused") {
			t.Fatalf("per-node pod's connection with the node proxy down: %v, want refused", err)
		}
		e.eventually("refusal counted in sidelane_node_proxy_connects_total", func() bool { return nodeProxyRefused(t, agentA) > before })
		e.eventually("refusal logged by the agent", func() bool {
			return fileContains(filepath.Join(filepath.Dir(nodeA.StateDir), "agent.log"), "node proxy down or unreachable")
		})
		proxyA.start(pods["node-a"], pods["node-a2"])
		// No agent action: the next connection works.
		check(t, pods["node-a"], pods["plain-b"])
	})

	t.Run("live toggle none to node and back", func(t *testing.T) {
		patch := func(labels string) {
			t.Helper()
			_, err := e.cs.CoreV1().Namespaces().Patch(ctx, moveNS, types.MergePatchType, []byte(`{"metadata":{"labels":`+labels+`}}`), metav1.PatchOptions{})
			if err != nil {
				t.Fatal(err)
			}
		}
		established := dial(t, mover, pods["sidecar-b"].addr())
		established.roundTrip("as a plain pod")
		check(t, mover, pods["sidecar-b"])

		patch(`{"istio.io/dataplane-mode":"ambient"}`)
		moved := time.Now()
		e.eventually("mover in node mode", func() bool { return e.mode(nodeA, moveNS, "mover") == "node" })
		t.Logf("mode node reported %v after the label change", time.Since(moved).Round(time.Millisecond))
		mode[mover] = "node"
		e.eventually("mover's inbound listener over xDS", func() bool { return xdsA.get(inPod(mover)) != nil })
		t.Logf("mover's inbound listener published %v after the label change", time.Since(moved).Round(time.Millisecond))
		// As a destination it needs its inbound listener in the node proxy
		// (Envoy gets it over xDS; the stand-in is restarted with it).
		proxyA.start(pods["node-a"], pods["node-a2"], mover)
		established.roundTrip("in node mode")
		check(t, mover, pods["sidecar-b"])
		check(t, mover, pods["node-b"])
		check(t, pods["plain-b"], mover)
		check(t, pods["node-a"], mover)

		patch(`{"istio.io/dataplane-mode":null}`)
		e.eventually("mover back to none", func() bool { return e.mode(nodeA, moveNS, "mover") == "none" })
		e.eventually("mover's inbound listener withdrawn over xDS", func() bool { return xdsA.get(inPod(mover)) == nil })
		mode[mover] = "plain"
		proxyA.start(pods["node-a"], pods["node-a2"])
		established.roundTrip("back to none")
		check(t, mover, pods["sidecar-b"])
		check(t, pods["plain-b"], mover)
	})

	t.Run("nothing left behind", func(t *testing.T) {
		proxyA.stop()
		proxyB.stop()
		for _, ns := range []string{plainNS, scNS, ambNS, moveNS} {
			if err := e.cs.CoreV1().Pods(ns).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		for _, n := range e.nodes {
			e.eventually("sandboxes gone on "+n.Name, func() bool { return n.Sandboxes() == 0 })
		}
		e.checkBPFBackTo(t, start)
	})
}

// nodeProxyRefused reads sidelane_node_proxy_connects_total{outcome="refused"}.
func nodeProxyRefused(t *testing.T, a *agentProc) int {
	for _, l := range strings.Split(a.metricsText(t), "\n") {
		if strings.HasPrefix(l, `sidelane_node_proxy_connects_total{outcome="refused"} `) {
			var n int
			fmt.Sscan(strings.Fields(l)[1], &n)
			return n
		}
	}
	return 0
}

// policyChains are a listener's per-destination chains, without the black
// hole for connections to the listener itself.
func policyChains(l *listenerv3.Listener) []*listenerv3.FilterChain {
	var out []*listenerv3.FilterChain
	for _, c := range l.GetFilterChains() {
		if c.GetName() != xds.BlackHoleChain {
			out = append(out, c)
		}
	}
	return out
}
