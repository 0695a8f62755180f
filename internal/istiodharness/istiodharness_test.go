package istiodharness

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/sidelane/sidelane/internal/kubeharness"
)

// TestBinaryIsThePinnedIstio: the cached pilot-discovery is the Istio
// version hack/install-tools.sh pins (the one pilot-agent is built from),
// and its module has the CRD file the harness applies.
func TestBinaryIsThePinnedIstio(t *testing.T) {
	root, err := kubeharness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	script, err := os.ReadFile(filepath.Join(root, "hack", "install-tools.sh"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^ISTIO_VERSION=(\S+)$`).FindSubmatch(script)
	if m == nil {
		t.Fatal("no ISTIO_VERSION= in hack/install-tools.sh")
	}
	bin, err := Binary()
	if err != nil {
		t.Fatal(err)
	}
	dir, version, err := ModuleDir(bin)
	if err != nil {
		t.Fatal(err)
	}
	if version != string(m[1]) {
		t.Errorf("%s is istio.io/istio %s, hack/install-tools.sh pins %s (rerun it)", bin, version, m[1])
	}
	if _, err := os.Stat(filepath.Join(dir, "manifests", "charts", "base", "files", "crd-all.gen.yaml")); err != nil {
		t.Errorf("istio CRDs: %v", err)
	}
}

// Run (the entry point for non-tests) starts istiod, a long-lived
// ListenerWatch gets its LDS push and then a new one when the
// configuration changes, and Stop ends istiod and removes Run's files.
func TestRunAndWatch(t *testing.T) {
	bin, err := CachedBinary()
	if err != nil {
		t.Skip(err) // TestBinaryIsThePinnedIstio builds and checks it
	}
	cl := kubeharness.Start(t)
	ist, err := Run(cl, Options{Binary: bin})
	if err != nil {
		t.Fatal(err)
	}
	defer ist.Stop()
	dir := ist.removeDir
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("Run's directory: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	kube := kubernetes.NewForConfigOrDie(cl.RESTConfig)
	if _, err := kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	w, err := ist.WatchListeners(ctx, Proxy{IP: "10.10.0.10", Pod: "api-0", Namespace: "shop", Labels: map[string]string{"app": "api"}})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	first, err := w.Next()
	if err != nil {
		t.Fatal(err)
	}
	if len(first.Listeners) == 0 || first.At.IsZero() {
		t.Fatalf("first push: %d listeners at %v", len(first.Listeners), first.At)
	}
	// A Service in the namespace adds an outbound listener: istiod pushes
	// again on the same stream.
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "shop"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 7777}}},
	}
	if _, err := kube.CoreV1().Services("shop").Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for {
		p, err := w.Next()
		if err != nil {
			t.Fatalf("no push with the new service's listener: %v (had %s)", err, ListenerNames(first.Listeners))
		}
		if strings.Contains(ListenerNames(p.Listeners), "_7777") {
			break
		}
	}
	ist.Stop()
	if exited, _ := ist.Exited(); !exited {
		t.Error("istiod still running after Stop")
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("Stop left %s: %v", dir, err)
	}
}

func TestCachedBinaryDoesNotBuild(t *testing.T) {
	empty := t.TempDir()
	t.Setenv("SIDELANE_CACHE", empty)
	if _, err := CachedBinary(); err == nil || !strings.Contains(err.Error(), filepath.Join(empty, "bin")) {
		t.Fatalf("CachedBinary = %v, want an error naming %s/bin", err, empty)
	}
	if _, err := os.Stat(filepath.Join(empty, "bin", "pilot-discovery")); !os.IsNotExist(err) {
		t.Fatalf("CachedBinary built something: %v", err)
	}
}
