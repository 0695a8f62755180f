// Package demo runs `make demo`: the whole product on one machine. It
// brings up a real kube-apiserver, two simulated nodes with the real CNI
// chain and the real `sidelane agent` (eBPF datapath) on each, then walks
// through the story, checking each step against something real.
package demo

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/sidelane/sidelane/agent/cnirpc"
	"github.com/sidelane/sidelane/bpf"
	"github.com/sidelane/sidelane/internal/kubeharness"
	"github.com/sidelane/sidelane/internal/kubelet"
	"github.com/sidelane/sidelane/internal/podnet"
)

// Options configure one demo run.
type Options struct {
	Out io.Writer
	// Repo is the module root (fixtures, bench/out).
	Repo string
	// Bin holds sidelane and sidelane-cni; Tools the reference CNI plugins.
	Bin, Tools string
	// NoBench leaves out step 4's side-by-side run (`sidelane-bench run
	// -quick`, about 80 s here; needs sidelane-bench in Bin).
	NoBench bool
	Log     *slog.Logger
}

// Footprint is what a run created; the cleanup test checks it is all gone.
type Footprint struct {
	WorkDir, ClusterDir, Cgroup string
	PinDirs, Netns              []string
}

// run is one demo's state; cleanups run in reverse on every exit path.
type run struct {
	opts     Options
	out      io.Writer
	mu       sync.Mutex
	cleanups []func()
	fp       Footprint
	cs       kubernetes.Interface
	nodes    []*kubelet.Node
	failed   int

	setupTime time.Duration

	scNS           string
	kubeconfig     string
	kubectl        string
	restConfig     *rest.Config
	client, server *podRef
	reports        *podRef // the per-node pod of step 2
}

func (r *run) defer_(f func()) {
	r.mu.Lock()
	r.cleanups = append(r.cleanups, f)
	r.mu.Unlock()
}

func (r *run) cleanup() {
	r.mu.Lock()
	cs := r.cleanups
	r.cleanups = nil
	r.mu.Unlock()
	for i := len(cs) - 1; i >= 0; i-- {
		cs[i]()
	}
}

func (r *run) say(format string, a ...any) { fmt.Fprintf(r.out, format+"\n", a...) }

// check prints a ✓/✗ line; a failed check makes the demo exit non-zero.
func (r *run) check(ok bool, format string, a ...any) bool {
	mark := "  ✓ "
	if !ok {
		mark = "  ✗ FAILED: "
		r.failed++
	}
	fmt.Fprintf(r.out, mark+format+"\n", a...)
	return ok
}

// progress prints a dot every few seconds until done is called.
func (r *run) progress(what string) (done func()) {
	fmt.Fprintf(r.out, "  … %s ", what)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	start := time.Now()
	go func() {
		defer wg.Done()
		t := time.NewTicker(3 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				fmt.Fprint(r.out, ".")
			}
		}
	}()
	return func() {
		close(stop)
		wg.Wait()
		fmt.Fprintf(r.out, " done (%s)\n", time.Since(start).Round(100*time.Millisecond))
	}
}

// Run runs the demo until its end or until ctx is cancelled (Ctrl-C), then
// removes everything it created. It returns what it created (for the
// cleanup test) and an error if any check failed.
func Run(ctx context.Context, opts Options) (Footprint, error) {
	if opts.Log == nil {
		opts.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	r := &run{opts: opts, out: opts.Out}
	defer r.cleanup()
	err := r.story(ctx)
	if err == nil && ctx.Err() != nil {
		err = ctx.Err()
	}
	r.say("")
	if errors.Is(err, context.Canceled) {
		r.say("== interrupted")
	}
	r.say("== cleanup: stopping agents and nodes, removing netns, bridges, cgroups, pins, temp dirs")
	r.cleanup()
	if err != nil {
		return r.fp, err
	}
	if r.failed > 0 {
		return r.fp, fmt.Errorf("%d check(s) failed", r.failed)
	}
	return r.fp, nil
}

func (r *run) story(ctx context.Context) error {
	if err := r.setup(ctx); err != nil {
		return err
	}
	steps := []struct {
		title string
		fn    func(context.Context) error
	}{
		{"1. Istio sidecar injection, captured by eBPF (no iptables)", r.stepSidecar},
		{"2. the namespace switched live to istio.io/dataplane-mode=ambient: per-node mode through node proxies", r.stepAmbient},
		{"3. L7 policy: `sidelane controller` writes the EnvoyFilter; grpc-go over xDS enforces it", r.stepPolicy},
		{"4. latency side by side (Istio iptables vs sidelane)", r.stepBench},
		{"5. sidelane explain for one pod", r.stepExplain},
	}
	times := []string{fmt.Sprintf("0 %s", r.setupTime.Round(100*time.Millisecond))}
	total := r.setupTime
	for _, s := range steps {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		r.say("")
		r.say("== %s", s.title)
		start := time.Now()
		err := s.fn(ctx)
		if err != nil {
			if ctx.Err() != nil {
				r.say("  interrupted")
				return ctx.Err()
			}
			r.check(false, "%v", err)
		}
		d := time.Since(start)
		total += d
		r.say("  (step %s: %s)", s.title[:1], d.Round(100*time.Millisecond))
		times = append(times, fmt.Sprintf("%s %s", s.title[:1], d.Round(100*time.Millisecond)))
	}
	r.say("")
	r.say("== time per step: %s; total %s", strings.Join(times, ", "), total.Round(time.Second))
	return nil
}

func (r *run) setup(ctx context.Context) error {
	start := time.Now()
	defer func() {
		r.setupTime = time.Since(start)
		r.say("  (step 0: %s)", r.setupTime.Round(100*time.Millisecond))
	}()
	r.say("== 0. a local cluster: real kube-apiserver + etcd, two simulated nodes, the agent on each")
	if os.Geteuid() != 0 {
		return errors.New("the demo needs root (network namespaces, bridges, BPF)")
	}
	if _, err := os.Stat(filepath.Join(kubeharness.BinDir(), "kube-apiserver")); err != nil {
		r.say("  kube-apiserver is not built yet: building it once takes ~14 min (hack/build-kube-apiserver.sh)")
	}
	done := r.progress("starting etcd and kube-apiserver")
	cl, err := kubeharness.Run()
	done()
	if err != nil {
		return fmt.Errorf("cluster: %w", err)
	}
	r.fp.ClusterDir, r.kubeconfig, r.kubectl, r.restConfig = cl.Dir, cl.Kubeconfig, cl.Kubectl, cl.RESTConfig
	r.defer_(cl.Stop)
	r.cs, err = kubernetes.NewForConfig(cl.RESTConfig)
	if err != nil {
		return err
	}

	r.fp.WorkDir, err = os.MkdirTemp("", "sidelane-demo-")
	if err != nil {
		return err
	}
	r.defer_(func() { _ = os.RemoveAll(r.fp.WorkDir) })

	// The demo's own cgroup subtree: the agents attach their programs here,
	// never to the machine's root cgroup.
	mnt, err := bpf.CgroupV2Mount()
	if err != nil {
		return err
	}
	r.fp.Cgroup = filepath.Join(mnt, podnet.UniqueName("sidelane-demo-"))
	if err := os.Mkdir(r.fp.Cgroup, 0o755); err != nil {
		return fmt.Errorf("demo cgroup: %w", err)
	}
	r.defer_(func() { removeCgroupTree(r.fp.Cgroup) })
	r.check(true, "cgroup subtree %s (the eBPF programs attach here, not to the root cgroup)", r.fp.Cgroup)

	sfx := podnet.UniqueName("")
	nodes, err := kubelet.StartNodes(ctx, kubelet.Options{
		Client: r.cs, CNIBinDirs: []string{r.opts.Bin, r.opts.Tools}, CgroupParent: r.fp.Cgroup,
		Dir: r.fp.WorkDir, Log: r.opts.Log,
	}, "node-a-"+sfx[:4], "node-b-"+sfx[:4])
	if err != nil {
		return fmt.Errorf("nodes: %w", err)
	}
	r.nodes = nodes
	if err := r.installCRDs(ctx); err != nil {
		return err
	}
	for _, n := range nodes {
		r.fp.Netns = append(r.fp.Netns, n.Netns)
		r.defer_(n.Stop)
	}
	r.say("  nodes %s (netns %s) and %s (netns %s), joined by a veth pair; pod CIDRs %s, %s",
		nodes[0].Name, nodes[0].Netns, nodes[1].Name, nodes[1].Netns, nodes[0].Subnet, nodes[1].Subnet)
	// The simulated kubelet builds its conflist in memory and hands it to
	// libcni directly; it does not read a conf dir, so install-cni has
	// nowhere to write that the kubelet would see.
	r.say("  CNI chain bridge + host-local -> sidelane-cni is configured directly in the simulated kubelet")
	r.say("  (it passes the conflist to libcni in memory and reads no conf dir, so `sidelane install-cni` is not used here)")

	for _, n := range nodes {
		pin := filepath.Join("/sys/fs/bpf", podnet.UniqueName("sidelane-demo-"))
		r.fp.PinDirs = append(r.fp.PinDirs, pin)
		r.defer_(func() { _ = os.RemoveAll(pin) })
		if err := r.startAgent(ctx, n, pin); err != nil {
			return err
		}
	}
	return nil
}

// removeCgroupTree kills what is left in the demo's cgroups and removes
// them, children first.
func removeCgroupTree(dir string) {
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if e.IsDir() {
			removeCgroupTree(filepath.Join(dir, e.Name()))
		}
	}
	_ = os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0)
	for range 50 {
		if err := os.Remove(dir); err == nil || errors.Is(err, os.ErrNotExist) {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (r *run) startAgent(ctx context.Context, n *kubelet.Node, pin string) error {
	logPath := filepath.Join(filepath.Dir(n.StateDir), "agent.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return err
	}
	args := []string{"agent", "--socket", n.AgentSocket, "--state-dir", n.StateDir,
		"--kubeconfig", r.kubeconfig, "--node-name", n.Name,
		"--datapath", "ebpf", "--cgroup-root", r.fp.Cgroup, "--bpf-pin-dir", pin,
		// Per-node mode: the node proxy (step 2) listens on the bridge
		// gateway in the node's netns; the agent serves its xDS.
		"--node-proxy-address", gateway(n).String(), "--node-proxy-netns", "/var/run/netns/" + n.Netns,
		"--xds-socket", filepath.Join(filepath.Dir(n.StateDir), "xds.sock"), "--xds-socket-gid", "-1"}
	cmd := exec.Command(filepath.Join(r.opts.Bin, "sidelane"), args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("agent on %s: %w", n.Name, err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); logf.Close(); close(exited) }()
	r.defer_(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	})
	err = r.eventually(ctx, func() bool {
		_, err := os.Stat(n.AgentSocket)
		return err == nil
	})
	if ctx.Err() != nil {
		return ctx.Err()
	}
	r.check(err == nil, "sidelane agent on %s: --datapath ebpf --cgroup-root %s --bpf-pin-dir %s --node-proxy-address %s", n.Name, r.fp.Cgroup, pin, gateway(n))
	if err != nil {
		b, _ := os.ReadFile(logPath)
		return fmt.Errorf("agent on %s not ready: %w\n%s", n.Name, err, tail(string(b), 2000))
	}
	return nil
}

// installCRDs installs the L7Policy CRD (the agents' xDS feed and the
// controller read it) and Istio's CRDs (the controller writes EnvoyFilters),
// the latter from the istio.io/api module as test/e2e does.
func (r *run) installCRDs(ctx context.Context) error {
	done := r.progress("installing the L7Policy and Istio CRDs")
	defer done()
	gomod := exec.CommandContext(ctx, "go", "list", "-m", "-f", "{{.Dir}}", "istio.io/api")
	gomod.Dir = r.opts.Repo
	dir, err := gomod.Output()
	if err != nil {
		return fmt.Errorf("locate the istio.io/api module (Istio's CRDs): %w", err)
	}
	for _, f := range []string{filepath.Join(strings.TrimSpace(string(dir)), "kubernetes", "customresourcedefinitions.gen.yaml"),
		filepath.Join(r.opts.Repo, "charts", "sidelane", "crds", "sidelane.io_l7policies.yaml")} {
		if _, err := r.kubectlRun(ctx, "", "apply", "--server-side", "-f", f); err != nil {
			return fmt.Errorf("install CRDs: %w", err)
		}
	}
	_, err = r.kubectlRun(ctx, "", "wait", "--for=condition=Established", "--timeout=120s", "crd/envoyfilters.networking.istio.io", "crd/l7policies.sidelane.io")
	return err
}

// kubectlRun runs the cluster's kubectl with stdin.
func (r *run) kubectlRun(ctx context.Context, stdin string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, r.kubectl, append([]string{"--kubeconfig", r.kubeconfig}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, tail(string(out), 1000))
	}
	return string(out), nil
}

// gateway is a node's bridge gateway: its node proxy's address.
func gateway(n *kubelet.Node) netip.Addr { return n.Subnet.Addr().Next() }

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func (r *run) eventually(ctx context.Context, cond func() bool) error {
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			return errors.New("timed out")
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	return nil
}

// fixture loads a real injected pod spec generated by istioctl kube-inject.
func (r *run) fixture(name, ns, podName string) (*corev1.Pod, error) {
	b, err := os.ReadFile(filepath.Join(r.opts.Repo, "istio", "classify", "testdata", "pods", name+".yaml"))
	if err != nil {
		return nil, err
	}
	var p corev1.Pod
	if err := yaml.NewYAMLOrJSONDecoder(bytes.NewReader(b), 4096).Decode(&p); err != nil {
		return nil, err
	}
	p.Namespace, p.Name = ns, podName
	p.ResourceVersion = ""
	if p.Spec.ServiceAccountName == "" {
		p.Spec.ServiceAccountName = "default"
	}
	return &p, nil
}

func (r *run) explain(n *kubelet.Node, ns, name string) (*cnirpc.Explanation, string, error) {
	bin := filepath.Join(r.opts.Bin, "sidelane")
	out, err := exec.Command(bin, "explain", "--socket", n.AgentSocket, "-o", "json", ns+"/"+name).CombinedOutput()
	if err != nil {
		return nil, "", fmt.Errorf("sidelane explain %s/%s: %w: %s", ns, name, err, out)
	}
	var ex cnirpc.Explanation
	if err := json.Unmarshal(out, &ex); err != nil {
		return nil, "", fmt.Errorf("explain output: %w", err)
	}
	text, err := exec.Command(bin, "explain", "--socket", n.AgentSocket, ns+"/"+name).CombinedOutput()
	if err != nil {
		return nil, "", fmt.Errorf("sidelane explain: %w: %s", err, text)
	}
	return &ex, string(text), nil
}

func (r *run) mode(n *kubelet.Node, ns, name string) string {
	ex, _, err := r.explain(n, ns, name)
	if err != nil || len(ex.Attachments) != 1 {
		return "?"
	}
	return ex.Attachments[0].Mode
}

func (r *run) patchNamespace(ctx context.Context, ns, labels string) error {
	_, err := r.cs.CoreV1().Namespaces().Patch(ctx, ns, types.MergePatchType,
		[]byte(`{"metadata":{"labels":`+labels+`}}`), metav1.PatchOptions{})
	return err
}
