package istiocni

import (
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
