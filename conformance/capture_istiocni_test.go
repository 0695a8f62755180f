//go:build linux

package conformance

import (
	"context"
	"strings"
	"testing"
	"time"

	"istio.io/istio/cni/pkg/plugin"

	"github.com/sidelane/sidelane/internal/istiocni"
	"github.com/sidelane/sidelane/internal/testenv"
)

// istioCNIReference is Istio itself: istio-cni's own code (package
// istio.io/istio/cni/pkg/plugin at the pinned Istio version) reads the
// injected pod (ExtractPodInfo), computes and validates the redirect
// (NewRedirect) and programs it into the pod's namespace with one of its
// rule managers (iptables: iptables-restore; nftables: knftables), the
// calls its CNI ADD makes. Nothing of sidelane's parser is involved, so
// comparing against it also checks the parser.
type istioCNIReference struct{ backend istiocni.Backend }

func (r *istioCNIReference) name() string { return "istio-cni-" + string(r.backend) }

func (r *istioCNIReference) setup(t *testing.T) {
	if r.backend == istiocni.NFTables {
		testenv.RequireTool(t, "nft")
		return
	}
	testenv.RequireTool(t, "iptables-restore")
	testenv.RequireTool(t, "ip6tables-restore")
}

func (r *istioCNIReference) validationFlags() []string {
	if r.backend == istiocni.NFTables {
		return []string{"--native-nftables"}
	}
	return nil
}

func (r *istioCNIReference) install(t *testing.T, pod *capPod) {
	t.Helper()
	redirect, err := istiocni.Redirect(pod.kube)
	switch {
	case pod.istioCNIRefuses != "":
		if err == nil {
			t.Fatalf("the case says istio-cni refuses the pod (%s), but NewRedirect accepts it", pod.istioCNIRefuses)
		}
		t.Logf("istio-cni refuses the pod as the case says (%s): %v", pod.istioCNIRefuses, err)
		return // see capCase.istioCNIRefuses
	case pod.rejects != "":
		r.checkRejected(t, pod, redirect, err)
		// Compare with Istio's defaults for the same pod, as Istio's code
		// computes them.
		if redirect, err = istiocni.Redirect(istiocni.WithoutCaptureAnnotations(pod.kube)); err != nil {
			t.Fatalf("istio-cni refuses even its defaults for the pod: %v", err)
		}
	case err != nil:
		t.Fatalf("istio-cni refuses a pod the case says it accepts: %v", err)
	}
	if err := istiocni.Program(r.backend, pod.ns.Name, pod.ns.Path, redirect); err != nil {
		t.Fatal(err)
	}
	// The namespace (and its rules) go away with the pod.
}

// checkRejected checks that istio-cni refuses pod, as the case says:
// NewRedirect's validation, or past it the rule manager (istio-iptables'
// own checks), which must then leave nothing behind.
func (r *istioCNIReference) checkRejected(t *testing.T, pod *capPod, redirect *plugin.Redirect, err error) {
	t.Helper()
	if err != nil {
		t.Logf("istio-cni's NewRedirect refuses the pod: %v", err)
		return
	}
	if err := istiocni.Program(r.backend, pod.ns.Name, pod.ns.Path, redirect); err == nil {
		t.Fatalf("the case says Istio rejects %s, but istio-cni's NewRedirect and %s Program accept it", pod.rejects, r.backend)
	} else {
		t.Logf("istio-cni's %s rule manager refuses the pod: %v", r.backend, err)
	}
	r.checkNothingLeft(t, pod)
}

// checkNothingLeft: a refused pod keeps no rule of Istio's (its
// iptables-restore and nft transactions are atomic).
func (r *istioCNIReference) checkNothingLeft(t *testing.T, pod *capPod) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmds := [][]string{{"iptables-save"}, {"ip6tables-save"}}
	if r.backend == istiocni.NFTables {
		cmds = [][]string{{"nft", "list", "tables"}}
	}
	for _, cmd := range cmds {
		out, err := pod.ns.Command(ctx, cmd[0], cmd[1:]...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(cmd, " "), err, out)
		}
		if strings.Contains(string(out), "ISTIO_") || strings.Contains(string(out), "istio-proxy") {
			t.Fatalf("istio-cni failed but left rules (%s):\n%s", strings.Join(cmd, " "), out)
		}
	}
}
