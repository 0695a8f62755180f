package compile

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"
	"sigs.k8s.io/yaml"

	"github.com/sidelane/sidelane/policy/api/v1alpha1"
)

var update = flag.Bool("update", false, "rewrite the golden files from the current output")

// testCase is one testdata/*.yaml file: the compiler's whole input.
type testCase struct {
	Options   Options             `json:"options"`
	Inventory Inventory           `json:"inventory"`
	Policies  []v1alpha1.L7Policy `json:"policies"`
}

// Render turns a Result into stable, readable JSON: protojson output is
// deliberately unstable in whitespace, so it is re-indented here.
func Render(res *Result) ([]byte, error) {
	type port struct {
		Port int32           `json:"port"`
		RBAC json.RawMessage `json:"rbac"`
	}
	type group struct {
		Namespace string   `json:"namespace"`
		Policies  []string `json:"policies"`
		Pods      []string `json:"pods"`
		Ports     []port   `json:"ports"`
	}
	type report struct {
		Policy       string `json:"policy"`
		SelectedPods int    `json:"selectedPods"`
		Error        string `json:"error,omitempty"`
	}
	out := struct {
		Policies []report `json:"policies"`
		Groups   []group  `json:"groups"`
	}{Policies: []report{}, Groups: []group{}}
	for _, p := range res.Policies {
		r := report{Policy: p.Namespace + "/" + p.Name, SelectedPods: p.SelectedPods}
		if p.Err != nil {
			r.Error = p.Err.Error()
		}
		out.Policies = append(out.Policies, r)
	}
	for _, g := range res.Groups {
		gg := group{Namespace: g.Namespace, Policies: g.Policies, Pods: []string{}, Ports: []port{}}
		for _, p := range g.Pods {
			gg.Pods = append(gg.Pods, p.Name)
		}
		for _, p := range g.Ports {
			js, err := protojson.Marshal(p.RBAC)
			if err != nil {
				return nil, err
			}
			var buf bytes.Buffer
			if err := json.Compact(&buf, js); err != nil {
				return nil, err
			}
			gg.Ports = append(gg.Ports, port{Port: p.Port, RBAC: buf.Bytes()})
		}
		out.Groups = append(out.Groups, gg)
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	err := enc.Encode(out)
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), err
}

// TestGolden compiles every testdata/*.yaml and compares with its
// .golden.json; go test ./policy/compile -update rewrites them.
func TestGolden(t *testing.T) {
	files, err := filepath.Glob("testdata/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no test cases: %v", err)
	}
	for _, f := range files {
		t.Run(strings.TrimSuffix(filepath.Base(f), ".yaml"), func(t *testing.T) {
			in, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			var tc testCase
			if err := yaml.UnmarshalStrict(in, &tc); err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			res, err := Compile(tc.Policies, tc.Inventory, tc.Options)
			if err != nil {
				t.Fatal(err)
			}
			got, err := Render(res)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, '\n')
			golden := strings.TrimSuffix(f, ".yaml") + ".golden.json"
			if *update {
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run with -update to create)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s differs from the compiler's output (run with -update after checking):\n%s", golden, got)
			}
			// Compiling again gives the same bytes: the output is deterministic.
			res2, _ := Compile(tc.Policies, tc.Inventory, tc.Options)
			if again, _ := Render(res2); !bytes.Equal(append(again, '\n'), got) {
				t.Error("second compilation differs from the first")
			}
		})
	}
}

func TestOptionsRejected(t *testing.T) {
	for _, tc := range []struct {
		opts Options
		want string
	}{
		{Options{Identity: "magic", TrustDomain: "cluster.local"}, `identity "magic"`},
		{Options{Identity: IdentitySourceIP}, `trustDomain ""`},
		{Options{Identity: IdentitySourceIP, TrustDomain: "a/b"}, `trustDomain "a/b"`},
	} {
		_, err := Compile(nil, Inventory{}, tc.opts)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Compile(%+v) = %v, want error containing %q", tc.opts, err, tc.want)
		}
	}
}

func TestForPod(t *testing.T) {
	in, err := os.ReadFile("testdata/combination.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var tc testCase
	if err := yaml.UnmarshalStrict(in, &tc); err != nil {
		t.Fatal(err)
	}
	res, err := Compile(tc.Policies, tc.Inventory, tc.Options)
	if err != nil {
		t.Fatal(err)
	}
	g, ok := res.ForPod("shop", "api-0")
	if !ok || strings.Join(g.Policies, ",") != "health-everywhere,reads,writes-from-web" || len(g.Ports) != 2 {
		t.Errorf("api-0: %v %+v", ok, g)
	}
	if _, ok := res.ForPod("ops", "api-0"); ok {
		t.Error("found a pod in the wrong namespace")
	}
	if _, ok := res.ForPod("batch", "job-0"); ok {
		t.Error("job-0 is selected by no policy")
	}
}
