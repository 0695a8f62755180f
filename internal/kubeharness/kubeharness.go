// Package kubeharness runs a real Kubernetes control plane for tests, the demo
// and the benchmarks: etcd (Debian's etcd-server) and a kube-apiserver built
// from the module proxy by hack/build-kube-apiserver.sh. There is no
// scheduler or controller-manager: callers bind pods (spec.nodeName) and
// patch their status themselves (see internal/kubelet).
//
// Every cluster gets free loopback ports, its own etcd data directory, a
// fresh serving CA, a fresh service-account key and an admin token, so tests
// and test binaries running in parallel never share state.
package kubeharness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// KubeVersion is the Kubernetes release hack/build-kube-apiserver.sh builds.
const KubeVersion = "v1.33.13"

// AdminUser is the user the admin token authenticates as (group system:masters).
const AdminUser = "sidelane-admin"

// readyTimeout bounds the wait for /readyz. The machine is shared and small:
// the apiserver is ready in ~4 s when idle but much later under load.
const readyTimeout = 3 * time.Minute

// Cluster is one running etcd + kube-apiserver.
type Cluster struct {
	Kubeconfig string       // path of an admin kubeconfig file (token auth)
	RESTConfig *rest.Config // same credentials
	Kubectl    string       // path of the cached kubectl binary

	// Server is the apiserver's URL (https://127.0.0.1:PORT).
	Server string
	// Dir holds the cluster's files: certificates, tokens, logs, etcd data.
	Dir string

	etcd, apiserver *process
	removeDir       bool
	stopOnce        sync.Once
}

// Start launches etcd and kube-apiserver on free loopback ports for this test (or
// test binary), waits for /readyz, and stops them in t.Cleanup. It calls
// hack/build-kube-apiserver.sh if the cached binary is missing.
func Start(t testing.TB) *Cluster {
	t.Helper()
	c, err := start(t.TempDir(), false)
	if err != nil {
		t.Fatalf("kubeharness: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kubeharness: apiserver log tail:\n%s", c.apiserver.tail(4096))
		}
		c.Stop()
	})
	return c
}

// Main runs a test binary's tests against one cluster shared by all of them,
// which saves starting one per test. Use it from TestMain:
//
//	var cluster *kubeharness.Cluster
//	func TestMain(m *testing.M) { os.Exit(kubeharness.Main(m, &cluster)) }
//
// It stores the cluster in *c before the tests run and stops it after.
func Main(m *testing.M, c **Cluster) int {
	cl, err := Run()
	if err != nil {
		fmt.Fprintf(os.Stderr, "kubeharness: %v\n", err)
		return 1
	}
	*c = cl
	defer cl.Stop()
	return m.Run()
}

// Run starts a cluster that is not tied to a test (TestMain, the demo,
// benchmarks). The caller must call Stop, which also removes its files.
func Run() (*Cluster, error) {
	dir, err := os.MkdirTemp("", "kubeharness-")
	if err != nil {
		return nil, err
	}
	c, err := start(dir, true)
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return c, nil
}

// Stop terminates kube-apiserver, then etcd. It is idempotent.
func (c *Cluster) Stop() {
	c.stopOnce.Do(func() {
		if c.apiserver != nil {
			c.apiserver.stop()
		}
		if c.etcd != nil {
			c.etcd.stop()
		}
		if c.removeDir {
			os.RemoveAll(c.Dir)
		}
	})
}

// BinDir is where hack/build-kube-apiserver.sh caches kube-apiserver and
// kubectl: $SIDELANE_CACHE/k8s-<version>, by default under ~/.cache/sidelane.
func BinDir() string {
	cache := os.Getenv("SIDELANE_CACHE")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache", "sidelane")
	}
	return filepath.Join(cache, "k8s-"+KubeVersion)
}

func start(dir string, removeDir bool) (_ *Cluster, err error) {
	bins, err := binaries()
	if err != nil {
		return nil, err
	}
	c := &Cluster{Dir: dir, Kubectl: bins.kubectl, removeDir: removeDir}
	defer func() {
		if err != nil {
			c.removeDir = false // the caller owns dir on error
			c.Stop()
		}
	}()
	pki, err := writePKI(dir)
	if err != nil {
		return nil, err
	}

	if err := c.startEtcd(bins.etcd); err != nil {
		return nil, err
	}
	if err := c.startAPIServer(bins.apiserver, pki); err != nil {
		return nil, err
	}
	c.RESTConfig = &rest.Config{
		Host:            c.Server,
		BearerToken:     pki.adminToken,
		TLSClientConfig: rest.TLSClientConfig{CAData: pki.caPEM},
		QPS:             200,
		Burst:           400,
	}
	if err := c.waitReady(); err != nil {
		return nil, err
	}
	c.Kubeconfig = filepath.Join(dir, "kubeconfig")
	if err := writeKubeconfig(c.Kubeconfig, c.Server, pki); err != nil {
		return nil, err
	}
	return c, nil
}

type binPaths struct{ etcd, apiserver, kubectl string }

// Installed reports whether etcd and the cached kube-apiserver and kubectl
// are there, without building anything (Start and Run build them, which
// takes minutes): callers that must not wait for a build, like the
// benchmarks, check it first and skip.
func Installed() error {
	_, err := cachedBinaries()
	return err
}

// cachedBinaries finds etcd and the cached Kubernetes binaries. Its error
// wraps errNotBuilt when only the latter are missing.
func cachedBinaries() (binPaths, error) {
	etcd, err := exec.LookPath("etcd")
	if err != nil {
		return binPaths{}, fmt.Errorf("etcd not installed (apt-get install etcd-server): %w", err)
	}
	dir := BinDir()
	b := binPaths{etcd: etcd, apiserver: filepath.Join(dir, "kube-apiserver"), kubectl: filepath.Join(dir, "kubectl")}
	if !isExecutable(b.apiserver) || !isExecutable(b.kubectl) {
		return b, fmt.Errorf("%w: no kube-apiserver or kubectl in %s (make kube)", errNotBuilt, dir)
	}
	return b, nil
}

var errNotBuilt = errors.New("kube-apiserver not built")

// binaries finds etcd and the cached Kubernetes binaries, building the
// latter once if needed.
func binaries() (binPaths, error) {
	b, err := cachedBinaries()
	if err == nil || !errors.Is(err, errNotBuilt) {
		return b, err
	}
	dir := BinDir()
	root, err := RepoRoot()
	if err != nil {
		return binPaths{}, fmt.Errorf("kube-apiserver not in %s and the build script cannot be found: %w", dir, err)
	}
	cmd := exec.Command(filepath.Join(root, "hack", "build-kube-apiserver.sh"))
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return binPaths{}, fmt.Errorf("build kube-apiserver: %w", err)
	}
	if !isExecutable(b.apiserver) || !isExecutable(b.kubectl) {
		return binPaths{}, fmt.Errorf("hack/build-kube-apiserver.sh finished but %s lacks kube-apiserver or kubectl", dir)
	}
	return b, nil
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

// RepoRoot finds the module root from this source file (normal builds) or
// the working directory (tests always run inside the module).
func RepoRoot() (string, error) {
	var starts []string
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		starts = append(starts, filepath.Dir(file))
	}
	if wd, err := os.Getwd(); err == nil {
		starts = append(starts, wd)
	}
	for _, dir := range starts {
		for {
			if _, err := os.Stat(filepath.Join(dir, "hack", "build-kube-apiserver.sh")); err == nil {
				return dir, nil
			}
			parent := filepath.Dir(dir)
			if parent == dir {
				break
			}
			dir = parent
		}
	}
	return "", errors.New("no hack/build-kube-apiserver.sh above the source or working directory")
}

// freePorts reserves n distinct loopback ports. They are released before the
// servers bind them; the small race with other processes is handled by
// retrying the start.
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

func (c *Cluster) startEtcd(bin string) error {
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		ports, err := freePorts(2)
		if err != nil {
			return err
		}
		client := "http://127.0.0.1:" + strconv.Itoa(ports[0])
		peer := "http://127.0.0.1:" + strconv.Itoa(ports[1])
		data := filepath.Join(c.Dir, "etcd-data")
		os.RemoveAll(data)
		p, err := startProcess(filepath.Join(c.Dir, "etcd.log"), bin,
			"--name=kubeharness",
			"--data-dir="+data,
			"--listen-client-urls="+client,
			"--advertise-client-urls="+client,
			"--listen-peer-urls="+peer,
			"--initial-advertise-peer-urls="+peer,
			"--initial-cluster=kubeharness="+peer,
			"--log-level=warn",
		)
		if err != nil {
			return fmt.Errorf("start etcd: %w", err)
		}
		if err := waitHTTP(p, client+"/health", nil, time.Minute); err != nil {
			p.stop()
			lastErr = fmt.Errorf("etcd on %s: %w\n%s", client, err, p.tail(2048))
			continue
		}
		c.etcd = p
		c.etcd.url = client
		return nil
	}
	return lastErr
}

func (c *Cluster) startAPIServer(bin string, pki *pki) error {
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		ports, err := freePorts(1)
		if err != nil {
			return err
		}
		server := "https://127.0.0.1:" + strconv.Itoa(ports[0])
		p, err := startProcess(filepath.Join(c.Dir, "kube-apiserver.log"), bin,
			"--etcd-servers="+c.etcd.url,
			"--bind-address=127.0.0.1",
			"--advertise-address=127.0.0.1",
			"--secure-port="+strconv.Itoa(ports[0]),
			"--cert-dir="+filepath.Join(c.Dir, "apiserver-certs"),
			"--tls-cert-file="+pki.serverCert,
			"--tls-private-key-file="+pki.serverKey,
			"--client-ca-file="+pki.caCert,
			"--token-auth-file="+pki.tokenFile,
			"--authorization-mode=RBAC",
			"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
			"--service-account-key-file="+pki.saKey,
			"--service-account-signing-key-file="+pki.saKey,
			"--service-cluster-ip-range=10.96.0.0/16",
			"--disable-admission-plugins=ServiceAccount",
			"--allow-privileged=true",
			// The "kubernetes" Service would get a loopback endpoint, which
			// validation rejects every few seconds; nothing here needs it.
			"--endpoint-reconciler-type=none",
			"--profiling=false",
			"--v=0",
		)
		if err != nil {
			return fmt.Errorf("start kube-apiserver: %w", err)
		}
		// /readyz needs the CA to verify; /livez first tells us the port is ours.
		if err := waitHTTP(p, server+"/livez", pki, readyTimeout); err != nil {
			p.stop()
			lastErr = fmt.Errorf("kube-apiserver on %s: %w\n%s", server, err, p.tail(4096))
			continue
		}
		c.apiserver = p
		c.Server = server
		return nil
	}
	return lastErr
}

func (c *Cluster) waitReady() error {
	if err := waitHTTP(c.apiserver, c.Server+"/readyz", c.pkiForWait(), readyTimeout); err != nil {
		return fmt.Errorf("kube-apiserver %s not ready: %w\n%s", c.Server, err, c.apiserver.tail(4096))
	}
	return nil
}

func (c *Cluster) pkiForWait() *pki {
	return &pki{caPEM: c.RESTConfig.TLSClientConfig.CAData, adminToken: c.RESTConfig.BearerToken}
}

// waitHTTP polls url until it answers 200, the process exits, or timeout.
func waitHTTP(p *process, url string, k *pki, timeout time.Duration) error {
	client := &http.Client{Timeout: 5 * time.Second}
	if k != nil {
		tr, err := k.transport()
		if err != nil {
			return err
		}
		client.Transport = tr
	}
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		select {
		case <-p.done:
			return fmt.Errorf("process exited: %v", p.err)
		default:
		}
		req, _ := http.NewRequestWithContext(context.Background(), http.MethodGet, url, nil)
		if k != nil && k.adminToken != "" {
			req.Header.Set("Authorization", "Bearer "+k.adminToken)
		}
		resp, err := client.Do(req)
		if err == nil {
			var body bytes.Buffer
			_, _ = body.ReadFrom(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("HTTP %d: %s", resp.StatusCode, body.String())
		} else {
			last = err.Error()
		}
		time.Sleep(250 * time.Millisecond)
	}
	return fmt.Errorf("%s not healthy after %s (last: %s)", url, timeout, last)
}

func writeKubeconfig(path, server string, k *pki) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["kubeharness"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: k.caPEM}
	cfg.AuthInfos[AdminUser] = &clientcmdapi.AuthInfo{Token: k.adminToken}
	cfg.Contexts["kubeharness"] = &clientcmdapi.Context{Cluster: "kubeharness", AuthInfo: AdminUser}
	cfg.CurrentContext = "kubeharness"
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	return nil
}

// process is one child with its output in a log file.
type process struct {
	log  string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
	url  string
}

// startProcess starts bin with its output going to logPath. The child is
// started (and waited for) from a goroutine locked to its OS thread: the
// parent-death signal fires when the *thread* that forked exits, and Go
// retires threads whose goroutine exits while locked (netns code does that),
// which would otherwise kill the child in the middle of a test.
func startProcess(logPath, bin string, args ...string) (*process, error) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	p := &process{log: logPath, done: make(chan struct{})}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout, p.cmd.Stderr = f, f
	p.cmd.SysProcAttr = sysProcAttr()
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer f.Close()
		if err := p.cmd.Start(); err != nil {
			started <- err
			close(p.done)
			runtime.UnlockOSThread()
			return
		}
		started <- nil
		p.err = p.cmd.Wait()
		close(p.done)
		// The thread stays locked: the child is gone, so retiring it is fine.
	}()
	if err := <-started; err != nil {
		return nil, err
	}
	return p, nil
}

// stop sends SIGTERM and, after 15 s, SIGKILL.
func (p *process) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// tail returns the last n bytes of the process log.
func (p *process) tail(n int64) string {
	f, err := os.Open(p.log)
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
