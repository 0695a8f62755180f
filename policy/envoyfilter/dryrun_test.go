package envoyfilter

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"sigs.k8s.io/yaml"

	"github.com/sidelane/sidelane/internal/kubeharness"
	"github.com/sidelane/sidelane/internal/testenv"
	"github.com/sidelane/sidelane/policy/validate"
)

// istioCRDs finds Istio's CRDs in the istio.io/api module this repo pins.
func istioCRDs(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/api").Output()
	if err != nil {
		t.Fatalf("locate istio.io/api: %v", err)
	}
	p := filepath.Join(strings.TrimSpace(string(out)), "kubernetes", "customresourcedefinitions.gen.yaml")
	if _, err := os.Stat(p); err != nil {
		t.Fatal(err)
	}
	return p
}

// kubectl runs the harness's kubectl against the cluster.
func kubectl(t *testing.T, c *kubeharness.Cluster, args ...string) string {
	t.Helper()
	cmd := exec.Command(c.Kubectl, append([]string{"--kubeconfig", c.Kubeconfig}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out.String())
	}
	return out.String()
}

// InstallCRDs applies Istio's CRDs and sidelane's L7Policy CRD and waits
// until they are served.
func InstallCRDs(t *testing.T, c *kubeharness.Cluster) {
	t.Helper()
	kubectl(t, c, "apply", "--server-side", "-f", istioCRDs(t))
	kubectl(t, c, "apply", "--server-side", "-f", "../../charts/sidelane/crds/sidelane.io_l7policies.yaml")
	kubectl(t, c, "wait", "--for=condition=Established", "--timeout=120s",
		"crd/envoyfilters.networking.istio.io", "crd/l7policies.sidelane.io")
}

var (
	envoyFilterGVR = schema.GroupVersionResource{Group: "networking.istio.io", Version: "v1alpha3", Resource: "envoyfilters"}
	l7PolicyGVR    = schema.GroupVersionResource{Group: "sidelane.io", Version: "v1alpha1", Resource: "l7policies"}
)

// TestDryRunAgainstIstioCRDs: every generated EnvoyFilter passes a strict
// (unknown fields are errors) server-side dry-run create against Istio's own
// CRD schema in a real kube-apiserver; so do the test policies against the
// L7Policy CRD, and the CRD's schema and CEL rules reject bad policies.
func TestDryRunAgainstIstioCRDs(t *testing.T) {
	testenv.Privileged(t) // the harness runs etcd and kube-apiserver
	c := kubeharness.Start(t)
	InstallCRDs(t, c)
	dyn, err := dynamic.NewForConfig(c.RESTConfig)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	kubectl(t, c, "create", "namespace", "shop")
	strict := metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}, FieldValidation: "Strict"}

	got, _, n := generate(t)
	if n == 0 {
		t.Fatal("nothing generated")
	}
	for _, doc := range strings.Split(string(got), "---\n") {
		if strings.TrimSpace(doc) == "" || strings.HasPrefix(doc, "# error") {
			continue
		}
		var u unstructured.Unstructured
		if err := yaml.Unmarshal([]byte(doc), &u.Object); err != nil {
			t.Fatal(err)
		}
		u.SetOwnerReferences(nil) // dry-run: the owners do not exist here
		if _, err := dyn.Resource(envoyFilterGVR).Namespace(u.GetNamespace()).Create(ctx, &u, strict); err != nil {
			t.Errorf("EnvoyFilter %s rejected: %v", u.GetName(), err)
		}
	}

	for _, p := range load(t).Policies {
		obj := map[string]any{}
		b, _ := yaml.Marshal(p)
		if err := yaml.Unmarshal(b, &obj); err != nil {
			t.Fatal(err)
		}
		u := unstructured.Unstructured{Object: obj}
		u.SetUID("")
		unstructured.RemoveNestedField(u.Object, "status")
		unstructured.RemoveNestedField(u.Object, "metadata", "creationTimestamp")
		if _, err := dyn.Resource(l7PolicyGVR).Namespace("shop").Create(ctx, &u, strict); err != nil {
			t.Errorf("L7Policy %s rejected: %v", p.Name, err)
		}
	}

	// The CRD's own checks: each bad policy is refused with a message
	// naming the field.
	for _, tc := range []struct{ name, spec, want string }{
		{"no ports", `{podSelector: {}, ports: []}`, "spec.ports"},
		{"port 0", `{podSelector: {}, ports: [{port: 0}]}`, "spec.ports[0].port"},
		{"duplicate port", `{podSelector: {}, ports: [{port: 80}, {port: 80}]}`, "Duplicate value"},
		{"empty peer", `{podSelector: {}, ports: [{port: 80, rules: [{from: [{}]}]}]}`, "at least one of principals"},
		{"bad principal", `{podSelector: {}, ports: [{port: 80, rules: [{from: [{principals: [cluster.local/ns/a/sa/b]}]}]}]}`, "spec.ports[0].rules[0].from[0].principals[0]"},
		{"bad service account", `{podSelector: {}, ports: [{port: 80, rules: [{from: [{serviceAccounts: [web]}]}]}]}`, "serviceAccounts[0]"},
		{"two header matchers", `{podSelector: {}, ports: [{port: 80, rules: [{http: [{headers: [{name: x, exact: a, regex: b}]}]}]}]}`, "exactly one of exact, regex, present"},
		{"pseudo header", `{podSelector: {}, ports: [{port: 80, rules: [{http: [{headers: [{name: ":path", exact: a}]}]}]}]}`, "headers[0].name"},
		{"unknown field", `{podSelector: {}, ports: [{port: 80, rules: [{http: [{methods: [GET]}]}]}]}`, `unknown field "spec.ports[0].rules[0].http[0].methods"`},
		{"In without values", `{podSelector: {matchExpressions: [{key: a, operator: In}]}, ports: [{port: 80}]}`, "values must be non-empty"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var spec map[string]any
			if err := yaml.Unmarshal([]byte(tc.spec), &spec); err != nil {
				t.Fatal(err)
			}
			u := unstructured.Unstructured{Object: map[string]any{
				"apiVersion": "sidelane.io/v1alpha1", "kind": "L7Policy",
				"metadata": map[string]any{"name": "bad"}, "spec": spec,
			}}
			_, err := dyn.Resource(l7PolicyGVR).Namespace("shop").Create(ctx, &u, strict)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want an error containing %q", err, tc.want)
			}
			// The agent-side validator refuses the same object.
			u.SetNamespace("shop")
			doc, _ := yaml.Marshal(u.Object)
			if _, err := validate.Decode(doc); err == nil {
				t.Errorf("the CRD refuses it but validate.Decode accepts it:\n%s", doc)
			}
		})
	}
}
