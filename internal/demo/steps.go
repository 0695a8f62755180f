package demo

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sidelane/sidelane/internal/kubelet"
	"github.com/sidelane/sidelane/internal/podnet"
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
	_, echoed, err := sendPeer(ctx, from, addr, line)
	return echoed, err
}

// sendPeer is send that also returns the peer the destination app saw.
func sendPeer(ctx context.Context, from *podRef, addr, line string) (peer, echoed string, err error) {
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", from.netns, "socat", "-T5", "-", "TCP:"+addr)
	cmd.Stdin = strings.NewReader(line + "\n")
	closeCg, err := podnet.InCgroup(cmd, from.cgroup)
	if err != nil {
		return "", "", err
	}
	defer closeCg()
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", "", fmt.Errorf("echo from %s to %s: %w: %s", from.pod.Name, addr, err, strings.TrimSpace(string(out)))
	}
	// The echo app first says who it sees as the peer (kubelet.EchoCommand).
	first, echoed, _ := strings.Cut(string(out), "\n")
	peer, _, _ = strings.Cut(strings.TrimPrefix(first, "peer="), ":")
	return peer, strings.TrimSpace(echoed), nil
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
