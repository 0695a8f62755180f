package controller

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"github.com/sidelane/sidelane/internal/kubeharness"
	"github.com/sidelane/sidelane/internal/testenv"
	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/input"
)

// env is a real kube-apiserver with Istio's and sidelane's CRDs, the
// namespace "shop" for policies and pods, and "sidelane-system" for the
// Lease.
type env struct {
	t    *testing.T
	ctx  context.Context
	c    *kubeharness.Cluster
	kube kubernetes.Interface
	dyn  dynamic.Interface
}

const leaseNS = "sidelane-system"

func newEnv(t *testing.T) *env {
	t.Helper()
	e := newEnvWithoutCRDs(t)
	e.installCRDs()
	return e
}

func (e *env) installCRDs() {
	e.t.Helper()
	kubectl(e.t, e.c, "apply", "--server-side", "-f", istioCRDs(e.t))
	kubectl(e.t, e.c, "apply", "--server-side", "-f", "../../charts/sidelane/crds/sidelane.io_l7policies.yaml")
	kubectl(e.t, e.c, "wait", "--for=condition=Established", "--timeout=120s", "crd/envoyfilters.networking.istio.io", "crd/l7policies.sidelane.io")
}

func newEnvWithoutCRDs(t *testing.T) *env {
	t.Helper()
	testenv.Privileged(t)
	c := kubeharness.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	e := &env{t: t, ctx: ctx, c: c, kube: kubernetes.NewForConfigOrDie(c.RESTConfig), dyn: dynamic.NewForConfigOrDie(c.RESTConfig)}
	for _, ns := range []string{"shop", leaseNS} {
		if _, err := e.kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	return e
}

func kubectl(t *testing.T, c *kubeharness.Cluster, args ...string) {
	t.Helper()
	cmd := exec.Command(c.Kubectl, append([]string{"--kubeconfig", c.Kubeconfig}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out.String())
	}
}

func istioCRDs(t *testing.T) string {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/api").Output()
	if err != nil {
		t.Fatalf("locate istio.io/api: %v", err)
	}
	return strings.TrimSpace(string(out)) + "/kubernetes/customresourcedefinitions.gen.yaml"
}

func (e *env) pod(name, app string) {
	e.t.Helper()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "shop", Labels: map[string]string{"app": app}},
		Spec:       corev1.PodSpec{ServiceAccountName: app, Containers: []corev1.Container{{Name: "app", Image: "app"}}},
	}
	if _, err := e.kube.CoreV1().Pods("shop").Create(e.ctx, pod, metav1.CreateOptions{}); err != nil {
		e.t.Fatal(err)
	}
}

const policyYAML = `apiVersion: sidelane.io/v1alpha1
kind: L7Policy
metadata: {name: %s, namespace: shop}
spec:
  podSelector: {matchLabels: {app: %s}}
  ports:
%s`

func (e *env) policies() dynamic.ResourceInterface {
	return e.dyn.Resource(input.L7PolicyGVR).Namespace("shop")
}

func (e *env) filters() dynamic.ResourceInterface {
	return e.dyn.Resource(EnvoyFilterGVR).Namespace("shop")
}

// apply server-side applies the policy name selecting app=app.
func (e *env) apply(name, app, ports string) *unstructured.Unstructured {
	e.t.Helper()
	var u unstructured.Unstructured
	if err := yaml.Unmarshal([]byte(fmt.Sprintf(policyYAML, name, app, ports)), &u.Object); err != nil {
		e.t.Fatal(err)
	}
	out, err := e.policies().Apply(e.ctx, name, &u, metav1.ApplyOptions{FieldManager: "test", Force: true})
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

func (e *env) policy(name string) *v1alpha1.L7Policy {
	u, err := e.policies().Get(e.ctx, name, metav1.GetOptions{})
	if err != nil {
		return &v1alpha1.L7Policy{}
	}
	var p v1alpha1.L7Policy
	_ = runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &p)
	return &p
}

// eventually polls cond until it returns "" (or the deadline).
func (e *env) eventually(what string, cond func() string) {
	e.t.Helper()
	var last string
	for deadline := time.Now().Add(90 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if last = cond(); last == "" {
			return
		}
	}
	e.t.Fatalf("%s: %s", what, last)
}

// controllerProc is one `sidelane controller` process.
type controllerProc struct {
	id, metrics, log string
	cmd              *exec.Cmd
	done             chan struct{}
}

// Short lease timings, so a killed leader is replaced within seconds.
var fastLease = []string{"--lease-duration", "3s", "--renew-deadline", "2s", "--retry-period", "500ms"}

// startController runs the real binary (make build) as replica id and
// waits for its /readyz.
func (e *env) startController(id string, extra ...string) *controllerProc {
	e.t.Helper()
	return e.startControllerOpt(id, true, extra...)
}

// startControllerOpt starts replica id and, with waitReady, waits for
// its /readyz.
func (e *env) startControllerOpt(id string, waitReady bool, extra ...string) *controllerProc {
	e.t.Helper()
	p := &controllerProc{id: id, metrics: freePort(e.t), log: filepath.Join(e.t.TempDir(), id+".log"), done: make(chan struct{})}
	logf, err := os.Create(p.log)
	if err != nil {
		e.t.Fatal(err)
	}
	args := append([]string{"controller", "--kubeconfig", e.c.Kubeconfig, "--namespace", leaseNS, "--identity", id,
		"--metrics-addr", p.metrics, "--log-level", "debug"}, extra...)
	p.cmd = exec.Command(filepath.Join(testenv.SidelaneBin(e.t), "sidelane"), args...)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	go func() { _ = p.cmd.Wait(); logf.Close(); close(p.done) }()
	e.t.Cleanup(func() {
		p.stop()
		if e.t.Failed() {
			b, _ := os.ReadFile(p.log)
			e.t.Logf("controller %s log tail:\n%s", id, tail(string(b), 3000))
		}
	})
	if !waitReady {
		return p
	}
	e.eventually("controller "+id+" ready", func() string {
		select {
		case <-p.done:
			b, _ := os.ReadFile(p.log)
			e.t.Fatalf("controller %s exited:\n%s", id, b)
		default:
		}
		if code := p.get("/readyz"); code != 200 {
			return fmt.Sprintf("/readyz %d", code)
		}
		return ""
	})
	return p
}

func (p *controllerProc) get(path string) int {
	code, _ := p.fetch(path)
	return code
}

// fetch returns the status code and body of one GET (0 when unreachable).
func (p *controllerProc) fetch(path string) (int, string) {
	conn, err := net.DialTimeout("tcp", p.metrics, time.Second)
	if err != nil {
		return 0, ""
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	fmt.Fprintf(conn, "GET %s HTTP/1.0\r\n\r\n", path)
	b, err := io.ReadAll(bufio.NewReader(conn))
	if err != nil {
		return 0, ""
	}
	head, body, _ := strings.Cut(string(b), "\r\n\r\n")
	var code int
	if _, err := fmt.Sscanf(head, "HTTP/1.%d %d", new(int), &code); err != nil {
		return 0, ""
	}
	return code, body
}

// stop ends the process gracefully (it releases the Lease).
func (p *controllerProc) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// kill ends the process at once, as a crash or a node loss would: the
// Lease is not released.
func (p *controllerProc) kill() {
	_ = p.cmd.Process.Kill()
	<-p.done
}

func freePort(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func (e *env) leaseHolder() string {
	l, err := e.kube.CoordinationV1().Leases(leaseNS).Get(e.ctx, LeaseName, metav1.GetOptions{})
	if err != nil || l.Spec.HolderIdentity == nil {
		return ""
	}
	return *l.Spec.HolderIdentity
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}
