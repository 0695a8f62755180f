package envoyfilter

import (
	"bytes"
	"flag"
	"os"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/compile"
)

var update = flag.Bool("update", false, "rewrite golden files")

type input struct {
	Pods     []compile.Pod       `json:"pods"`
	Policies []v1alpha1.L7Policy `json:"policies"`
}

func load(t *testing.T) input {
	t.Helper()
	b, err := os.ReadFile("testdata/input.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var in input
	if err := yaml.UnmarshalStrict(b, &in); err != nil {
		t.Fatal(err)
	}
	return in
}

// generate compiles the test input for Istio mTLS and renders EnvoyFilters.
func generate(t *testing.T) ([]byte, []GroupError, int) {
	t.Helper()
	in := load(t)
	res, err := compile.Compile(in.Policies, compile.Inventory{Pods: in.Pods}, compile.Options{Identity: compile.IdentityPeerCertificate, TrustDomain: "cluster.local"})
	if err != nil {
		t.Fatal(err)
	}
	objs, errs := Build(res, in.Pods, in.Policies)
	var out bytes.Buffer
	for _, o := range objs {
		b, err := yaml.Marshal(o.Object)
		if err != nil {
			t.Fatal(err)
		}
		out.WriteString("---\n")
		out.Write(b)
	}
	for _, e := range errs {
		out.WriteString("# error: " + e.Error() + "\n")
	}
	return out.Bytes(), errs, len(objs)
}

func TestGolden(t *testing.T) {
	got, errs, n := generate(t)
	const golden = "testdata/envoyfilters.golden.yaml"
	if *update {
		if err := os.WriteFile(golden, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs (run with -update after checking):\n%s", golden, got)
	}
	// api pods (api+health), web (health): two filters; admin-stable cannot
	// be isolated from the canary.
	if n != 2 || len(errs) != 1 || !strings.Contains(errs[0].Error(), "admin-canary") {
		t.Errorf("got %d filters and errors %v; want 2 filters and one error naming admin-canary", n, errs)
	}
}

func TestNameStable(t *testing.T) {
	if Name([]string{"b", "a"}) != Name([]string{"a", "b"}) || Name([]string{"a"}) == Name([]string{"a", "b"}) {
		t.Error("Name must depend on the set of policies only")
	}
}
