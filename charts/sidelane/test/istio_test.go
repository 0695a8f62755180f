package charttest

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/sidelane/sidelane/internal/testenv"
)

// istioModule downloads (or finds in the module cache) istio.io/istio at
// the version hack/install-tools.sh pins, for its Helm charts.
func istioModule(t *testing.T) string {
	t.Helper()
	script, err := os.ReadFile(filepath.Join(testenv.RepoRoot(t), "hack", "install-tools.sh"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^ISTIO_VERSION=(\S+)$`).FindSubmatch(script)
	if m == nil {
		t.Fatal("ISTIO_VERSION not found in hack/install-tools.sh")
	}
	out, err := exec.Command("go", "mod", "download", "-json", "istio.io/istio@"+string(m[1])).Output()
	if err != nil {
		t.Fatalf("go mod download istio.io/istio: %v\n%s", err, out)
	}
	var mod struct{ Dir string }
	if err := json.Unmarshal(out, &mod); err != nil || mod.Dir == "" {
		t.Fatalf("go mod download: %v %s", err, out)
	}
	return mod.Dir
}

// TestIstioInstallFlags checks the README's Helm install of Istio: the
// istiod chart with pilot.cni.enabled=true hands the sidecar injector
// pilot.cni.enabled (so it injects istio-validation instead of istio-init)
// and runs no istio-cni node agent.
func TestIstioInstallFlags(t *testing.T) {
	chart := filepath.Join(istioModule(t), "manifests", "charts", "istio-control", "istio-discovery")
	out, err := helm(t, "template", "istiod", chart, "--namespace", "istio-system", "--set", "pilot.cni.enabled=true")
	if err != nil {
		t.Fatalf("helm template istiod: %v\n%s", err, out)
	}
	rendered := string(out)
	if strings.Contains(rendered, "istio-cni-node") {
		t.Error("the istiod chart alone renders an istio-cni node agent")
	}
	// The injector's values hold "pilot": {"cni": {"enabled": true, ...
	if !regexp.MustCompile(`"pilot": \{\s*"cni": \{\s*"enabled": true`).MatchString(rendered) {
		t.Error("sidecar injector values lack pilot.cni.enabled=true")
	}
	// and its template switches istio-init to istio-validation on it.
	if !strings.Contains(rendered, "if .Values.pilot.cni.enabled -}}\n") || !strings.Contains(rendered, "- name: istio-validation") {
		t.Error("injection template no longer switches to istio-validation on pilot.cni.enabled; README's Istio flags need a new look")
	}
}
