// Package kubelet is a small stand-in for the kubelet and container runtime
// on simulated nodes, for end-to-end tests, the demo and benchmarks. For each
// pod bound to one of its nodes (spec.nodeName) it does what kubelet +
// containerd do that matters to a CNI plugin: create the sandbox network
// namespace, run the real CNI chain through libcni (bridge + host-local +
// sidelane-cni), retry sandbox creation when the chain fails (with a
// FailedCreatePodSandBox event, as the kubelet does), start the pod's
// commands inside the namespace and a per-pod cgroup, and report podIP and
// phase Running. Deleting the pod tears everything down through CNI DEL.
//
// Each simulated node is its own network namespace holding the node's
// bridge, so node-level settings (ip_forward, bridges) never touch the
// machine's own namespace. The nodes are joined by a veth pair and routes:
// pod-to-pod traffic across nodes really crosses two bridges and a link.
package kubelet

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
)

// NetworkName is the CNI network name of the simulated nodes' conflist.
const NetworkName = "sidelane-e2e"

// NotReadyTaint is registered on every node, as an operator would with
// kubelet --register-with-taints; the sidelane agent removes it.
var NotReadyTaint = corev1.Taint{Key: "sidelane.io/agent-not-ready", Effect: corev1.TaintEffectNoSchedule}

// Options configure a set of simulated nodes.
type Options struct {
	Client kubernetes.Interface
	// CNIBinDirs hold bridge, host-local and sidelane-cni.
	CNIBinDirs []string
	// CgroupParent is the test's own cgroup v2 directory; pod cgroups are
	// created under it (never under the root cgroup).
	CgroupParent string
	// Dir holds per-node state: CNI cache, IPAM data, agent sockets.
	Dir string
	Log *slog.Logger
	// RetryInterval is the pause between sandbox creation attempts
	// (default 500ms).
	RetryInterval time.Duration
}

// Node is one simulated node.
type Node struct {
	Name string
	// Netns is the node's network namespace (name under /var/run/netns).
	Netns string
	// Subnet is the node's pod CIDR; LinkIP its address on the node link.
	Subnet netip.Prefix
	LinkIP netip.Addr
	// AgentSocket is where this node's sidelane-cni expects its agent.
	AgentSocket string
	// StateDir is a directory for this node's agent state.
	StateDir string
	// PluginLog is sidelane-cni's log file on this node.
	PluginLog string

	opts    Options
	bridge  string
	conf    *libcni.NetworkConfigList
	cni     *libcni.CNIConfig
	nodeNS  ns.NetNS
	log     *slog.Logger
	rec     record.EventRecorder
	bcast   record.EventBroadcaster
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	mu      sync.Mutex
	pods    map[string]*sandbox // by pod UID
	stopped bool
}

// sandbox is one pod's network namespace, processes and cgroup.
type sandbox struct {
	uid, namespace, name string
	containerID          string
	netns                string
	cgroup               string
	procs                []*exec.Cmd
	cancel               context.CancelFunc
	done                 chan struct{}
	closing              bool // teardown under way; the entry stays until it is done
}

func randHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// StartNodes brings up len(names) nodes joined by one link (at most two
// nodes; more would need a switch) and registers them in the API. Stop
// tears all of it down.
func StartNodes(ctx context.Context, opts Options, names ...string) (_ []*Node, err error) {
	if len(names) == 0 || len(names) > 2 {
		return nil, fmt.Errorf("want 1 or 2 nodes, got %d", len(names))
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if opts.RetryInterval <= 0 {
		opts.RetryInterval = 500 * time.Millisecond
	}
	// A random 10.X.0.0/16 per run keeps parallel runs apart.
	x := make([]byte, 1)
	_, _ = rand.Read(x)
	octet := 100 + int(x[0])%100
	tag := randHex(3)
	var nodes []*Node
	defer func() {
		if err != nil {
			for _, n := range nodes {
				n.Stop()
			}
		}
	}()
	for i, name := range names {
		n := &Node{
			Name:   name,
			Netns:  "sln" + tag + fmt.Sprint(i),
			Subnet: netip.MustParsePrefix(fmt.Sprintf("10.%d.%d.0/24", octet, i+1)),
			LinkIP: netip.MustParseAddr(fmt.Sprintf("10.%d.250.%d", octet, i+1)),
			bridge: "slb" + tag + fmt.Sprint(i),
			opts:   opts,
			log:    opts.Log.With("node", name),
			pods:   map[string]*sandbox{},
		}
		nodes = append(nodes, n)
		if err := n.setup(); err != nil {
			return nil, fmt.Errorf("node %s: %w", name, err)
		}
	}
	if len(nodes) == 2 {
		if err := link(nodes[0], nodes[1], tag); err != nil {
			return nil, err
		}
	}
	for _, n := range nodes {
		if err := n.register(ctx); err != nil {
			return nil, err
		}
		n.start()
	}
	return nodes, nil
}

func (n *Node) setup() error {
	dir := filepath.Join(n.opts.Dir, n.Name)
	n.StateDir = filepath.Join(dir, "agent")
	n.AgentSocket = filepath.Join(n.StateDir, "cni.sock")
	n.PluginLog = filepath.Join(dir, "sidelane-cni.log")
	if err := os.MkdirAll(n.StateDir, 0o700); err != nil {
		return err
	}
	if err := run("ip", "netns", "add", n.Netns); err != nil {
		return err
	}
	nodeNS, err := ns.GetNS("/var/run/netns/" + n.Netns)
	if err != nil {
		return err
	}
	n.nodeNS = nodeNS
	if err := run("ip", "-n", n.Netns, "link", "set", "lo", "up"); err != nil {
		return err
	}
	// Forwarding inside the node's own namespace only.
	if err := run("ip", "netns", "exec", n.Netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"); err != nil {
		return err
	}
	conf := map[string]any{
		"cniVersion": "1.0.0",
		"name":       NetworkName,
		"plugins": []any{
			map[string]any{
				"type": "bridge", "bridge": n.bridge, "isGateway": true, "ipMasq": false,
				"ipam": map[string]any{
					"type":    "host-local",
					"ranges":  [][]map[string]string{{{"subnet": n.Subnet.String()}}},
					"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
					"dataDir": filepath.Join(dir, "ipam"),
				},
			},
			map[string]any{
				"type": "sidelane-cni", "agentSocket": n.AgentSocket, "agentTimeout": "5s",
				"failPolicy": "closed", "logLevel": "debug", "logFile": n.PluginLog,
			},
		},
	}
	b, _ := json.Marshal(conf)
	n.conf, err = libcni.ConfListFromBytes(b)
	if err != nil {
		return fmt.Errorf("conflist: %w", err)
	}
	n.cni = libcni.NewCNIConfigWithCacheDir(n.opts.CNIBinDirs, filepath.Join(dir, "cni-cache"),
		&nodeExec{DefaultExec: &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}}, nodeNS: nodeNS})
	return nil
}

// link joins two nodes with a veth pair and routes each node's pod subnet
// via the other's link address.
func link(a, b *Node, tag string) error {
	va, vb := "slv"+tag+"a", "slv"+tag+"b"
	if err := run("ip", "link", "add", va, "netns", a.Netns, "type", "veth", "peer", "name", vb, "netns", b.Netns); err != nil {
		return err
	}
	for _, s := range []struct {
		n, peer *Node
		dev     string
	}{{a, b, va}, {b, a, vb}} {
		if err := run("ip", "-n", s.n.Netns, "addr", "add", s.n.LinkIP.String()+"/24", "dev", s.dev); err != nil {
			return err
		}
		if err := run("ip", "-n", s.n.Netns, "link", "set", s.dev, "up"); err != nil {
			return err
		}
		if err := run("ip", "-n", s.n.Netns, "route", "add", s.peer.Subnet.String(), "via", s.peer.LinkIP.String()); err != nil {
			return err
		}
	}
	return nil
}

// nodeExec runs CNI plugins inside the node's network namespace, where
// the node's bridge lives (the runtime runs them in the host's).
type nodeExec struct {
	*invoke.DefaultExec
	nodeNS ns.NetNS
}

func (e *nodeExec) ExecPlugin(ctx context.Context, pluginPath string, stdin []byte, environ []string) ([]byte, error) {
	var out []byte
	err := e.nodeNS.Do(func(ns.NetNS) error {
		var err error
		out, err = e.DefaultExec.ExecPlugin(ctx, pluginPath, stdin, environ)
		return err
	})
	return out, err
}

func (n *Node) register(ctx context.Context) error {
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: n.Name, Labels: map[string]string{"kubernetes.io/hostname": n.Name}},
		Spec:       corev1.NodeSpec{PodCIDR: n.Subnet.String(), PodCIDRs: []string{n.Subnet.String()}, Taints: []corev1.Taint{NotReadyTaint}},
	}
	if _, err := n.opts.Client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("register node %s: %w", n.Name, err)
	}
	return nil
}

func (n *Node) start() {
	ctx, cancel := context.WithCancel(context.Background())
	n.cancel = cancel
	n.bcast = record.NewBroadcaster()
	n.bcast.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: n.opts.Client.CoreV1().Events("")})
	n.rec = n.bcast.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "kubelet", Host: n.Name})
	f := informers.NewSharedInformerFactoryWithOptions(n.opts.Client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", n.Name).String()
	}))
	inf := f.Core().V1().Pods().Informer()
	_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { n.sync(ctx, obj.(*corev1.Pod)) },
		UpdateFunc: func(_, obj any) { n.sync(ctx, obj.(*corev1.Pod)) },
		DeleteFunc: func(obj any) {
			if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = d.Obj
			}
			if p, ok := obj.(*corev1.Pod); ok {
				n.teardown(string(p.UID))
			}
		},
	})
	f.Start(ctx.Done())
}

// sync starts a sandbox for a new pod, or tears it down when the pod is
// being deleted (and then finishes the deletion, as the kubelet does).
func (n *Node) sync(ctx context.Context, pod *corev1.Pod) {
	uid := string(pod.UID)
	if pod.DeletionTimestamp != nil {
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			n.teardown(uid)
			zero := int64(0)
			_ = n.opts.Client.CoreV1().Pods(pod.Namespace).Delete(context.Background(), pod.Name,
				metav1.DeleteOptions{GracePeriodSeconds: &zero, Preconditions: &metav1.Preconditions{UID: &pod.UID}})
		}()
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if _, ok := n.pods[uid]; ok || n.stopped || ctx.Err() != nil || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return
	}
	sctx, cancel := context.WithCancel(ctx)
	sb := &sandbox{uid: uid, namespace: pod.Namespace, name: pod.Name, containerID: randHex(32), cancel: cancel, done: make(chan struct{})}
	n.pods[uid] = sb
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		defer close(sb.done)
		n.runPod(sctx, sb, pod.DeepCopy())
	}()
}

// runPod creates the sandbox, retrying CNI ADD until it succeeds or the
// pod goes away, then starts the containers and reports the pod Running.
func (n *Node) runPod(ctx context.Context, sb *sandbox, pod *corev1.Pod) {
	log := n.log.With("pod", pod.Namespace+"/"+pod.Name)
	var ip netip.Addr
	for attempt := 1; ; attempt++ {
		var err error
		ip, err = n.createSandbox(ctx, sb, pod)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return
		}
		log.Info("sandbox creation failed; retrying", "attempt", attempt, "error", err)
		n.rec.Eventf(pod, corev1.EventTypeWarning, "FailedCreatePodSandBox", "Failed to create pod sandbox: %v", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(n.opts.RetryInterval):
		}
	}
	if err := n.startContainers(sb, pod); err != nil {
		log.Error("start containers", "error", err)
		n.rec.Eventf(pod, corev1.EventTypeWarning, "Failed", "Error: %v", err)
		return
	}
	now := metav1.Now()
	pod.Status.Phase = corev1.PodRunning
	pod.Status.PodIP = ip.String()
	pod.Status.PodIPs = []corev1.PodIP{{IP: ip.String()}}
	pod.Status.HostIP = n.LinkIP.String()
	pod.Status.StartTime = &now
	pod.Status.Conditions = []corev1.PodCondition{
		{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
		{Type: corev1.ContainersReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
	}
	if _, err := n.opts.Client.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil && ctx.Err() == nil {
		log.Error("update pod status", "error", err)
	}
	log.Info("pod running", "ip", ip)
}

func (n *Node) createSandbox(ctx context.Context, sb *sandbox, pod *corev1.Pod) (netip.Addr, error) {
	if sb.netns == "" {
		name := "slp" + randHex(5)
		if err := run("ip", "netns", "add", name); err != nil {
			return netip.Addr{}, err
		}
		sb.netns = name
		if err := run("ip", "-n", name, "link", "set", "lo", "up"); err != nil {
			return netip.Addr{}, err
		}
	}
	res, err := n.cni.AddNetworkList(ctx, n.conf, n.runtimeConf(sb))
	if err != nil {
		// Undo what the chain did before failing, as the runtime does.
		_ = n.cni.DelNetworkList(context.Background(), n.conf, n.runtimeConf(sb))
		return netip.Addr{}, err
	}
	r, err := types100.NewResultFromResult(res)
	if err != nil {
		return netip.Addr{}, err
	}
	for _, ipc := range r.IPs {
		if a, ok := netip.AddrFromSlice(ipc.Address.IP); ok {
			return a.Unmap(), nil
		}
	}
	return netip.Addr{}, errors.New("CNI result has no IP")
}

func (n *Node) runtimeConf(sb *sandbox) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: sb.containerID,
		NetNS:       "/var/run/netns/" + sb.netns,
		IfName:      "eth0",
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", sb.namespace},
			{"K8S_POD_NAME", sb.name},
			{"K8S_POD_INFRA_CONTAINER_ID", sb.containerID},
			{"K8S_POD_UID", sb.uid},
		},
	}
}

// startContainers runs each container that has a command inside the pod's
// netns and cgroup (containers without one, e.g. an injected istio-proxy
// whose command is the image's, are treated as running).
func (n *Node) startContainers(sb *sandbox, pod *corev1.Pod) error {
	sb.cgroup = filepath.Join(n.opts.CgroupParent, "pod"+strings.ReplaceAll(sb.uid, "-", ""))
	if err := os.MkdirAll(sb.cgroup, 0o755); err != nil {
		return fmt.Errorf("create pod cgroup: %w", err)
	}
	cg, err := os.Open(sb.cgroup)
	if err != nil {
		return err
	}
	defer cg.Close()
	for _, c := range pod.Spec.Containers {
		argv := append(append([]string{}, c.Command...), c.Args...)
		if len(c.Command) == 0 {
			continue
		}
		cmd := exec.Command("ip", append([]string{"netns", "exec", sb.netns}, argv...)...)
		logf, err := os.Create(n.ContainerLog(pod.Namespace, pod.Name, c.Name))
		if err != nil {
			return err
		}
		cmd.Stdout, cmd.Stderr = logf, logf
		for _, e := range c.Env {
			cmd.Env = append(cmd.Env, e.Name+"="+e.Value)
		}
		if cmd.Env != nil {
			cmd.Env = append(os.Environ(), cmd.Env...)
		}
		// Born in the pod's cgroup (clone3 CLONE_INTO_CGROUP): no window in
		// which the process runs in the test's own cgroup.
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, UseCgroupFD: true, CgroupFD: int(cg.Fd()), Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			logf.Close()
			return fmt.Errorf("container %s: %w", c.Name, err)
		}
		logf.Close()
		sb.procs = append(sb.procs, cmd)
		go func() { _ = cmd.Wait() }()
	}
	return nil
}

// teardown kills the pod's processes, runs CNI DEL and removes the netns
// and cgroup.
func (n *Node) teardown(uid string) {
	n.mu.Lock()
	sb, ok := n.pods[uid]
	if !ok || sb.closing {
		n.mu.Unlock()
		return
	}
	sb.closing = true
	n.mu.Unlock()
	defer func() {
		n.mu.Lock()
		delete(n.pods, uid)
		n.mu.Unlock()
	}()
	sb.cancel()
	<-sb.done
	for _, p := range sb.procs {
		if p.Process != nil {
			_ = syscall.Kill(-p.Process.Pid, syscall.SIGKILL)
		}
	}
	if sb.cgroup != "" {
		killCgroup(sb.cgroup)
	}
	if sb.netns != "" {
		if err := n.cni.DelNetworkList(context.Background(), n.conf, n.runtimeConf(sb)); err != nil {
			n.log.Error("CNI DEL", "pod", sb.namespace+"/"+sb.name, "error", err)
		}
		if err := run("ip", "netns", "del", sb.netns); err != nil {
			n.log.Error("delete netns", "netns", sb.netns, "error", err)
		}
	}
	n.log.Info("pod torn down", "pod", sb.namespace+"/"+sb.name)
}

// killCgroup kills whatever is left in a pod cgroup and removes it.
func killCgroup(dir string) {
	_ = os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0)
	for range 100 {
		if err := os.Remove(dir); err == nil || errors.Is(err, os.ErrNotExist) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// PodNetns returns the network namespace name of a running pod's sandbox.
func (n *Node) PodNetns(uid string) (string, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	sb, ok := n.pods[uid]
	if !ok || sb.netns == "" {
		return "", false
	}
	return sb.netns, true
}

// PodCgroup returns the cgroup directory of a running pod's processes.
func (n *Node) PodCgroup(uid string) (string, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	sb, ok := n.pods[uid]
	if !ok || sb.cgroup == "" {
		return "", false
	}
	return sb.cgroup, true
}

// PodNetnses lists the network namespace names of the node's sandboxes.
func (n *Node) PodNetnses() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []string
	for _, sb := range n.pods {
		if sb.netns != "" {
			out = append(out, sb.netns)
		}
	}
	return out
}

// Sandboxes counts the node's live sandboxes.
func (n *Node) Sandboxes() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return len(n.pods)
}

// Crash stops the runtime as a power loss does: every sandbox's processes
// are killed and its netns removed without CNI DEL (nothing runs at
// shutdown), and the runtime forgets them. The node's own namespace,
// bridge and IPAM state stay, as on disk. Restart brings the runtime back.
func (n *Node) Crash() {
	n.cancel() // informers stop; sync adds nothing from here on
	n.mu.Lock()
	sbs := make([]*sandbox, 0, len(n.pods))
	for _, sb := range n.pods {
		sbs = append(sbs, sb)
	}
	n.pods = map[string]*sandbox{}
	n.mu.Unlock()
	for _, sb := range sbs {
		sb.cancel()
		<-sb.done
		for _, p := range sb.procs {
			if p.Process != nil {
				_ = syscall.Kill(-p.Process.Pid, syscall.SIGKILL)
			}
		}
		if sb.cgroup != "" {
			killCgroup(sb.cgroup)
		}
		if sb.netns != "" {
			_ = run("ip", "netns", "del", sb.netns)
		}
	}
	n.wg.Wait()
	n.bcast.Shutdown()
	n.log.Info("runtime crashed", "sandboxes", len(sbs))
}

// Restart starts the runtime after Crash: it creates a sandbox for every
// pod bound to the node again, retrying CNI ADD until it succeeds.
func (n *Node) Restart() { n.start() }

// Stop tears down every pod, the node namespace (bridge and link with it)
// and the Node object.
func (n *Node) Stop() {
	n.mu.Lock()
	if n.stopped {
		n.mu.Unlock()
		return
	}
	n.stopped = true
	uids := make([]string, 0, len(n.pods))
	for uid := range n.pods {
		uids = append(uids, uid)
	}
	n.mu.Unlock()
	if n.cancel != nil {
		n.cancel()
	}
	for _, uid := range uids {
		n.teardown(uid)
	}
	n.wg.Wait()
	if n.bcast != nil {
		n.bcast.Shutdown()
	}
	if n.nodeNS != nil {
		n.nodeNS.Close()
		_ = run("ip", "netns", "del", n.Netns)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = n.opts.Client.CoreV1().Nodes().Delete(ctx, n.Name, metav1.DeleteOptions{})
}
