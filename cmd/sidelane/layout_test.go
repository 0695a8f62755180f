package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestNodeAgentLinksNoClusterWriter: the node agent's packages (agent/...)
// must not link the cluster-wide writer (policy/controller, which writes
// EnvoyFilters and policy status, nor policy/envoyfilter). Both commands
// share one binary, but the split of duties shows in the import graph, and
// this test fails when a node-local package starts depending on the writer.
func TestNodeAgentLinksNoClusterWriter(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/sidelane/sidelane/agent/...").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	deps := strings.Fields(string(out))
	if len(deps) < 20 {
		t.Fatalf("go list -deps found only %d packages", len(deps))
	}
	for _, d := range deps {
		for _, banned := range []string{"github.com/sidelane/sidelane/policy/controller", "github.com/sidelane/sidelane/policy/envoyfilter"} {
			if d == banned {
				t.Errorf("a node agent package depends on %s (cluster-wide writer code)", banned)
			}
		}
	}
}
