package istiocni

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestProductDoesNotImportIstio: istio.io/istio is a test dependency
// only; no command of the product may link any of its packages.
func TestProductDoesNotImportIstio(t *testing.T) {
	gomod, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	cmd := exec.Command("go", "list", "-deps", "./cmd/...")
	cmd.Dir = filepath.Dir(strings.TrimSpace(string(gomod)))
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list -deps ./cmd/...: %v", err)
	}
	deps := strings.Fields(string(out))
	if len(deps) < 100 {
		t.Fatalf("go list -deps ./cmd/... printed %d packages only: %q", len(deps), deps)
	}
	for _, p := range deps {
		if p == "istio.io/istio" || strings.HasPrefix(p, "istio.io/istio/") {
			t.Errorf("the product depends on %s", p)
		}
	}
}

// TestSameIstioAsTools: the reference's istio.io/istio is the version
// hack/install-tools.sh builds pilot-agent (and istiod) from.
func TestSameIstioAsTools(t *testing.T) {
	gomod, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	root := filepath.Dir(strings.TrimSpace(string(gomod)))
	script, err := os.ReadFile(filepath.Join(root, "hack", "install-tools.sh"))
	if err != nil {
		t.Fatal(err)
	}
	var pinned string
	for _, l := range strings.Split(string(script), "\n") {
		if v, ok := strings.CutPrefix(l, "ISTIO_VERSION="); ok {
			pinned = strings.Trim(v, `"'`)
		}
	}
	cmd := exec.Command("go", "list", "-m", "-f", "{{.Version}}", "istio.io/istio")
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list -m istio.io/istio: %v", err)
	}
	if got := strings.TrimSpace(string(out)); pinned == "" || got != pinned {
		t.Errorf("go.mod has istio.io/istio %s, hack/install-tools.sh pins ISTIO_VERSION=%q", got, pinned)
	}
}
