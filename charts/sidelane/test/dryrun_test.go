package charttest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sidelane/sidelane/cni"
	"github.com/sidelane/sidelane/internal/kubeharness"
)

type kubectl struct {
	t          *testing.T
	bin, kcfg  string
	kubeconfig string
}

func (k kubectl) run(args ...string) (string, error) {
	k.t.Helper()
	cmd := exec.Command(k.bin, append([]string{"--kubeconfig", k.kcfg}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (k kubectl) must(args ...string) string {
	k.t.Helper()
	out, err := k.run(args...)
	if err != nil {
		k.t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// TestServerSideDryRun applies the chart's CRDs to a real kube-apiserver,
// then dry-runs every value set's rendered manifests with strict
// validation, so a field the API does not know or a value it rejects (for
// example Bidirectional mount propagation in an unprivileged container)
// fails here instead of at install time.
func TestServerSideDryRun(t *testing.T) {
	c := kubeharness.Start(t)
	k := kubectl{t: t, bin: c.Kubectl, kcfg: c.Kubeconfig}
	k.must("create", "namespace", namespace)

	crds, _ := filepath.Glob(filepath.Join(chartDir(t), "crds", "*.yaml"))
	for _, f := range crds {
		k.must("apply", "--server-side", "-f", f)
	}
	if len(crds) > 0 {
		k.must("wait", "--for=condition=Established", "crd", "--all", "--timeout=120s")
	} else {
		t.Log("charts/sidelane/crds holds no CRD yet; dry-running the templates alone")
	}

	dryRun := func(t *testing.T, manifest []byte) (string, error) {
		f := filepath.Join(t.TempDir(), "manifest.yaml")
		if err := os.WriteFile(f, manifest, 0o644); err != nil {
			t.Fatal(err)
		}
		return k.run("apply", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", f)
	}
	for name, values := range valueSets(t) {
		t.Run(name, func(t *testing.T) {
			out, err := render(t, values)
			if err != nil {
				t.Fatalf("helm template: %v\n%s", err, out)
			}
			res, err := dryRun(t, out)
			if err != nil {
				t.Fatalf("server-side dry-run: %v\n%s", err, res)
			}
			if !strings.Contains(res, "daemonset.apps/") || !strings.Contains(res, "(server dry run)") {
				t.Errorf("dry-run output lacks the DaemonSet:\n%s", res)
			}
		})
	}

	// The check can fail: an unknown field and a privileged-only mount
	// option are rejected.
	t.Run("rejects bad manifests", func(t *testing.T) {
		out, err := render(t, valueSets(t)["default"])
		if err != nil {
			t.Fatal(err)
		}
		for _, bad := range []struct{ from, to, want string }{
			{"hostNetwork: true", "hostNetwork: true\n      hostNetworking: true", "hostNetworking"},
			{"mountPropagation: HostToContainer", "mountPropagation: Bidirectional", "Bidirectional"},
		} {
			res, err := dryRun(t, []byte(strings.Replace(string(out), bad.from, bad.to, 1)))
			if err == nil || !strings.Contains(res, bad.want) {
				t.Errorf("dry-run of a manifest with %q: err=%v\n%s", bad.to, err, res)
			}
		}
	})
}

// TestRBACIsLeast installs the chart's RBAC for real and checks, as the
// agent's service account (through a kubeconfig rendered by install-cni's
// cni.Kubeconfig), what it can and cannot do.
func TestRBACIsLeast(t *testing.T) {
	c := kubeharness.Start(t)
	admin := kubectl{t: t, bin: c.Kubectl, kcfg: c.Kubeconfig}
	admin.must("create", "namespace", namespace)
	out, err := render(t, valueSets(t)["default"])
	if err != nil {
		t.Fatalf("helm template: %v\n%s", err, out)
	}
	f := filepath.Join(t.TempDir(), "manifest.yaml")
	if err := os.WriteFile(f, out, 0o644); err != nil {
		t.Fatal(err)
	}
	admin.must("apply", "--server-side", "-n", namespace, "-f", f)

	token := strings.TrimSpace(admin.must("create", "token", "sidelane", "-n", namespace))
	ca := c.RESTConfig.CAData
	if len(ca) == 0 && c.RESTConfig.CAFile != "" {
		if ca, err = os.ReadFile(c.RESTConfig.CAFile); err != nil {
			t.Fatal(err)
		}
	}
	kc, err := cni.Kubeconfig(c.Server, ca, []byte(token))
	if err != nil {
		t.Fatal(err)
	}
	kcPath := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kcPath, kc, 0o600); err != nil {
		t.Fatal(err)
	}
	agent := kubectl{t: t, bin: c.Kubectl, kcfg: kcPath}
	if who := agent.must("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"); who != "system:serviceaccount:"+namespace+":sidelane" {
		t.Fatalf("install-cni's kubeconfig authenticates as %q", who)
	}
	// SelfSubjectAccessReviews name group and resource explicitly, so they
	// work without the L7Policy and EnvoyFilter CRDs installed.
	tests := []struct {
		verb, group, resource, sub, ns string
		want                           bool
	}{
		{"list", "", "pods", "", "", true},
		{"watch", "", "namespaces", "", "", true},
		{"patch", "", "nodes", "", "", true},
		{"create", "", "events", "", "default", true},
		{"patch", "events.k8s.io", "events", "", "default", true},
		{"watch", "sidelane.io", "l7policies", "", "", true},
		{"patch", "sidelane.io", "l7policies", "status", "default", true},
		{"create", "networking.istio.io", "envoyfilters", "", "default", true},
		{"delete", "networking.istio.io", "envoyfilters", "", "default", true},
		{"update", "coordination.k8s.io", "leases", "", namespace, true},
		// and nothing more
		{"update", "coordination.k8s.io", "leases", "", "kube-system", false},
		{"delete", "", "pods", "", "default", false},
		{"create", "", "pods", "", "default", false},
		{"update", "", "nodes", "", "", false},
		{"delete", "", "nodes", "", "", false},
		{"get", "", "secrets", "", namespace, false},
		{"list", "", "configmaps", "", "default", false},
		{"create", "sidelane.io", "l7policies", "", "default", false},
		{"update", "sidelane.io", "l7policies", "", "default", false},
		{"update", "rbac.authorization.k8s.io", "clusterroles", "", "", false},
	}
	for _, tc := range tests {
		review := fmt.Sprintf(`{"apiVersion":"authorization.k8s.io/v1","kind":"SelfSubjectAccessReview","spec":{"resourceAttributes":{"verb":%q,"group":%q,"resource":%q,"subresource":%q,"namespace":%q}}}`,
			tc.verb, tc.group, tc.resource, tc.sub, tc.ns)
		f := filepath.Join(t.TempDir(), "review.json")
		if err := os.WriteFile(f, []byte(review), 0o644); err != nil {
			t.Fatal(err)
		}
		res := agent.must("create", "--validate=false", "-f", f, "-o", "jsonpath={.status.allowed}")
		if got := strings.TrimSpace(res) == "true"; got != tc.want {
			t.Errorf("agent can %s %s/%s (%s) in %q: %v, want %v", tc.verb, tc.group, tc.resource, tc.sub, tc.ns, got, tc.want)
		}
	}
}
