package demo

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	sigsyaml "sigs.k8s.io/yaml"

	"github.com/sidelane/sidelane/agent/xds"
	"github.com/sidelane/sidelane/internal/kubelet"
	"github.com/sidelane/sidelane/internal/podnet"
	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/compile"
	"github.com/sidelane/sidelane/policy/envoyfilter"
)

// pods of the story, set by stepSidecar.
type podRef struct {
	node   *kubelet.Node
	pod    *corev1.Pod
	stats  string // haproxy stats socket ("" without a sidecar)
	netns  string
	cgroup string
}

var errNoPod = errors.New("pod not running")

func (r *run) createRunning(ctx context.Context, p *corev1.Pod, n *kubelet.Node) (*podRef, error) {
	p.Spec.NodeName = n.Name
	if _, err := r.cs.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("create pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	var got *corev1.Pod
	err := r.eventually(ctx, func() bool {
		var err error
		got, err = r.cs.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		return err == nil && got.Status.Phase == corev1.PodRunning && got.Status.PodIP != ""
	})
	if err != nil {
		return nil, fmt.Errorf("pod %s/%s: %w: %w", p.Namespace, p.Name, errNoPod, err)
	}
	ref := &podRef{node: n, pod: got}
	ref.netns, _ = n.PodNetns(string(got.UID))
	ref.cgroup, _ = n.PodCgroup(string(got.UID))
	r.fp.Netns = append(r.fp.Netns, ref.netns)
	return ref, nil
}

// send runs a client inside the pod's netns AND cgroup (so the pod's eBPF
// capture applies to it, as to any app process) and returns the echo.
func send(ctx context.Context, from *podRef, addr, line string) (string, error) {
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", from.netns, "socat", "-T5", "-", "TCP:"+addr)
	cmd.Stdin = strings.NewReader(line + "\n")
	closeCg, err := podnet.InCgroup(cmd, from.cgroup)
	if err != nil {
		return "", err
	}
	defer closeCg()
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("echo from %s to %s: %w: %s", from.pod.Name, addr, err, out)
	}
	// The echo app first says who it sees as the peer (kubelet.EchoCommand).
	_, echoed, _ := strings.Cut(string(out), "\n")
	return strings.TrimSpace(echoed), nil
}

func (r *run) waitListening(ctx context.Context, p *podRef, ports ...string) error {
	return r.eventually(ctx, func() bool {
		ss, _ := exec.Command("ip", "netns", "exec", p.netns, "ss", "-Hltn").Output()
		for _, port := range ports {
			if !strings.Contains(string(ss), ":"+port+" ") {
				return false
			}
		}
		return true
	})
}

func (r *run) stepSidecar(ctx context.Context) error {
	ns := podnet.UniqueName("shop-")
	r.scNS = ns
	r.say("  namespace %s labelled istio-injection=enabled; pods are real `istioctl kube-inject` output", ns)
	r.say("  (sidecar.istio.io/status annotation), with haproxy as the Envoy stand-in: uid 1337, `server orig 0.0.0.0`,")
	r.say("  outbound :15001, inbound :15006")
	if _, err := r.cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{
		Name: ns, Labels: map[string]string{"istio-injection": "enabled"}}}, metav1.CreateOptions{}); err != nil {
		return err
	}
	mk := func(name string, n *kubelet.Node) (*podRef, error) {
		p, err := r.fixture("sidecar-classic", ns, name)
		if err != nil {
			return nil, err
		}
		if p.Labels == nil {
			p.Labels = map[string]string{}
		}
		p.Labels["role"] = name // the L7 policy of step 3 selects by it
		standIn, err := kubelet.WithStandIns(p, r.fp.WorkDir)
		if err != nil {
			return nil, err
		}
		ref, err := r.createRunning(ctx, p, n)
		if err != nil {
			return nil, err
		}
		ref.stats = standIn.Stats
		if err := r.waitListening(ctx, ref, "15001", "15006", "8080"); err != nil {
			return nil, fmt.Errorf("%s: sidecar and app not listening: %w", name, err)
		}
		return ref, nil
	}
	client, err := mk("frontend", r.nodes[0])
	if err != nil {
		return err
	}
	server, err := mk("backend", r.nodes[1])
	if err != nil {
		return err
	}
	r.client, r.server = client, server
	_, hasStatus := client.pod.Annotations["sidecar.istio.io/status"]
	r.check(hasStatus, "pods %s (%s, %s) and %s (%s, %s) running with the injected-sidecar marker",
		client.pod.Name, client.node.Name, client.pod.Status.PodIP, server.pod.Name, server.node.Name, server.pod.Status.PodIP)

	for _, p := range []*podRef{client, server} {
		r.check(p.pod.Name != "" && r.mode(p.node, ns, p.pod.Name) == "sidecar", "%s is in mode sidecar (sidelane explain)", p.pod.Name)
		out, err := exec.Command("ip", "netns", "exec", p.netns, "iptables-save").CombinedOutput()
		rules := 0
		for _, l := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(l, "-A ") {
				rules++
			}
		}
		r.check(err == nil && rules == 0, "`ip netns exec %s iptables-save` in %s's netns: %d rules", p.netns, p.pod.Name, rules)
	}

	ex0, _, err := r.explain(client.node, ns, client.pod.Name)
	if err != nil {
		return err
	}
	before, err := podnet.FrontendSessions(client.stats)
	if err != nil {
		return err
	}
	beforeIn, err := podnet.FrontendSessions(server.stats)
	if err != nil {
		return err
	}
	addr := server.pod.Status.PodIP + ":8080"
	const n = 3
	for i := range n {
		msg := fmt.Sprintf("order %d", i)
		got, err := send(ctx, client, addr, msg)
		if err != nil {
			return err
		}
		if !r.check(got == msg, "frontend app -> %s: sent %q, echoed %q", addr, msg, got) {
			break
		}
	}
	after, err := podnet.FrontendSessions(client.stats)
	if err != nil {
		return err
	}
	afterIn, err := podnet.FrontendSessions(server.stats)
	if err != nil {
		return err
	}
	r.check(after["outbound"]-before["outbound"] >= n, "frontend's sidecar outbound (:15001) sessions %d -> %d (haproxy stats)", before["outbound"], after["outbound"])
	r.check(afterIn["inbound"]-beforeIn["inbound"] >= n, "backend's sidecar inbound (:15006) sessions %d -> %d (haproxy stats)", beforeIn["inbound"], afterIn["inbound"])
	ex1, _, err := r.explain(client.node, ns, client.pod.Name)
	if err != nil {
		return err
	}
	var moved []string
	if len(ex0.Attachments) == 1 && len(ex1.Attachments) == 1 {
		for k, v := range ex1.Attachments[0].Counters {
			if v > ex0.Attachments[0].Counters[k] {
				moved = append(moved, fmt.Sprintf("%s %d->%d", k, ex0.Attachments[0].Counters[k], v))
			}
		}
	}
	r.check(len(moved) > 0, "sidelane explain counters for frontend moved: %s", strings.Join(moved, ", "))
	r.say("  (the same-node socket shortcut is off by default and these pods are on different nodes, so its counters stay 0)")
	return nil
}

func (r *run) stepAmbient(ctx context.Context) error {
	ns := r.scNS
	if r.client == nil {
		return errors.New("step 1 did not bring up its pods")
	}
	p, err := r.fixture("plain", ns, "reports")
	if err != nil {
		return err
	}
	// An un-injected pod of the same namespace (injection opted out).
	p.Annotations = map[string]string{"sidecar.istio.io/inject": "false"}
	if _, err := kubelet.WithStandIns(p, r.fp.WorkDir); err != nil {
		return err
	}
	plain, err := r.createRunning(ctx, p, r.nodes[0])
	if err != nil {
		return err
	}
	r.say("  pod %s (no sidecar, inject=false) starts in mode %s", plain.pod.Name, r.mode(plain.node, ns, plain.pod.Name))
	r.say("  kubectl label ns %s istio.io/dataplane-mode=ambient   (live, no pod restarts)", ns)
	if err := r.patchNamespace(ctx, ns, `{"istio.io/dataplane-mode":"ambient"}`); err != nil {
		return err
	}
	err = r.eventually(ctx, func() bool { return r.mode(plain.node, ns, plain.pod.Name) == "node" })
	r.check(err == nil, "%s moved to mode node without a restart (sidelane explain)", plain.pod.Name)
	np, err := r.cs.CoreV1().Pods(ns).Get(ctx, plain.pod.Name, metav1.GetOptions{})
	r.check(err == nil && np.UID == plain.pod.UID && len(np.Status.ContainerStatuses) == len(plain.pod.Status.ContainerStatuses),
		"same pod UID %s, not restarted", plain.pod.UID)
	ex, _, err := r.explain(r.client.node, ns, r.client.pod.Name)
	if err == nil && len(ex.Attachments) == 1 {
		r.check(ex.Attachments[0].Mode == "sidecar", "frontend keeps its sidecar (Istio: a pod with a sidecar is not captured by ambient): %s", ex.Attachments[0].Reason)
	}
	// No node proxy runs in the demo, so a per-node pod's connect must
	// fail closed (EPERM), never leave the pod uncaptured.
	_, err = send(ctx, plain, r.server.pod.Status.PodIP+":8080", "after the switch")
	r.check(err != nil && strings.Contains(err.Error(), "Operation not permitted"),
		"reports -> backend now fails closed with EPERM: node mode without a node proxy never bypasses the mesh")
	r.say("  skip: the demo runs no node proxy; `go test ./test/e2e -run TestPerNode` runs haproxy node proxies on both nodes")
	r.say("  (per-node traffic matrix, proxy down, live toggles; README \"Per-node (sidecar-free) mode\")")
	return nil
}

// samplePolicy lets GET /healthz through to the backend's port 8080 and
// denies everything else there.
const samplePolicy = `apiVersion: sidelane.io/v1alpha1
kind: L7Policy
metadata: {name: backend-health-only, namespace: %s}
spec:
  podSelector: {matchLabels: {role: %s}}
  ports:
    - port: 8080
      rules: [{http: [{method: GET, path: /healthz}]}]
`

func (r *run) stepPolicy(ctx context.Context) error {
	if r.server == nil {
		return errors.New("step 1 did not bring up its pods")
	}
	role := r.server.pod.Labels["role"]
	src := fmt.Sprintf(samplePolicy, r.scNS, role)
	r.say("  sample L7Policy:")
	for _, l := range strings.Split(strings.TrimRight(src, "\n"), "\n") {
		r.say("    %s", l)
	}
	var pol v1alpha1.L7Policy
	if err := sigsyaml.UnmarshalStrict([]byte(src), &pol); err != nil {
		return fmt.Errorf("sample policy: %w", err)
	}
	// The inventory is the real pods of the demo namespace.
	list, err := r.cs.CoreV1().Pods(r.scNS).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	var pods []compile.Pod
	for _, p := range list.Items {
		cp := compile.Pod{Namespace: p.Namespace, Name: p.Name, Labels: p.Labels, ServiceAccount: p.Spec.ServiceAccountName}
		if ip, err := netip.ParseAddr(p.Status.PodIP); err == nil {
			cp.IPs = []netip.Addr{ip}
		}
		pods = append(pods, cp)
	}
	policies := []v1alpha1.L7Policy{pol}
	res, err := compile.Compile(policies, compile.Inventory{Pods: pods}, compile.Options{Identity: compile.IdentityPeerCertificate, TrustDomain: "cluster.local"})
	if err != nil {
		return fmt.Errorf("compile: %w", err)
	}
	objs, gerrs := envoyfilter.Build(res, pods, policies)
	if !r.check(len(objs) == 1 && len(gerrs) == 0, "compiled into %d EnvoyFilter(s) for the sidecars (%d group errors)", len(objs), len(gerrs)) {
		return nil
	}
	b, err := sigsyaml.Marshal(objs[0].Object)
	if err != nil {
		return err
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	const maxLines = 60
	if len(lines) > maxLines {
		r.say("  generated EnvoyFilter (first %d of %d lines):", maxLines, len(lines))
	} else {
		r.say("  generated EnvoyFilter:")
	}
	for _, l := range lines[:min(maxLines, len(lines))] {
		r.say("    %s", l)
	}
	r.check(strings.Contains(string(b), "role: "+role) && strings.Contains(string(b), "/healthz"),
		"its workloadSelector picks role=%s and its RBAC allows /healthz", role)

	// The per-node Envoy's xDS snapshot for the same policy (source-IP
	// identities: the agent knows every pod's address).
	resIP, err := compile.Compile(policies, compile.Inventory{Pods: pods}, compile.Options{Identity: compile.IdentitySourceIP, TrustDomain: "cluster.local"})
	if err != nil {
		return fmt.Errorf("compile for xDS: %w", err)
	}
	dests := xds.Destinations(resIP)
	rs, err := xds.Build(dests, xds.Config{InboundPort: 15006})
	if err != nil {
		return fmt.Errorf("xds snapshot: %w", err)
	}
	var summary []string
	total := 0
	for typ, list := range rs {
		summary = append(summary, fmt.Sprintf("%s=%d", typ[strings.LastIndex(typ, ".")+1:], len(list)))
		total += len(list)
	}
	slices.Sort(summary)
	var where []string
	for _, d := range dests {
		where = append(where, d.Addr.String())
	}
	r.check(len(dests) == 1 && total > 0, "xDS snapshot for the node Envoy: %s; protected destinations %s", strings.Join(summary, " "), strings.Join(where, ","))
	r.say("  skip: allow/deny over a real grpc-go xDS client/server pair is not run here; `go test ./agent/xds -run GRPC` does it")
	return nil
}

func (r *run) stepBench(ctx context.Context) error {
	path := filepath.Join(r.opts.Repo, "bench", "out", "results.md")
	if r.opts.Bench {
		// A fresh quick run into the demo's work dir (removed on exit).
		out := filepath.Join(r.fp.WorkDir, "bench")
		cmd := exec.CommandContext(ctx, filepath.Join(r.opts.Bin, "sidelane-bench"), "run", "-quick",
			"-out", out, "-bin", r.opts.Bin, "-tools", r.opts.Tools)
		logf, err := os.Create(filepath.Join(r.fp.WorkDir, "bench.log"))
		if err != nil {
			return err
		}
		defer logf.Close()
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		done := r.progress("sidelane-bench run -quick (under 3 min)")
		err = cmd.Run()
		done()
		if err != nil {
			return fmt.Errorf("sidelane-bench: %w (log %s)", err, logf.Name())
		}
		path = filepath.Join(out, "results.md")
	}
	b, err := os.ReadFile(path)
	if err != nil {
		r.say("  skip: %s does not exist; run `make demo BENCH=1` (adds a quick benchmark run, under 3 min) or `make bench QUICK=1` first", path)
		return nil
	}
	r.say("  from %s:", path)
	lines := strings.Split(string(b), "\n")
	in := false
	shown := 0
	for _, l := range lines {
		if strings.HasPrefix(l, "#") {
			in = strings.Contains(strings.ToLower(l), "ratio")
			continue
		}
		if in && strings.HasPrefix(l, "|") {
			r.say("  %s", l)
			shown++
		}
	}
	if shown == 0 {
		r.say("  skip: %s has no ratios table", path)
	}
	return nil
}

func (r *run) stepExplain(context.Context) error {
	if r.client == nil {
		return errors.New("no pod to explain")
	}
	r.say("  sidelane explain %s/%s --socket %s", r.scNS, r.client.pod.Name, r.client.node.AgentSocket)
	ex, text, err := r.explain(r.client.node, r.scNS, r.client.pod.Name)
	if err != nil {
		return err
	}
	for _, l := range strings.Split(strings.TrimRight(text, "\n"), "\n") {
		r.say("    %s", l)
	}
	r.check(len(ex.Attachments) == 1 && ex.Attachments[0].Mode == "sidecar", "explain reports the frontend as a sidecar pod")
	return nil
}
