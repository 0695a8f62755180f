// Package istiodharness runs Istio's real control plane, istiod
// (pilot-discovery, built by `hack/install-tools.sh istiod`), next to a
// kubeharness kube-apiserver, so tests can see what istiod makes of
// sidelane's EnvoyFilters: they connect as a pod's sidecar over plaintext
// ADS and read the listeners istiod computes for it. Start is for tests,
// Run for the benchmarks (bench/run's policy_to_istiod).
//
// istiod runs with its CA, certificate provider and injector off
// (ENABLE_CA_SERVER=false, PILOT_CERT_PROVIDER=none, INJECT_ENABLED=false),
// `--registries=Kubernetes`, every port on a free loopback port, and
// Istio's CRDs applied from the istio.io/istio module the binary was built
// from. Test-only: sidelane's product never links Istio.
package istiodharness

import (
	"bytes"
	"context"
	"debug/buildinfo"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	k8stypes "k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/sidelane/sidelane/internal/kubeharness"
)

// Namespace is istiod's own namespace (and the mesh's root namespace).
const Namespace = "istio-system"

// ClusterID is the cluster name istiod and the fake sidecars agree on.
const ClusterID = "Kubernetes"

// readyTimeout bounds the wait for /ready; the machine is small and shared.
const readyTimeout = 3 * time.Minute

// Istiod is one running pilot-discovery.
type Istiod struct {
	// XDSAddr is the plaintext gRPC xDS address (host:port).
	XDSAddr string
	// HTTPAddr serves /ready and istiod's debug endpoints (/debug/...).
	HTTPAddr string
	// MonitoringAddr serves /metrics.
	MonitoringAddr string
	// Version is the istio.io/istio module version of the binary.
	Version string
	// ProxyVersion is the Istio release (VERSION file of the module, e.g.
	// "1.31") that fake sidecars should claim in ISTIO_VERSION.
	ProxyVersion string
	// CRDs is the path of the Istio CRD file that was applied.
	CRDs string

	log       string
	cmd       *exec.Cmd
	done      chan struct{}
	err       error
	removeDir string // Run's directory, removed by Stop
}

// Binary is the cached pilot-discovery ($SIDELANE_CACHE/bin, default
// ~/.cache/sidelane/bin), built with hack/install-tools.sh istiod if missing.
func Binary() (string, error) {
	if bin, err := CachedBinary(); err == nil {
		return bin, nil
	}
	bin := filepath.Join(cacheDir(), "bin", "pilot-discovery")
	root, err := kubeharness.RepoRoot()
	if err != nil {
		return "", fmt.Errorf("pilot-discovery not in %s and hack/install-tools.sh cannot be found: %w", filepath.Dir(bin), err)
	}
	cmd := exec.Command(filepath.Join(root, "hack", "install-tools.sh"), "istiod")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("hack/install-tools.sh istiod: %w", err)
	}
	if !isExecutable(bin) {
		return "", fmt.Errorf("hack/install-tools.sh istiod finished but %s is missing", bin)
	}
	return bin, nil
}

// cacheDir is $SIDELANE_CACHE, by default ~/.cache/sidelane.
func cacheDir() string {
	if cache := os.Getenv("SIDELANE_CACHE"); cache != "" {
		return cache
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".cache", "sidelane")
}

// ModuleDir returns the istio.io/istio module directory and version the
// binary was built from (read from its build info, so the CRDs always match
// the binary), downloading the module into the module cache if needed.
func ModuleDir(bin string) (dir, version string, err error) {
	bi, err := buildinfo.ReadFile(bin)
	if err != nil {
		return "", "", fmt.Errorf("build info of %s: %w", bin, err)
	}
	if bi.Main.Path != "istio.io/istio" || bi.Main.Version == "" || bi.Main.Version == "(devel)" {
		return "", "", fmt.Errorf("%s was not built from a released istio.io/istio module (main module %q %q)", bin, bi.Main.Path, bi.Main.Version)
	}
	version = bi.Main.Version
	out, err := exec.Command("go", "env", "GOMODCACHE").Output()
	if err != nil {
		return "", "", fmt.Errorf("go env GOMODCACHE: %w", err)
	}
	dir = filepath.Join(strings.TrimSpace(string(out)), "istio.io", "istio@"+version)
	if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
		return dir, version, nil
	}
	// Not in the cache (cleaned since the build): fetch it, outside any
	// module so no go.mod is touched.
	cmd := exec.Command("go", "mod", "download", "-json", "istio.io/istio@"+version)
	cmd.Dir = os.TempDir()
	cmd.Env = append(os.Environ(), "GO111MODULE=on", "GOFLAGS=-mod=mod")
	out, err = cmd.Output()
	if err != nil {
		return "", "", fmt.Errorf("go mod download istio.io/istio@%s: %w", version, err)
	}
	var m struct{ Dir string }
	if err := json.Unmarshal(out, &m); err != nil || m.Dir == "" {
		return "", "", fmt.Errorf("go mod download istio.io/istio@%s: no Dir in %q", version, out)
	}
	return m.Dir, version, nil
}

// CachedBinary is the cached pilot-discovery, or an error naming where it
// is missing; unlike Binary it never builds it (a build takes many
// minutes), for callers that skip instead, like the benchmarks.
func CachedBinary() (string, error) {
	bin := filepath.Join(cacheDir(), "bin", "pilot-discovery")
	if !isExecutable(bin) {
		return "", fmt.Errorf("pilot-discovery not in %s (make istiod)", filepath.Dir(bin))
	}
	return bin, nil
}

// Options configure Run.
type Options struct {
	// Binary is the pilot-discovery to run; empty: Binary(), which builds
	// it if it is missing.
	Binary string
	// Env adds or overrides istiod environment variables (feature flags).
	Env []string
}

// Start applies Istio's CRDs to c, starts istiod against it, waits for its
// /ready, and stops it in t.Cleanup (its log is printed if the test failed).
// env adds or overrides istiod environment variables (feature flags).
func Start(t testing.TB, c *kubeharness.Cluster, env ...string) *Istiod {
	t.Helper()
	i, err := start(t.TempDir(), c, Options{Env: env})
	if err != nil {
		t.Fatalf("istiodharness: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("istiodharness: istiod log tail:\n%s", i.Tail(8192))
		}
		i.Stop()
	})
	return i
}

// Run is Start for callers that are not tests (benchmarks): istiod's files
// go to a new temporary directory, and the caller must call Stop, which
// also removes it.
func Run(c *kubeharness.Cluster, opts Options) (*Istiod, error) {
	dir, err := os.MkdirTemp("", "istiodharness-")
	if err != nil {
		return nil, err
	}
	i, err := start(dir, c, opts)
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	i.removeDir = dir
	return i, nil
}

func start(dir string, c *kubeharness.Cluster, opts Options) (*Istiod, error) {
	bin := opts.Binary
	if bin == "" {
		var err error
		if bin, err = Binary(); err != nil {
			return nil, err
		}
	}
	mod, version, err := ModuleDir(bin)
	if err != nil {
		return nil, err
	}
	i := &Istiod{Version: version, CRDs: filepath.Join(mod, "manifests", "charts", "base", "files", "crd-all.gen.yaml")}
	if v, err := os.ReadFile(filepath.Join(mod, "VERSION")); err == nil {
		i.ProxyVersion = strings.TrimSpace(string(v))
	}
	if err := applyCRDs(c, i.CRDs); err != nil {
		return nil, err
	}
	kube, err := kubernetes.NewForConfig(c.RESTConfig)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err = kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: Namespace}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return nil, fmt.Errorf("create namespace %s: %w", Namespace, err)
	}
	mesh := filepath.Join(dir, "mesh.yaml")
	networks := filepath.Join(dir, "meshNetworks.yaml")
	if err := os.WriteFile(mesh, []byte("trustDomain: cluster.local\nrootNamespace: "+Namespace+"\n"), 0o600); err != nil {
		return nil, err
	}
	if err := os.WriteFile(networks, []byte("networks: {}\n"), 0o600); err != nil {
		return nil, err
	}

	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		ports, err := freePorts(3)
		if err != nil {
			return nil, err
		}
		i.HTTPAddr = "127.0.0.1:" + strconv.Itoa(ports[0])
		i.XDSAddr = "127.0.0.1:" + strconv.Itoa(ports[1])
		i.MonitoringAddr = "127.0.0.1:" + strconv.Itoa(ports[2])
		i.log = filepath.Join(dir, fmt.Sprintf("istiod-%d.log", attempt))
		args := []string{
			"discovery",
			"--registries=Kubernetes",
			"--kubeconfig=" + c.Kubeconfig,
			"--meshConfig=" + mesh,
			"--networksConfig=" + networks,
			"--namespace=" + Namespace,
			"--domain=cluster.local",
			"--clusterID=" + ClusterID,
			"--httpAddr=" + i.HTTPAddr,
			"--grpcAddr=" + i.XDSAddr,
			"--monitoringAddr=" + i.MonitoringAddr,
			// No TLS ports: webhooks multiplex on httpAddr, no secure xDS.
			"--httpsAddr=",
			"--secureGRPCAddr=",
			"--shutdownDuration=1s",
			"--profile=false",
		}
		environ := append(os.Environ(),
			"ENABLE_CA_SERVER=false",
			"PILOT_CERT_PROVIDER=none",
			"INJECT_ENABLED=false",
			"POD_NAMESPACE="+Namespace,
			"POD_NAME=istiod-harness",
			"CLUSTER_ID="+ClusterID,
			// No Gateway API CRDs are installed.
			"PILOT_ENABLE_GATEWAY_API=false",
			"PILOT_ENABLE_GATEWAY_API_STATUS=false",
			"PILOT_ENABLE_GATEWAY_API_DEPLOYMENT_CONTROLLER=false",
			"VALIDATION_WEBHOOK_CONFIG_NAME=",
		)
		environ = append(environ, opts.Env...)
		if err := i.run(bin, args, environ); err != nil {
			return nil, fmt.Errorf("start pilot-discovery: %w", err)
		}
		if err := i.waitReady(readyTimeout); err != nil {
			i.Stop()
			lastErr = fmt.Errorf("istiod (xds %s): %w\n%s", i.XDSAddr, err, i.Tail(4096))
			continue
		}
		return i, nil
	}
	return nil, lastErr
}

func applyCRDs(c *kubeharness.Cluster, file string) error {
	for _, args := range [][]string{
		{"apply", "--server-side", "-f", file},
		{"wait", "--for=condition=Established", "--timeout=120s", "-f", file},
	} {
		cmd := exec.Command(c.Kubectl, append([]string{"--kubeconfig", c.Kubeconfig}, args...)...)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("kubectl %s %s: %w\n%s", args[0], file, err, out.String())
		}
	}
	return nil
}

// run starts the child from a goroutine locked to its OS thread: the
// parent-death signal fires when the thread that forked exits (see
// kubeharness.startProcess).
func (i *Istiod) run(bin string, args, env []string) error {
	f, err := os.OpenFile(i.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	i.done = make(chan struct{})
	i.cmd = exec.Command(bin, args...)
	i.cmd.Env = env
	i.cmd.Stdout, i.cmd.Stderr = f, f
	i.cmd.SysProcAttr = sysProcAttr()
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer f.Close()
		if err := i.cmd.Start(); err != nil {
			started <- err
			close(i.done)
			runtime.UnlockOSThread()
			return
		}
		started <- nil
		i.err = i.cmd.Wait()
		close(i.done)
	}()
	return <-started
}

// waitReady polls /ready until it answers 200, istiod exits, or timeout.
func (i *Istiod) waitReady(timeout time.Duration) error {
	client := &http.Client{Timeout: 5 * time.Second}
	var last string
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(250 * time.Millisecond) {
		select {
		case <-i.done:
			return fmt.Errorf("pilot-discovery exited: %v", i.err)
		default:
		}
		resp, err := client.Get("http://" + i.HTTPAddr + "/ready")
		if err != nil {
			last = err.Error()
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			return nil
		}
		last = fmt.Sprintf("HTTP %d: %s", resp.StatusCode, body)
	}
	return fmt.Errorf("/ready not OK after %s (last: %s)", timeout, last)
}

// Metrics returns istiod's Prometheus text exposition.
func (i *Istiod) Metrics(ctx context.Context) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+i.MonitoringAddr+"/metrics", nil)
	if err != nil {
		return "", err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", fmt.Errorf("istiod metrics: %w", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", fmt.Errorf("istiod metrics: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("istiod metrics: HTTP %d", resp.StatusCode)
	}
	return string(b), nil
}

// Stop sends SIGTERM and, after 15 s, SIGKILL, and removes Run's
// directory. It is idempotent.
func (i *Istiod) Stop() {
	i.stopProcess()
	if i.removeDir != "" {
		os.RemoveAll(i.removeDir)
		i.removeDir = ""
	}
}

func (i *Istiod) stopProcess() {
	if i.cmd == nil || i.cmd.Process == nil {
		return
	}
	select {
	case <-i.done:
		return
	default:
	}
	_ = i.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-i.done:
	case <-time.After(15 * time.Second):
		_ = i.cmd.Process.Kill()
		<-i.done
	}
}

// Exited reports whether istiod has exited (and with what).
func (i *Istiod) Exited() (bool, error) {
	select {
	case <-i.done:
		return true, i.err
	default:
		return false, nil
	}
}

// Tail returns the last n bytes of istiod's log.
func (i *Istiod) Tail(n int64) string {
	f, err := os.Open(i.log)
	if err != nil {
		return ""
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return ""
	}
	off := max(fi.Size()-n, 0)
	buf := make([]byte, fi.Size()-off)
	_, _ = f.ReadAt(buf, off)
	return string(buf)
}

// Log returns istiod's whole log.
func (i *Istiod) Log() string {
	b, _ := os.ReadFile(i.log)
	return string(b)
}

func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("reserve a loopback port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

// Validate runs obj through istiod's own config validation (its validating
// webhook, served on HTTPAddr since the TLS port is off), as the
// kube-apiserver would on create. It returns whether istiod allows obj and
// its message and warnings.
func (i *Istiod) Validate(ctx context.Context, obj *unstructured.Unstructured) (allowed bool, message string, warnings []string, err error) {
	raw, err := obj.MarshalJSON()
	if err != nil {
		return false, "", nil, err
	}
	gvk := obj.GroupVersionKind()
	review := admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request: &admissionv1.AdmissionRequest{
			UID:       k8stypes.UID("sidelane-" + obj.GetName()),
			Kind:      metav1.GroupVersionKind{Group: gvk.Group, Version: gvk.Version, Kind: gvk.Kind},
			Namespace: obj.GetNamespace(),
			Name:      obj.GetName(),
			Operation: admissionv1.Create,
			Object:    k8sruntime.RawExtension{Raw: raw},
		},
	}
	body, err := json.Marshal(review)
	if err != nil {
		return false, "", nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+i.HTTPAddr+"/validate", bytes.NewReader(body))
	if err != nil {
		return false, "", nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return false, "", nil, fmt.Errorf("istiod validation: %w", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return false, "", nil, fmt.Errorf("istiod validation: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return false, "", nil, fmt.Errorf("istiod validation: HTTP %d: %s", resp.StatusCode, b)
	}
	var out admissionv1.AdmissionReview
	if err := json.Unmarshal(b, &out); err != nil || out.Response == nil {
		return false, "", nil, fmt.Errorf("istiod validation: bad response %q: %v", b, err)
	}
	if out.Response.Result != nil {
		message = out.Response.Result.Message
	}
	return out.Response.Allowed, message, out.Response.Warnings, nil
}
