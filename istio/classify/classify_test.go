package classify_test

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/yaml"

	"github.com/sidelane/sidelane/istio/classify"
)

var update = flag.Bool("update", false, "rewrite testdata/decisions.golden.json")

var (
	ambientNS   = map[string]string{"istio.io/dataplane-mode": "ambient"}
	injectionNS = map[string]string{"istio-injection": "enabled"}
)

// goldenCases pair a real (kube-inject generated) pod with its namespace's
// labels. The decisions are in testdata/decisions.golden.json; the mode
// each case must have is also spelled out here, so -update cannot silently
// bless a wrong mode.
var goldenCases = []struct {
	name, pod string
	nsLabels  map[string]string
	mode      classify.Mode
	rule      classify.Rule
}{
	{"classic sidecar", "sidecar-classic", injectionNS, classify.ModeSidecar, classify.RuleSidecar},
	{"native sidecar by annotation", "sidecar-native-annotation", injectionNS, classify.ModeSidecar, classify.RuleSidecar},
	{"native sidecar by ENABLE_NATIVE_SIDECARS", "sidecar-native-env", injectionNS, classify.ModeSidecar, classify.RuleSidecar},
	{"canary revision", "sidecar-canary", map[string]string{"istio.io/rev": "canary"}, classify.ModeSidecar, classify.RuleSidecar},
	{"tproxy sidecar", "sidecar-tproxy", injectionNS, classify.ModeSidecar, classify.RuleSidecar},
	{"sidecar wins over ambient namespace", "sidecar-classic", ambientNS, classify.ModeSidecar, classify.RuleSidecar},
	{"istio-init already captures", "sidecar-istio-init", injectionNS, classify.ModeNone, classify.RuleIstioInit},
	{"inject=false opt-out", "inject-optout", injectionNS, classify.ModeNone, classify.RuleInjectDisabled},
	{"host network in ambient namespace", "hostnet", ambientNS, classify.ModeNone, classify.RuleHostNetwork},
	{"gateway", "gateway", nil, classify.ModeNone, classify.RuleProxyNotSidecar},
	{"ambient namespace", "plain", ambientNS, classify.ModeNode, classify.RuleAmbientNamespace},
	{"ambient pod label", "ambient-pod", nil, classify.ModeNode, classify.RuleAmbientPod},
	{"ambient opt-out", "ambient-none", ambientNS, classify.ModeNone, classify.RuleAmbientOptOut},
	{"injection label but no sidecar", "plain", injectionNS, classify.ModeNone, classify.RuleInjectionMissing},
	{"not in mesh", "plain", nil, classify.ModeNone, classify.RuleNotInMesh},
	{"kube-system excluded", "kube-system", ambientNS, classify.ModeNone, classify.RuleExcludedNamespace},
	{"agent's own pod", "agent", ambientNS, classify.ModeNone, classify.RuleAgentPod},
}

func loadPod(t testing.TB, name string) *corev1.Pod {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "pods", name+".yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var pod corev1.Pod
	if err := yaml.NewYAMLOrJSONDecoder(bytes.NewReader(b), 4096).Decode(&pod); err != nil {
		t.Fatalf("decode %s: %v", name, err)
	}
	return &pod
}

func TestGolden(t *testing.T) {
	got := map[string]classify.Decision{}
	for _, c := range goldenCases {
		t.Run(c.name, func(t *testing.T) {
			d := classify.Classify(classify.DefaultConfig(), classify.Input{Pod: loadPod(t, c.pod), NamespaceLabels: c.nsLabels})
			if d.Mode != c.mode || d.Rule != c.rule {
				t.Errorf("mode, rule = %s, %s (%s); want %s, %s", d.Mode, d.Rule, d.Reason, c.mode, c.rule)
			}
			got[c.name] = d
		})
	}
	path := filepath.Join("testdata", "decisions.golden.json")
	data, err := json.MarshalIndent(got, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	data = append(data, '\n')
	if *update {
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update)", err)
	}
	var wantM map[string]classify.Decision
	if err := json.Unmarshal(want, &wantM); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(wantM, got); diff != "" {
		t.Errorf("decisions differ from %s (-want +got; go test -update rewrites it):\n%s", path, diff)
	}
}

// TestFixturesAreInjected guards the fixtures themselves: they must show
// what Istio's injector really does, or the golden test proves nothing.
func TestFixturesAreInjected(t *testing.T) {
	always := corev1.ContainerRestartPolicyAlways
	cases := []struct {
		pod               string
		proxyInit, native bool
		initContainer     string
		revision          string
	}{
		{pod: "sidecar-classic", initContainer: "istio-validation", revision: `"revision":"default"`},
		{pod: "sidecar-native-annotation", proxyInit: true, native: true, initContainer: "istio-validation"},
		{pod: "sidecar-native-env", proxyInit: true, native: true, initContainer: "istio-validation"},
		{pod: "sidecar-canary", initContainer: "istio-validation", revision: `"revision":"canary"`},
		{pod: "sidecar-istio-init", initContainer: "istio-init"},
	}
	for _, c := range cases {
		t.Run(c.pod, func(t *testing.T) {
			pod := loadPod(t, c.pod)
			status, ok := pod.Annotations["sidecar.istio.io/status"]
			if !ok {
				t.Fatal("no sidecar.istio.io/status annotation")
			}
			if c.revision != "" && !bytes.Contains([]byte(status), []byte(c.revision)) {
				t.Errorf("status %s lacks %s", status, c.revision)
			}
			var inInit, inMain, native, hasInit bool
			for _, ic := range pod.Spec.InitContainers {
				if ic.Name == "istio-proxy" {
					inInit = true
					native = ic.RestartPolicy != nil && *ic.RestartPolicy == always
				}
				if ic.Name == c.initContainer {
					hasInit = true
				}
			}
			for _, mc := range pod.Spec.Containers {
				inMain = inMain || mc.Name == "istio-proxy"
			}
			if inInit != c.proxyInit || inMain == c.proxyInit || native != c.native || !hasInit {
				t.Errorf("istio-proxy in init %v, in containers %v, native %v, %s present %v", inInit, inMain, native, c.initContainer, hasInit)
			}
		})
	}
	for _, p := range []string{"inject-optout", "hostnet"} {
		if _, ok := loadPod(t, p).Annotations["sidecar.istio.io/status"]; ok {
			t.Errorf("%s: the injector should have skipped it", p)
		}
	}
}

func pod(ns string, labels, annotations map[string]string, spec corev1.PodSpec) *corev1.Pod {
	if len(spec.Containers) == 0 {
		spec.Containers = []corev1.Container{{Name: "app"}}
	}
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: ns, Labels: labels, Annotations: annotations}, Spec: spec}
}

// TestRules covers the rules the injector cannot produce (hand-edited or
// half-injected pods) and the configuration.
func TestRules(t *testing.T) {
	status := map[string]string{"sidecar.istio.io/status": `{"containers":["istio-proxy"],"revision":"default"}`}
	proxy := corev1.Container{Name: "istio-proxy", Args: []string{"proxy", "sidecar"}}
	always := corev1.ContainerRestartPolicyAlways
	withProxy := corev1.PodSpec{Containers: []corev1.Container{{Name: "app"}, proxy}}
	cases := []struct {
		name string
		cfg  classify.Config
		pod  *corev1.Pod
		ns   map[string]string
		mode classify.Mode
		rule classify.Rule
	}{
		{"sidecar", classify.DefaultConfig(), pod("a", nil, status, withProxy), nil, classify.ModeSidecar, classify.RuleSidecar},
		{"proxy init container that is not native", classify.DefaultConfig(),
			pod("a", nil, status, corev1.PodSpec{InitContainers: []corev1.Container{proxy}}), nil, classify.ModeNone, classify.RuleProxyNotRunning},
		{"native proxy", classify.DefaultConfig(),
			pod("a", nil, status, corev1.PodSpec{InitContainers: []corev1.Container{{Name: "istio-proxy", RestartPolicy: &always}}}), nil, classify.ModeSidecar, classify.RuleSidecar},
		{"status without proxy is neither sidecar nor ambient", classify.DefaultConfig(), pod("a", nil, status, corev1.PodSpec{}), ambientNS, classify.ModeNone, classify.RuleProxyNotRunning},
		{"proxy without status, ambient namespace", classify.DefaultConfig(), pod("a", nil, nil, withProxy), ambientNS, classify.ModeNode, classify.RuleAmbientNamespace},
		{"proxy without status", classify.DefaultConfig(), pod("a", nil, nil, withProxy), nil, classify.ModeNone, classify.RuleNoSidecarStatus},
		{"DISABLE_ENVOY", classify.DefaultConfig(), pod("a", nil, status, corev1.PodSpec{Containers: []corev1.Container{
			{Name: "istio-proxy", Env: []corev1.EnvVar{{Name: "DISABLE_ENVOY", Value: "true"}}}}}), nil, classify.ModeNone, classify.RuleEnvoyDisabled},
		{"inject label beats annotation", classify.DefaultConfig(), pod("a", map[string]string{"sidecar.istio.io/inject": "true"},
			map[string]string{"sidecar.istio.io/status": "{}", "sidecar.istio.io/inject": "false"}, withProxy), nil, classify.ModeSidecar, classify.RuleSidecar},
		{"inject annotation false", classify.DefaultConfig(), pod("a", nil,
			map[string]string{"sidecar.istio.io/status": "{}", "sidecar.istio.io/inject": "false"}, withProxy), ambientNS, classify.ModeNone, classify.RuleInjectDisabled},
		{"invalid inject value is ignored", classify.DefaultConfig(), pod("a", map[string]string{"sidecar.istio.io/inject": "maybe"}, status, withProxy), nil, classify.ModeSidecar, classify.RuleSidecar},
		{"pod ambient label beats namespace without label", classify.DefaultConfig(), pod("a", map[string]string{"istio.io/dataplane-mode": "ambient"}, nil, corev1.PodSpec{}), map[string]string{"istio.io/dataplane-mode": "none"}, classify.ModeNode, classify.RuleAmbientPod},
		{"unknown pod dataplane-mode in ambient namespace", classify.DefaultConfig(), pod("a", map[string]string{"istio.io/dataplane-mode": "x"}, nil, corev1.PodSpec{}), ambientNS, classify.ModeNode, classify.RuleAmbientNamespace},
		{"namespace revision label", classify.DefaultConfig(), pod("a", nil, nil, corev1.PodSpec{}), map[string]string{"istio.io/rev": "canary"}, classify.ModeNone, classify.RuleInjectionMissing},
		{"injection disabled namespace ignores pod revision", classify.DefaultConfig(), pod("a", map[string]string{"istio.io/rev": "canary"}, nil, corev1.PodSpec{}), map[string]string{"istio-injection": "disabled"}, classify.ModeNone, classify.RuleNotInMesh},
		{"configured excluded namespace", classify.Config{ExcludedNamespaces: []string{"batch"}}, pod("batch", map[string]string{"istio.io/dataplane-mode": "ambient"}, nil, corev1.PodSpec{}), nil, classify.ModeNone, classify.RuleExcludedNamespace},
		{"kube-system not excluded when not configured", classify.Config{}, pod("kube-system", nil, nil, corev1.PodSpec{}), ambientNS, classify.ModeNode, classify.RuleAmbientNamespace},
		{"agent labels in another namespace", classify.Config{AgentNamespace: "sidelane-system", AgentLabels: map[string]string{"app": "sidelane"}},
			pod("shop", map[string]string{"app": "sidelane"}, nil, corev1.PodSpec{}), ambientNS, classify.ModeNode, classify.RuleAmbientNamespace},
		{"agent pod", classify.Config{AgentNamespace: "sidelane-system", AgentLabels: map[string]string{"app": "sidelane"}},
			pod("sidelane-system", map[string]string{"app": "sidelane"}, status, withProxy), nil, classify.ModeNone, classify.RuleAgentPod},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := classify.Classify(c.cfg, classify.Input{Pod: c.pod, NamespaceLabels: c.ns})
			if d.Mode != c.mode || d.Rule != c.rule {
				t.Errorf("mode, rule = %s, %s (%s); want %s, %s", d.Mode, d.Rule, d.Reason, c.mode, c.rule)
			}
			if d.Reason == "" {
				t.Error("empty reason")
			}
		})
	}
}

func TestParseNamespaces(t *testing.T) {
	cases := []struct {
		in      string
		want    []string
		wantErr bool
	}{
		{"", nil, false},
		{"kube-system", []string{"kube-system"}, false},
		{" kube-system , istio-system,,kube-system", []string{"kube-system", "istio-system"}, false},
		{"Kube-System", nil, true},
		{"ok,bad_name", nil, true},
	}
	for _, c := range cases {
		got, err := classify.ParseNamespaces(c.in)
		if (err != nil) != c.wantErr {
			t.Errorf("ParseNamespaces(%q) error = %v, want error %v", c.in, err, c.wantErr)
			continue
		}
		if diff := cmp.Diff(c.want, got); diff != "" {
			t.Errorf("ParseNamespaces(%q): %s", c.in, diff)
		}
	}
}

// FuzzClassify feeds arbitrary labels, annotations and container layouts:
// every pod gets a known mode, a rule and a reason, and sidecar mode only
// with an istio-proxy that runs.
func FuzzClassify(f *testing.F) {
	f.Add("ambient", "true", `{"revision":"x"}`, "", "istio-proxy", "proxy", "sidecar", true, false)
	f.Add("none", "false", "", "enabled", "istio-proxy", "proxy", "router", false, true)
	f.Fuzz(func(t *testing.T, dpMode, inject, status, nsInjection, cname, arg0, arg1 string, init, hostNet bool) {
		ann := map[string]string{}
		if status != "" {
			ann["sidecar.istio.io/status"] = status
		}
		c := corev1.Container{Name: cname, Args: []string{arg0, arg1}}
		spec := corev1.PodSpec{HostNetwork: hostNet}
		if init {
			always := corev1.ContainerRestartPolicyAlways
			c.RestartPolicy = &always
			spec.InitContainers = []corev1.Container{c}
		} else {
			spec.Containers = []corev1.Container{c}
		}
		p := pod("ns", map[string]string{"istio.io/dataplane-mode": dpMode, "sidecar.istio.io/inject": inject}, ann, spec)
		d := classify.Classify(classify.DefaultConfig(), classify.Input{Pod: p, NamespaceLabels: map[string]string{"istio-injection": nsInjection, "istio.io/dataplane-mode": dpMode}})
		switch d.Mode {
		case classify.ModeNone, classify.ModeNode:
		case classify.ModeSidecar:
			if cname != "istio-proxy" || status == "" || hostNet {
				t.Fatalf("sidecar mode for container %q, status %q, hostNetwork %v", cname, status, hostNet)
			}
		default:
			t.Fatalf("unknown mode %q", d.Mode)
		}
		if d.Rule == "" || d.Reason == "" {
			t.Fatalf("decision without rule or reason: %+v", d)
		}
	})
}
