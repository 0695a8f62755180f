package nodeharness

import (
	"context"
	"io"
	"net/http"

	"bytes"
	"errors"
	"fmt"
	"github.com/containernetworking/plugins/pkg/ns"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sidelane/sidelane/internal/testenv"
)

// ServiceIP is the kubernetes Service's ClusterIP (first of ServiceCIDR).
const (
	ServiceCIDR = "10.96.0.0/16"
	ServiceIP   = "10.96.0.1"
	// PauseImage and BusyboxImage are built by hack/build-node-images.sh.
	PauseImage   = "sidelane.local/pause:2"
	BusyboxImage = "sidelane.local/busybox:1"
	// ProxyImage stands in for Istio's proxyv2: the real pilot-agent and haproxy playing Envoy (none exists here).
	ProxyImage = "sidelane.local/proxyv2:2"
	apiPort    = "6443"
)

// kernelSettings are the sysctls kubelet changes at start; Stop puts
// back what they were.
var kernelSettings = []string{"kernel/panic", "kernel/panic_on_oops", "vm/overcommit_memory"}

// Tools are the binaries a node needs, found by Start.
type Tools struct {
	KubeDir  string // kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl
	CNIBin   string // bridge, host-local, loopback (hack/install-tools.sh)
	ImageDir string // pause and busybox archives (hack/build-node-images.sh)
}

// Node is one running node.
type Node struct {
	Name       string // node name; also the netns, the cgroup and the bridge prefix
	Dir        string // everything on disk (removed by Stop)
	NetNS      string // /run/netns/<Name>
	NodeIP     string
	PodCIDR    string
	CgroupRoot string // kubelet's cgroupRoot, e.g. /slnode1234abcd
	CgroupV2   string // the same subtree in the cgroup2 mount
	// CNIConfDir and CNIBinDir are the runtime's real CNI directories: the
	// primary's conflist is in CNIConfDir; sidelane's install-cni writes
	// there and into CNIBinDir.
	CNIConfDir, CNIBinDir string
	Kubeconfig            string // for commands run with Exec
	// BPFFS is a bpffs instance of the node's own (pins vanish with it).
	BPFFS          string
	ContainerdSock string
	tools          Tools

	mu        sync.Mutex
	stopped   bool
	holder    *exec.Cmd
	procs     []*proc
	cgroups   []string // the subtree in every hierarchy
	createdOn []string // host directories Start created (tmpfs mount points)
	sysctls   map[string]string
	stopSig   chan os.Signal
	boots     int // Reboot count
}

// Start brings up a node for t and stops it at cleanup (and on SIGINT/SIGTERM).
// index picks the node's address block (10.201.<index>.1, pods in
// 10.202.<index>.0/24), so parallel nodes of one run do not overlap.
func Start(t testing.TB, tools Tools, taints []string) *Node {
	t.Helper()
	n := &Node{
		Name:    testenv.UniqueName("slnode"),
		NodeIP:  "10.201.0.1",
		PodCIDR: "10.202.0.0/24",
		tools:   tools,
	}
	dir, err := os.MkdirTemp("", n.Name+"-")
	if err != nil {
		t.Fatal(err)
	}
	n.Dir = dir
	n.NetNS = "/run/netns/" + n.Name
	n.CgroupRoot = "/" + n.Name
	n.CNIConfDir = filepath.Join(dir, "cni", "net.d")
	n.CNIBinDir = filepath.Join(dir, "cni", "bin")
	n.Kubeconfig = filepath.Join(dir, "kubeconfig")
	n.BPFFS = filepath.Join(dir, "bpffs")
	n.ContainerdSock = filepath.Join(dir, "containerd", "containerd.sock")
	n.stopSig = make(chan os.Signal, 1)
	signal.Notify(n.stopSig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		if _, ok := <-n.stopSig; ok {
			fmt.Fprintf(os.Stderr, "nodeharness: interrupted, removing node %s\n", n.Name)
			_ = n.Stop()
			os.Exit(1)
		}
	}()
	t.Cleanup(func() {
		if t.Failed() {
			for _, p := range n.procs {
				t.Logf("--- %s (last lines)\n%s", p.name, tail(p.log, 3000))
			}
		}
		if err := n.Stop(); err != nil {
			t.Errorf("stop node %s: %v", n.Name, err)
		}
		for _, l := range n.leftovers() {
			t.Errorf("node %s left behind: %s", n.Name, l)
		}
	})
	if err := n.start(taints); err != nil {
		t.Fatalf("start node %s: %v", n.Name, err)
	}
	return n
}

func (n *Node) start(taints []string) error {
	if err := n.recordSysctls(); err != nil {
		return err
	}
	if err := n.makeCgroups(); err != nil {
		return err
	}
	if err := n.makeNetNS(); err != nil {
		return err
	}
	if err := n.startHolder(); err != nil {
		return err
	}
	k, err := writePKI(n.Dir, net.ParseIP(n.NodeIP))
	if err != nil {
		return err
	}
	if err := n.writeFiles(k, taints); err != nil {
		return err
	}
	kube := func(b string) string { return filepath.Join(n.tools.KubeDir, b) }
	if err := n.run("etcd", "etcd", "--name=node", "--data-dir="+filepath.Join(n.Dir, "etcd"),
		"--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
		"--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=node=http://127.0.0.1:2380", "--log-level=warn"); err != nil {
		return err
	}
	if err := n.run("kube-apiserver", kube("kube-apiserver"),
		"--etcd-servers=http://127.0.0.1:2379",
		"--bind-address=0.0.0.0", "--advertise-address="+n.NodeIP, "--secure-port="+apiPort,
		"--cert-dir="+filepath.Join(n.Dir, "apiserver-certs"),
		"--tls-cert-file="+k.serverCert, "--tls-private-key-file="+k.serverKey,
		"--client-ca-file="+k.caCert, "--token-auth-file="+k.tokenFile,
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+k.saKey, "--service-account-signing-key-file="+k.saKey,
		"--service-cluster-ip-range="+ServiceCIDR, "--allow-privileged=true",
		"--kubelet-preferred-address-types=InternalIP",
		"--profiling=false"); err != nil {
		return err
	}
	if err := n.waitFor("kube-apiserver /readyz", 2*time.Minute, func() error {
		_, err := n.Kubectl("get", "--raw", "/readyz")
		return err
	}); err != nil {
		return err
	}
	if err := n.run("kube-controller-manager", kube("kube-controller-manager"),
		"--kubeconfig="+n.Kubeconfig, "--leader-elect=false",
		"--service-account-private-key-file="+k.saKey, "--root-ca-file="+k.caCert,
		"--use-service-account-credentials=false", "--profiling=false"); err != nil {
		return err
	}
	if err := n.run("kube-scheduler", kube("kube-scheduler"),
		"--kubeconfig="+n.Kubeconfig, "--leader-elect=false", "--profiling=false"); err != nil {
		return err
	}
	// kube-proxy: in-cluster clients reach the API server through the
	// kubernetes Service as on a real cluster. conntrack-max-per-core=0
	// leaves the machine-wide nf_conntrack_max alone.
	if err := n.run("kube-proxy", kube("kube-proxy"),
		"--kubeconfig="+n.Kubeconfig, "--hostname-override="+n.Name, "--proxy-mode=iptables",
		"--cluster-cidr="+n.PodCIDR, "--conntrack-max-per-core=0",
		"--conntrack-tcp-timeout-established=0", "--conntrack-tcp-timeout-close-wait=0",
		"--metrics-bind-address=127.0.0.1:10249", "--healthz-bind-address=127.0.0.1:10256",
		"--profiling=false"); err != nil {
		return err
	}
	if err := n.startContainerd(); err != nil {
		return err
	}
	for _, img := range []string{PauseImage, BusyboxImage, ProxyImage} {
		if err := n.ImportImage(filepath.Join(n.tools.ImageDir, strings.NewReplacer("/", "_", ":", "_").Replace(img)+".tar")); err != nil {
			return err
		}
	}
	if err := n.startKubelet(); err != nil {
		return err
	}
	return n.waitFor("node Ready", 3*time.Minute, func() error {
		_, err := n.Kubectl("wait", "--for=condition=Ready", "node/"+n.Name, "--timeout=5s")
		return err
	})
}

// runtimeCgroup holds containerd, its shims and kubelet (the pods are in
// kubelet's cgroupRoot): what Reboot kills, apart from the control plane.
// Each boot gets a new one: this kernel SIGKILLs a process cloned
// (CLONE_INTO_CGROUP) into a cgroup that cgroup.kill was once written to
// (the fork's kill sequence is read from the parent's cgroup, not the
// target's; "new containerd exited: signal: killed" before it logged).
func (n *Node) runtimeCgroup() string { return fmt.Sprintf("runtime-%d", n.boots) }

func (n *Node) startContainerd() error {
	cmd := n.Exec("containerd", "--config="+filepath.Join(n.Dir, "containerd.toml"))
	if _, err := n.startProcIn("containerd", n.runtimeCgroup(), cmd); err != nil {
		return err
	}
	return n.waitFor("containerd", time.Minute, func() error {
		_, err := n.ctr("version")
		return err
	})
}

func (n *Node) startKubelet() error {
	cmd := n.Exec(filepath.Join(n.tools.KubeDir, "kubelet"),
		"--config="+filepath.Join(n.Dir, "kubelet.yaml"), "--kubeconfig="+n.Kubeconfig,
		"--root-dir="+filepath.Join(n.Dir, "kubelet"), "--hostname-override="+n.Name,
		"--node-ip="+n.NodeIP, "--v=1")
	_, err := n.startProcIn("kubelet", n.runtimeCgroup(), cmd)
	return err
}

// Reboot does to the node what a power cycle does, and starts it again:
// kubelet, containerd, its shims and every container (the agent's too)
// are SIGKILLed at once (no graceful stop, so the agent re-adds no taint);
// what lives in memory vanishes: the bpffs (every sidelane pin), /run
// (sidelane's state dir, containerd's state, the pod netns mounts) and
// every mount the runtime made (container root file systems, volumes);
// the new bpffs holds only the kernel's own maps.debug and progs.debug.
// What is on disk stays: containerd's images and metadata, kubelet's root
// dir, the CNI conf and bin dirs and libcni's cache. The control plane
// (another machine on a real cluster) keeps running. Then containerd and
// kubelet start again; kubelet recreates every pod's sandbox, the agent's
// among them. beforeKubelet, if not nil, runs once containerd is up and
// before kubelet starts (e.g. to hold the agent back by removing its image).
func (n *Node) Reboot(beforeKubelet func() error) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	var procs []*proc
	for _, p := range n.procs {
		if p.name != "kubelet" && p.name != "containerd" {
			procs = append(procs, p)
		}
	}
	for _, dir := range []string{filepath.Join(n.CgroupV2, n.runtimeCgroup()), filepath.Join(n.CgroupV2, "kubepods")} {
		if _, err := os.Stat(dir); err == nil {
			if err := killCgroup(dir); err != nil {
				return err
			}
		}
	}
	for _, p := range n.procs {
		if p.name == "kubelet" || p.name == "containerd" {
			<-p.done
		}
	}
	n.procs = procs
	n.boots++
	// Unmount, deepest first, everything the runtime mounted under the
	// node's directory (bpffs included) and the tmpfs of /run, then give
	// /run and the bpffs fresh empty instances.
	var runDirs []string
	for _, d := range hostDirs {
		if strings.HasPrefix(d, "/run/") {
			runDirs = append(runDirs, d)
		}
	}
	// A lazy unmount of a /run tmpfs takes every mount inside it along
	// (mountinfo also lists the host's mounts the tmpfs hides: untouched).
	script := `set -e
for m in $(awk -v dir="$1" '{ if (index($5, dir "/") == 1) print $5 }' /proc/self/mountinfo | sort -r); do umount -l "$m" 2>/dev/null || true; done
shift
for d in "$@"; do umount -l "$d"; mount -t tmpfs -o mode=0755 nodeharness "$d"; done
rm -rf "$STATE"; mkdir -p "$STATE"
mount -t bpf bpf "$BPFFS"
left=$(ls -A "$BPFFS" | grep -v -x -e maps.debug -e progs.debug || true); [ -z "$left" ] || { echo "bpffs not empty after the remount: $left"; exit 1; }
`
	cmd := n.Exec("sh", append([]string{"-c", script, "reboot", n.Dir}, runDirs...)...)
	cmd.Env = append(cmd.Env, "STATE="+filepath.Join(n.Dir, "containerd", "state"), "BPFFS="+n.BPFFS)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("reboot: wipe memory: %w: %s", err, out)
	}
	if err := n.startContainerd(); err != nil {
		return err
	}
	if beforeKubelet != nil {
		if err := beforeKubelet(); err != nil {
			return fmt.Errorf("reboot: %w", err)
		}
	}
	return n.startKubelet()
}

// Exec is cmd run on the node: in its network and mount namespaces, with
// KUBECONFIG pointing at its API server.
func (n *Node) Exec(name string, args ...string) *exec.Cmd {
	cmd := exec.Command("nsenter", append([]string{"--mount=/proc/" + fmt.Sprint(n.holder.Process.Pid) + "/ns/mnt", "--net=" + n.NetNS, "--", name}, args...)...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+n.Kubeconfig, "CONTAINERD_ADDRESS="+n.ContainerdSock, "CONTAINERD_NAMESPACE=k8s.io")
	return cmd
}

// Kubectl runs kubectl on the node and returns its stdout.
func (n *Node) Kubectl(args ...string) (string, error) {
	return output(n.Exec(filepath.Join(n.tools.KubeDir, "kubectl"), args...))
}

func (n *Node) ctr(args ...string) (string, error) {
	return output(n.Exec("ctr", append([]string{"--address", n.ContainerdSock, "-n", "k8s.io"}, args...)...))
}

// ImportImage imports an image archive (docker-archive or OCI) into the
// node's containerd, where kubelet finds it (imagePullPolicy IfNotPresent
// or Never).
func (n *Node) ImportImage(archive string) error {
	if _, err := n.ctr("images", "import", archive); err != nil {
		return fmt.Errorf("import %s: %w", archive, err)
	}
	return nil
}

func output(cmd *exec.Cmd) (string, error) {
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args[4:], " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

func (n *Node) waitFor(what string, timeout time.Duration, f func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return nil
		}
		for _, p := range n.procs {
			if p.exited() {
				return fmt.Errorf("waiting for %s: %s exited: %v\n%s", what, p.name, p.err, tail(p.log, 3000))
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not there after %s: %w", what, timeout, err)
		}
		time.Sleep(time.Second)
	}
}

func (n *Node) recordSysctls() error {
	n.sysctls = map[string]string{}
	for _, s := range kernelSettings {
		b, err := os.ReadFile("/proc/sys/" + s)
		if err != nil {
			return fmt.Errorf("record sysctl %s: %w", s, err)
		}
		n.sysctls[s] = strings.TrimSpace(string(b))
	}
	return nil
}

// makeCgroups creates /<Name> in every cgroup hierarchy (kubelet's
// cgroupfs driver wants cgroupRoot in each) and <Name>/node in the cgroup2
// one for the node's own processes.
func (n *Node) makeCgroups() error {
	mounts, err := os.ReadFile("/proc/mounts")
	if err != nil {
		return err
	}
	for _, l := range strings.Split(string(mounts), "\n") {
		f := strings.Fields(l)
		if len(f) < 3 || (f[2] != "cgroup" && f[2] != "cgroup2") {
			continue
		}
		d := filepath.Join(f[1], n.Name)
		if err := os.Mkdir(d, 0o755); err != nil {
			return fmt.Errorf("create cgroup: %w", err)
		}
		n.cgroups = append(n.cgroups, d)
		if f[2] == "cgroup2" {
			n.CgroupV2 = d
		}
	}
	if n.CgroupV2 == "" {
		return errors.New("no cgroup2 mount: the eBPF datapath and the cleanup need one")
	}
	return os.Mkdir(filepath.Join(n.CgroupV2, "node"), 0o755)
}

func (n *Node) makeNetNS() error {
	for _, args := range [][]string{
		{"netns", "add", n.Name},
		{"-n", n.Name, "link", "set", "lo", "up"},
		{"-n", n.Name, "addr", "add", n.NodeIP + "/32", "dev", "lo"},
		// No default route: the Service CIDR needs one for kube-proxy's
		// DNAT of locally made connections to apply.
		{"-n", n.Name, "route", "add", ServiceCIDR, "dev", "lo", "src", n.NodeIP},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, out)
		}
	}
	return nil
}

// hostDirs get a tmpfs of the node's own inside its mount namespace:
// paths containerd and kubelet use whatever their configuration says.
// /run/sidelane: the agent socket the chart puts there; /run/netns: containerd's pod netns mounts (the node's own netns file is
// opened by nsenter from the host side); /var/lib/cni: libcni's cache.
var hostDirs = []string{"/run/containerd", "/run/netns", "/run/sidelane", "/var/lib/cni", "/var/log/pods", "/var/log/containers"}

// startHolder starts the process that holds the node's mount namespace:
// private to the node, / shared inside it (mount propagation for
// containerd), tmpfs over hostDirs. The namespace, and every mount made in
// it, goes away when its last process does.
func (n *Node) startHolder() error {
	if err := os.Mkdir(n.BPFFS, 0o700); err != nil {
		return err
	}
	for _, d := range hostDirs {
		if _, err := os.Stat(d); errors.Is(err, os.ErrNotExist) {
			if err := os.MkdirAll(d, 0o755); err != nil {
				return err
			}
			n.createdOn = append(n.createdOn, d)
		}
	}
	ready := filepath.Join(n.Dir, "mountns-ready")
	script := "set -e; mount --make-rshared /; for d in " + strings.Join(hostDirs, " ") +
		"; do mount -t tmpfs -o mode=0755 nodeharness \"$d\"; done; mount -t bpf bpf " + n.BPFFS + "; : > " + ready + "; exec sleep 2147483647"
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script)
	p, err := n.startProc("mount-namespace", cmd)
	if err != nil {
		return err
	}
	n.holder = p.cmd
	return n.waitFor("mount namespace", 30*time.Second, func() error {
		_, err := os.Stat(ready)
		return err
	})
}

// run starts a node component in the node's namespaces.
func (n *Node) run(name, bin string, args ...string) error {
	cmd := n.Exec(bin, args...)
	_, err := n.startProc(name, cmd)
	return err
}

func (n *Node) writeFiles(k *pki, taints []string) error {
	for _, d := range []string{n.CNIConfDir, n.CNIBinDir, filepath.Join(n.Dir, "containerd"), filepath.Join(n.Dir, "logs")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	for _, p := range []string{"bridge", "host-local", "loopback"} {
		b, err := os.ReadFile(filepath.Join(n.tools.CNIBin, p))
		if err != nil {
			return fmt.Errorf("reference CNI plugin (make tools): %w", err)
		}
		if err := os.WriteFile(filepath.Join(n.CNIBinDir, p), b, 0o755); err != nil {
			return err
		}
	}
	kubeconfig := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: node
  cluster: {server: "https://%s:%s", certificate-authority: %q}
users:
- name: admin
  user: {token: %q}
contexts:
- name: node
  context: {cluster: node, user: admin}
current-context: node
`, n.NodeIP, apiPort, k.caCert, k.token)
	conflist := fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": "nodeharness",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": %q}]], "routes": [{"dst": %q}], "dataDir": %q}}
  ]
}
`, n.PodCIDR, ServiceCIDR, filepath.Join(n.Dir, "cni", "ipam"))
	cd := filepath.Join(n.Dir, "containerd")
	containerd := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = %q
[plugins."io.containerd.internal.v1.opt"]
  path = %q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  # The sandbox lacks CAP_SYS_RESOURCE (ENVIRONMENT.md): without this every
  # sandbox fails with "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
`, filepath.Join(cd, "root"), filepath.Join(cd, "state"), n.ContainerdSock, filepath.Join(cd, "opt"),
		PauseImage, n.CNIBinDir, n.CNIConfDir)
	var taintYAML strings.Builder
	for _, tt := range taints { // key=value:Effect or key:Effect
		kv, effect, _ := strings.Cut(tt, ":")
		key, value, _ := strings.Cut(kv, "=")
		fmt.Fprintf(&taintYAML, "- {key: %q, value: %q, effect: %q}\n", key, value, effect)
	}
	kubelet := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: %q
failSwapOn: false
containerRuntimeEndpoint: "unix://%s"
address: %q
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
podLogsDir: %q
# A shared machine's disk must not evict the test's pods or taint the node.
evictionHard: {memory.available: "1Mi", nodefs.available: "0%%", imagefs.available: "0%%", nodefs.inodesFree: "0%%", imagefs.inodesFree: "0%%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
clusterDomain: cluster.local
registerWithTaints:
%s`, n.CgroupRoot, n.ContainerdSock, n.NodeIP, filepath.Join(n.Dir, "pod-logs"), taintYAML.String())
	if len(taints) == 0 {
		kubelet = strings.TrimSuffix(kubelet, "registerWithTaints:\n") + "registerWithTaints: []\n"
	}
	for path, data := range map[string]string{
		n.Kubeconfig: kubeconfig,
		filepath.Join(n.CNIConfDir, "10-bridge.conflist"): conflist,
		filepath.Join(n.Dir, "containerd.toml"):           containerd,
		filepath.Join(n.Dir, "kubelet.yaml"):              kubelet,
	} {
		if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
			return err
		}
	}
	return nil
}

// Stop kills every process of the node (kubelet first, then the whole
// cgroup subtree: containerd, its shims, the containers), removes the
// namespaces, cgroups and files, and restores the kernel settings. It is
// idempotent and keeps going past errors, returning them joined.
func (n *Node) Stop() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.stopped {
		return nil
	}
	n.stopped = true
	signal.Stop(n.stopSig)
	close(n.stopSig)
	var errs []error
	for i := len(n.procs) - 1; i >= 0; i-- {
		if n.procs[i].name == "kubelet" {
			n.procs[i].stop()
		}
	}
	if n.CgroupV2 != "" {
		if err := killCgroup(n.CgroupV2); err != nil {
			errs = append(errs, err)
		}
	}
	for _, p := range n.procs {
		p.stop()
	}
	if out, err := exec.Command("ip", "netns", "del", n.Name).CombinedOutput(); err != nil && !strings.Contains(string(out), "No such file") {
		errs = append(errs, fmt.Errorf("ip netns del %s: %w: %s", n.Name, err, out))
	}
	for i := len(n.cgroups) - 1; i >= 0; i-- {
		if err := removeCgroupTree(n.cgroups[i]); err != nil {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", n.cgroups[i], err))
		}
	}
	for s, v := range n.sysctls {
		if err := os.WriteFile("/proc/sys/"+s, []byte(v), 0); err != nil {
			errs = append(errs, fmt.Errorf("restore sysctl %s=%s: %w", s, v, err))
		}
	}
	for _, d := range n.createdOn {
		if err := os.Remove(d); err != nil {
			errs = append(errs, err)
		}
	}
	if os.Getenv("NODEHARNESS_KEEP") == "" {
		if err := os.RemoveAll(n.Dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// leftovers lists what Stop should have removed and did not: the netns,
// the cgroups, the directory, any mount of the node's seen from here.
func (n *Node) leftovers() []string {
	var left []string
	if os.Getenv("NODEHARNESS_KEEP") == "" {
		if _, err := os.Stat(n.Dir); err == nil {
			left = append(left, "directory "+n.Dir)
		}
	}
	if _, err := os.Stat(n.NetNS); err == nil {
		left = append(left, "netns "+n.NetNS)
	}
	for _, d := range n.cgroups {
		if _, err := os.Stat(d); err == nil {
			left = append(left, "cgroup "+d)
		}
	}
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, n.Name) {
				left = append(left, "mount "+l)
			}
		}
	}
	return left
}

// killCgroup kills every process in a cgroup2 subtree and waits until it
// is empty.
func killCgroup(dir string) error {
	if err := os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0); err != nil {
		return fmt.Errorf("kill cgroup %s: %w", dir, err)
	}
	for range 100 {
		b, err := os.ReadFile(filepath.Join(dir, "cgroup.events"))
		if err != nil || bytes.Contains(b, []byte("populated 0")) {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("cgroup %s still has processes", dir)
}

// removeCgroupTree removes dir and its children, deepest first.
func removeCgroupTree(dir string) error {
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if e.IsDir() {
			if err := removeCgroupTree(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	var err error
	for range 50 {
		if err = os.Remove(dir); err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return err
}

// proc is one node process with its output in a log file.
type proc struct {
	name, log string
	cmd       *exec.Cmd
	done      chan struct{}
	err       error
}

// startProc starts cmd in the node's cgroup2 subtree (clone into it, so
// nothing it forks escapes the cleanup), logging to Dir/logs/<name>.log.
// It forks from a locked OS thread: the parent-death signal fires when
// the thread that forked exits.
func (n *Node) startProc(name string, cmd *exec.Cmd) (*proc, error) {
	return n.startProcIn(name, "node", cmd)
}

// startProcIn is startProc into the cgroup2 child cgroup of the node's subtree.
func (n *Node) startProcIn(name, cgroup string, cmd *exec.Cmd) (*proc, error) {
	logPath := filepath.Join(n.Dir, "logs", name+".log")
	if err := os.MkdirAll(filepath.Dir(logPath), 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(n.CgroupV2, cgroup), 0o755); err != nil {
		f.Close()
		return nil, err
	}
	cg, err := os.Open(filepath.Join(n.CgroupV2, cgroup))
	if err != nil {
		f.Close()
		return nil, err
	}
	p := &proc{name: name, log: logPath, cmd: cmd, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, UseCgroupFD: true, CgroupFD: int(cg.Fd()), Setpgid: true}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer f.Close()
		err := cmd.Start()
		cg.Close()
		started <- err
		if err != nil {
			close(p.done)
			runtime.UnlockOSThread()
			return
		}
		p.err = cmd.Wait()
		close(p.done)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	n.procs = append(n.procs, p)
	return p, nil
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *proc) stop() {
	if p.exited() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

func tail(path string, n int64) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	if int64(len(b)) > n {
		b = b[int64(len(b))-n:]
	}
	return string(b)
}

// KubeDir is where kubectl and the Kubernetes binaries are.
func (n *Node) KubeDir() string { return n.tools.KubeDir }

// DialContext connects from inside the node's network namespace (the
// socket stays there), for HTTP clients in the test process.
func (n *Node) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	nsh, err := ns.GetNS(n.NetNS)
	if err != nil {
		return nil, err
	}
	defer nsh.Close()
	var conn net.Conn
	err = nsh.Do(func(ns.NetNS) error {
		var d net.Dialer
		var derr error
		conn, derr = d.DialContext(ctx, network, addr)
		return derr
	})
	return conn, err
}

// HTTPGet fetches url from inside the node's network namespace.
func (n *Node) HTTPGet(ctx context.Context, url string) (string, error) {
	c := &http.Client{Transport: &http.Transport{DialContext: n.DialContext}, Timeout: 5 * time.Second}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return string(b), fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return string(b), nil
}

// Ctr runs ctr against the node's containerd (namespace k8s.io).
func (n *Node) Ctr(args ...string) (string, error) { return n.ctr(args...) }
