package istiodharness

import (
	"os"
	"path/filepath"
	"regexp"
	"testing"

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
