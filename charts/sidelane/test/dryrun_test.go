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

// installRBAC applies the default value set's rendered manifests to a real
// API server (the Deployment and DaemonSet never run: no nodes) and
// returns the admin's kubectl.
func installRBAC(t *testing.T, c *kubeharness.Cluster) kubectl {
	t.Helper()
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
	return admin
}

// asServiceAccount is a kubectl authenticated with a token of the service
// account sa, through a kubeconfig rendered by install-cni's
// cni.Kubeconfig (so that path is exercised too).
func asServiceAccount(t *testing.T, c *kubeharness.Cluster, admin kubectl, sa string) kubectl {
	t.Helper()
	token := strings.TrimSpace(admin.must("create", "token", sa, "-n", namespace))
	ca := c.RESTConfig.CAData
	if len(ca) == 0 && c.RESTConfig.CAFile != "" {
		var err error
		if ca, err = os.ReadFile(c.RESTConfig.CAFile); err != nil {
			t.Fatal(err)
		}
	}
	kc, err := cni.Kubeconfig(c.Server, ca, []byte(token))
	if err != nil {
		t.Fatal(err)
	}
	kcPath := filepath.Join(t.TempDir(), sa+".kubeconfig")
	if err := os.WriteFile(kcPath, kc, 0o600); err != nil {
		t.Fatal(err)
	}
	k := kubectl{t: t, bin: c.Kubectl, kcfg: kcPath}
	if who := k.must("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"); who != "system:serviceaccount:"+namespace+":"+sa {
		t.Fatalf("kubeconfig of %s authenticates as %q", sa, who)
	}
	return k
}

// canI asks the API server's authorizer with a SelfSubjectAccessReview.
// Reviews name group and resource explicitly, so they work without the
// L7Policy and EnvoyFilter CRDs installed.
func canI(t *testing.T, k kubectl, verb, group, resource, sub, ns string) bool {
	t.Helper()
	review := fmt.Sprintf(`{"apiVersion":"authorization.k8s.io/v1","kind":"SelfSubjectAccessReview","spec":{"resourceAttributes":{"verb":%q,"group":%q,"resource":%q,"subresource":%q,"namespace":%q}}}`,
		verb, group, resource, sub, ns)
	f := filepath.Join(t.TempDir(), "review.json")
	if err := os.WriteFile(f, []byte(review), 0o644); err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(k.must("create", "--validate=false", "-f", f, "-o", "jsonpath={.status.allowed}")) == "true"
}

// TestRBACIsLeast installs the chart's RBAC for real and asks the API
// server, as the agent's and as the controller's service account, what
// each may do. The node agent writes nothing cluster-wide: it is denied
// every write to EnvoyFilters (which can put any filter into any sidecar)
// and to L7Policy status, and the Lease; the controller may do exactly
// those; neither may read Secrets. Putting the old agent ClusterRole back
// (EnvoyFilter CRUD, l7policies/status, leases) fails this test.
func TestRBACIsLeast(t *testing.T) {
	c := kubeharness.Start(t)
	admin := installRBAC(t, c)
	agentSA := asServiceAccount(t, c, admin, release)
	controllerSA := asServiceAccount(t, c, admin, release+"-controller")
	const agent, controller = 1, 2 // who is allowed (bits)
	tests := []struct {
		verb, group, resource, sub, ns string
		allowed                        int
	}{
		// Node-local reads and writes of the agent.
		{"list", "", "pods", "", "", agent | controller},
		{"watch", "", "pods", "", "", agent | controller},
		{"watch", "", "namespaces", "", "", agent | controller},
		// The not-ready taint: the agent on its node, the controller on a
		// node whose agent is not Ready (both narrowed to that taint by the
		// admission policy, TestAgentNodePatchesLimited).
		{"get", "", "nodes", "", "", agent | controller},
		{"patch", "", "nodes", "", "", agent | controller},
		{"list", "", "nodes", "", "", controller},
		{"watch", "", "nodes", "", "", controller},
		{"create", "", "events", "", "default", agent | controller},
		{"patch", "events.k8s.io", "events", "", "default", agent | controller},
		{"watch", "sidelane.io", "l7policies", "", "", agent | controller},
		// The cluster-wide writes: the controller's alone.
		{"get", "networking.istio.io", "envoyfilters", "", "default", controller},
		{"list", "networking.istio.io", "envoyfilters", "", "", controller},
		{"watch", "networking.istio.io", "envoyfilters", "", "", controller},
		{"create", "networking.istio.io", "envoyfilters", "", "default", controller},
		{"update", "networking.istio.io", "envoyfilters", "", "default", controller},
		{"patch", "networking.istio.io", "envoyfilters", "", "default", controller},
		{"delete", "networking.istio.io", "envoyfilters", "", "default", controller},
		{"update", "sidelane.io", "l7policies", "status", "default", controller},
		{"patch", "sidelane.io", "l7policies", "status", "default", controller},
		{"get", "coordination.k8s.io", "leases", "", namespace, controller},
		{"create", "coordination.k8s.io", "leases", "", namespace, controller},
		{"update", "coordination.k8s.io", "leases", "", namespace, controller},
		// and nothing more, for either.
		{"update", "coordination.k8s.io", "leases", "", "kube-system", 0},
		{"delete", "coordination.k8s.io", "leases", "", namespace, 0},
		{"get", "", "secrets", "", namespace, 0},
		{"list", "", "secrets", "", "", 0},
		{"watch", "", "secrets", "", "default", 0},
		{"list", "", "configmaps", "", "default", 0},
		{"create", "", "pods", "", "default", 0},
		{"delete", "", "pods", "", "default", 0},
		{"update", "", "pods", "status", "default", 0},
		{"update", "", "nodes", "", "", 0},
		{"delete", "", "nodes", "", "", 0},
		{"patch", "", "nodes", "status", "", 0},
		{"create", "sidelane.io", "l7policies", "", "default", 0},
		{"update", "sidelane.io", "l7policies", "", "default", 0},
		{"delete", "sidelane.io", "l7policies", "", "default", 0},
		{"deletecollection", "networking.istio.io", "envoyfilters", "", "default", 0},
		{"create", "networking.istio.io", "virtualservices", "", "default", 0},
		{"create", "security.istio.io", "authorizationpolicies", "", "default", 0},
		{"update", "rbac.authorization.k8s.io", "clusterroles", "", "", 0},
		{"create", "", "serviceaccounts", "token", namespace, 0},
		{"impersonate", "", "serviceaccounts", "", "", 0},
	}
	for _, who := range []struct {
		name string
		bit  int
		k    kubectl
	}{{"agent", agent, agentSA}, {"controller", controller, controllerSA}} {
		for _, tc := range tests {
			want := tc.allowed&who.bit != 0
			if got := canI(t, who.k, tc.verb, tc.group, tc.resource, tc.sub, tc.ns); got != want {
				t.Errorf("%s can %s %s/%s (subresource %q) in %q: %v, want %v", who.name, tc.verb, tc.group, tc.resource, tc.sub, tc.ns, got, want)
			}
		}
	}
}
