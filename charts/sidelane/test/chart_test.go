// Package charttest checks the Helm chart charts/sidelane: helm lint,
// rendered templates against golden files, the values schema, the values
// documentation, and a server-side strict dry-run against a real
// kube-apiserver. Run it with `make chart`.
package charttest

import (
	"bufio"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/sidelane/sidelane/internal/testenv"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

const (
	release     = "sidelane"
	namespace   = "sidelane-system"
	kubeVersion = "1.33.13"
)

func chartDir(t *testing.T) string {
	return filepath.Join(testenv.RepoRoot(t), "charts", "sidelane")
}

// valueSets are the chart's ci/*-values.yaml files, by name.
func valueSets(t *testing.T) map[string]string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(chartDir(t), "ci", "*-values.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no ci/*-values.yaml in the chart: %v", err)
	}
	sets := map[string]string{}
	for _, f := range files {
		sets[strings.TrimSuffix(filepath.Base(f), "-values.yaml")] = f
	}
	return sets
}

func helm(t *testing.T, args ...string) ([]byte, error) {
	t.Helper()
	cmd := exec.Command(testenv.RequireTool(t, "helm"), args...)
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+t.TempDir(), "HELM_CONFIG_HOME="+t.TempDir(), "HELM_DATA_HOME="+t.TempDir())
	return cmd.CombinedOutput()
}

// render runs helm template with one value set (and extra flags).
func render(t *testing.T, values string, extra ...string) ([]byte, error) {
	t.Helper()
	args := append([]string{"template", release, chartDir(t), "--namespace", namespace, "--kube-version", kubeVersion, "-f", values}, extra...)
	return helm(t, args...)
}

func TestLint(t *testing.T) {
	for name, values := range valueSets(t) {
		t.Run(name, func(t *testing.T) {
			out, err := helm(t, "lint", "--strict", "--kube-version", kubeVersion, chartDir(t), "-f", values)
			if err != nil {
				t.Fatalf("helm lint: %v\n%s", err, out)
			}
		})
	}
}

func TestTemplateGolden(t *testing.T) {
	for name, values := range valueSets(t) {
		t.Run(name, func(t *testing.T) {
			out, err := render(t, values)
			if err != nil {
				t.Fatalf("helm template: %v\n%s", err, out)
			}
			golden := filepath.Join("testdata", name+".golden.yaml")
			if *update {
				if err := os.WriteFile(golden, out, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test ./charts/sidelane/test -update)", err)
			}
			if string(out) != string(want) {
				t.Errorf("helm template with %s differs from %s (run with -update and review the diff):\n%s", filepath.Base(values), golden, firstDiff(string(out), string(want)))
			}
		})
	}
}

func firstDiff(got, want string) string {
	g, w := strings.Split(got, "\n"), strings.Split(want, "\n")
	for i := 0; i < len(g) || i < len(w); i++ {
		var gl, wl string
		if i < len(g) {
			gl = g[i]
		}
		if i < len(w) {
			wl = w[i]
		}
		if gl != wl {
			return "line " + strconv.Itoa(i+1) + ":\n  got:  " + gl + "\n  want: " + wl
		}
	}
	return ""
}

// TestSchemaRejectsBadValues: values.schema.json turns a wrong value into
// an error naming it, before anything reaches a cluster.
func TestSchemaRejectsBadValues(t *testing.T) {
	defaults := valueSets(t)["default"]
	tests := []struct{ set, want string }{
		{"cni.failPolicy=sometimes", "failPolicy"},
		{"cni.statusPolicy=always", "statusPolicy"},
		{"cni.ownConfigName=sidelane.conf", "ownConfigName"},
		{"cni.binDir=opt/cni/bin", "binDir"},
		{"cni.agentTimeout=soon", "agentTimeout"},
		{"agent.httpPort=0", "httpPort"},
		{"agent.logLevel=loud", "logLevel"},
		{"agent.capabilities={SYS_MODULE}", "capabilities"},
		{"agent.unknownKnob=1", "unknownKnob"},
		{"nodeProxy.enabled=yes", "enabled"},
		{"controller.replicas=-1", "replicas"},
		{"controller.logLevel=loud", "logLevel"},
		{"controller.trustDomain=a/b", "trustDomain"},
		{"controller.unknownKnob=1", "unknownKnob"},
		{"restrictAgentNodePatches=yes", "restrictAgentNodePatches"},
		{"nodeProxy.xdsSocket=/var/run/sidelane/xds.sock", "xdsSocket"},
		{"cni.kubeconfigFile=/var/run/sidelane/kubeconfig", "kubeconfigFile"},
	}
	for _, tc := range tests {
		t.Run(tc.set, func(t *testing.T) {
			out, err := render(t, defaults, "--set", tc.set)
			if err == nil {
				t.Fatalf("helm template --set %s succeeded", tc.set)
			}
			if !strings.Contains(string(out), tc.want) {
				t.Errorf("error does not name %s:\n%s", tc.want, out)
			}
		})
	}
}

// TestValuesDocumented: every key in values.yaml is in the chart README's
// values table, by its dotted path.
func TestValuesDocumented(t *testing.T) {
	readme, err := os.ReadFile(filepath.Join(chartDir(t), "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(chartDir(t), "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	key := regexp.MustCompile(`^( *)([A-Za-z][A-Za-z0-9]*):`)
	type level struct {
		indent int
		name   string
	}
	var stack []level
	sc := bufio.NewScanner(f)
	n := 0
	for sc.Scan() {
		m := key.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		indent := len(m[1])
		for len(stack) > 0 && stack[len(stack)-1].indent >= indent {
			stack = stack[:len(stack)-1]
		}
		stack = append(stack, level{indent, m[2]})
		var parts []string
		for _, l := range stack {
			parts = append(parts, l.name)
		}
		path := strings.Join(parts, ".")
		// Maps the user fills in (resources) are documented as a whole.
		if strings.Contains(path, ".resources.") || strings.HasPrefix(path, "resources.") {
			continue
		}
		n++
		if !strings.Contains(string(readme), "`"+path+"`") {
			t.Errorf("values.yaml key %s is not documented in charts/sidelane/README.md", path)
		}
	}
	if n < 20 {
		t.Fatalf("found only %d keys in values.yaml; the scanner is broken", n)
	}
}
