package classify_test

import (
	"maps"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/sidelane/sidelane/istio/classify"
)

// A patch a user with pods/patch can apply to a running pod.
type podPatch struct {
	name        string
	labels      map[string]string // "" value: delete the key
	annotations map[string]string
}

func (p podPatch) apply(pod *corev1.Pod) *corev1.Pod {
	pod = pod.DeepCopy()
	set := func(m map[string]string, kv map[string]string) map[string]string {
		if m == nil {
			m = map[string]string{}
		}
		for k, v := range kv {
			if v == "" {
				delete(m, k)
			} else {
				m[k] = v
			}
		}
		return m
	}
	pod.Labels = set(pod.Labels, p.labels)
	pod.Annotations = set(pod.Annotations, p.annotations)
	return pod
}

var (
	removeStatus  = podPatch{name: "remove sidecar.istio.io/status", annotations: map[string]string{"sidecar.istio.io/status": ""}}
	addStatus     = podPatch{name: "add sidecar.istio.io/status", annotations: map[string]string{"sidecar.istio.io/status": `{"containers":["istio-proxy"],"revision":"default"}`}}
	injectFalse   = podPatch{name: "label sidecar.istio.io/inject=false", labels: map[string]string{"sidecar.istio.io/inject": "false"}}
	injectFalseAn = podPatch{name: "annotate sidecar.istio.io/inject=false", annotations: map[string]string{"sidecar.istio.io/inject": "false"}}
	injectTrue    = podPatch{name: "label sidecar.istio.io/inject=true", labels: map[string]string{"sidecar.istio.io/inject": "true"}}
	agentLabel    = podPatch{name: "label app.kubernetes.io/name=sidelane", labels: map[string]string{classify.AgentLabelDefault: classify.AgentLabelValue}}
	removeAgent   = podPatch{name: "remove app.kubernetes.io/name", labels: map[string]string{classify.AgentLabelDefault: ""}}
	revLabel      = podPatch{name: "label istio.io/rev=canary", labels: map[string]string{"istio.io/rev": "canary"}}
	captureAnn    = podPatch{name: "annotate excludeOutboundPorts", annotations: map[string]string{"traffic.sidecar.istio.io/excludeOutboundPorts": "1-65535", "traffic.sidecar.istio.io/includeInboundPorts": ""}}
	podAmbient    = podPatch{name: "label istio.io/dataplane-mode=ambient", labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}
	podOptOut     = podPatch{name: "label istio.io/dataplane-mode=none", labels: map[string]string{"istio.io/dataplane-mode": "none"}}
)

// podPatches are every patch except the istio.io/dataplane-mode labels:
// none of them may move a running pod.
var podPatches = []podPatch{removeStatus, addStatus, injectFalse, injectFalseAn, injectTrue, agentLabel, removeAgent, revLabel, captureAnn,
	{name: "remove every annotation and label", labels: map[string]string{"sidecar.istio.io/inject": "", "app": "", classify.AgentLabelDefault: "", "istio.io/rev": ""},
		annotations: map[string]string{"sidecar.istio.io/status": "", "sidecar.istio.io/inject": "", "kubectl.kubernetes.io/default-container": ""}},
}

// TestLive spells out what may move a running pod: the pod is created
// (Classify, as CNI ADD does), then patched and its namespace relabeled,
// and Live decides what the running pod gets.
func TestLive(t *testing.T) {
	status := map[string]string{"sidecar.istio.io/status": `{"containers":["istio-proxy"],"revision":"default"}`}
	withProxy := corev1.PodSpec{Containers: []corev1.Container{{Name: "app"}, {Name: "istio-proxy", Args: []string{"proxy", "sidecar"}}}}
	agentCfg := classify.Config{AgentNamespace: "sidelane-system", AgentLabels: map[string]string{"app": "sidelane"}}
	cases := []struct {
		name       string
		cfg        classify.Config // the agent's config now (zero: DefaultConfig)
		addCfg     classify.Config // its config at creation (zero: cfg)
		pod        *corev1.Pod
		ns, nsNow  map[string]string
		patch      podPatch
		atMode     classify.Mode // what ADD decided
		want       classify.Mode // what the running pod gets
		wantHeld   bool
		legacyRule bool // the attachment was recorded without its rule
	}{
		// A sidecar pod stays a sidecar pod: the finding's bypasses.
		{name: "sidecar: status removed", pod: loadPod(t, "sidecar-classic"), ns: injectionNS, patch: removeStatus, atMode: classify.ModeSidecar, want: classify.ModeSidecar, wantHeld: true},
		{name: "sidecar: inject=false label", pod: loadPod(t, "sidecar-classic"), ns: injectionNS, patch: injectFalse, atMode: classify.ModeSidecar, want: classify.ModeSidecar, wantHeld: true},
		{name: "native sidecar: inject=false annotation", pod: loadPod(t, "sidecar-native-annotation"), ns: injectionNS, patch: injectFalseAn, atMode: classify.ModeSidecar, want: classify.ModeSidecar, wantHeld: true},
		{name: "sidecar: status removed in an ambient namespace", pod: loadPod(t, "sidecar-classic"), ns: injectionNS, nsNow: ambientNS, patch: removeStatus, atMode: classify.ModeSidecar, want: classify.ModeSidecar, wantHeld: true},
		{name: "sidecar: opts out of ambient", pod: loadPod(t, "sidecar-classic"), ns: ambientNS, patch: podOptOut, atMode: classify.ModeSidecar, want: classify.ModeSidecar},
		{name: "sidecar: agent labels", cfg: classify.DefaultConfig(), pod: loadPod(t, "sidecar-classic"), ns: injectionNS, patch: agentLabel, atMode: classify.ModeSidecar, want: classify.ModeSidecar, wantHeld: true},
		{name: "sidecar recorded without a rule: status removed", pod: loadPod(t, "sidecar-classic"), ns: injectionNS, nsNow: ambientNS, patch: removeStatus, atMode: classify.ModeSidecar, want: classify.ModeSidecar, wantHeld: true, legacyRule: true},
		// Pods left alone for a sidecar reason never become node pods.
		{name: "istio-init pod, namespace goes ambient", pod: loadPod(t, "sidecar-istio-init"), ns: injectionNS, nsNow: ambientNS, atMode: classify.ModeNone, want: classify.ModeNone},
		{name: "inject=false next to istio-proxy, label removed in ambient namespace", pod: pod("a", nil, map[string]string{"sidecar.istio.io/status": "{}", "sidecar.istio.io/inject": "false"}, withProxy), ns: ambientNS,
			patch: podPatch{annotations: map[string]string{"sidecar.istio.io/inject": ""}}, atMode: classify.ModeNone, want: classify.ModeNone, wantHeld: true},
		{name: "status without proxy, status removed in ambient namespace", pod: pod("a", nil, status, corev1.PodSpec{}), ns: ambientNS, patch: removeStatus, atMode: classify.ModeNone, want: classify.ModeNone, wantHeld: true},
		{name: "gateway, namespace goes ambient", pod: loadPod(t, "gateway"), nsNow: ambientNS, atMode: classify.ModeNone, want: classify.ModeNone},
		{name: "agent pod loses its label in an ambient namespace", cfg: agentCfg, pod: pod("sidelane-system", map[string]string{"app": "sidelane"}, nil, corev1.PodSpec{}), ns: ambientNS,
			patch: podPatch{labels: map[string]string{"app": ""}}, atMode: classify.ModeNone, want: classify.ModeNone, wantHeld: true},
		// Node pods move only by the dataplane-mode labels.
		{name: "node: namespace label removed", pod: loadPod(t, "plain"), ns: ambientNS, nsNow: map[string]string{}, atMode: classify.ModeNode, want: classify.ModeNone},
		{name: "none: namespace goes ambient", pod: loadPod(t, "plain"), nsNow: ambientNS, atMode: classify.ModeNone, want: classify.ModeNode},
		{name: "none recorded without a rule: namespace goes ambient", pod: loadPod(t, "plain"), nsNow: ambientNS, atMode: classify.ModeNone, want: classify.ModeNode, legacyRule: true},
		{name: "node: pod opts out", pod: loadPod(t, "plain"), ns: ambientNS, patch: podOptOut, atMode: classify.ModeNode, want: classify.ModeNone},
		{name: "none: pod label ambient", pod: loadPod(t, "plain"), patch: podAmbient, atMode: classify.ModeNone, want: classify.ModeNode},
		{name: "inject=false pod without sidecar, namespace goes ambient", pod: loadPod(t, "inject-optout"), ns: injectionNS, nsNow: ambientNS, atMode: classify.ModeNone, want: classify.ModeNode},
		{name: "istio-proxy without status, namespace goes ambient", pod: pod("a", nil, nil, withProxy), nsNow: ambientNS, atMode: classify.ModeNone, want: classify.ModeNode},
		{name: "node: status annotation added", pod: loadPod(t, "plain"), ns: ambientNS, patch: addStatus, atMode: classify.ModeNode, want: classify.ModeNode, wantHeld: true},
		{name: "node: agent labels added", pod: loadPod(t, "plain"), ns: ambientNS, patch: agentLabel, atMode: classify.ModeNode, want: classify.ModeNode, wantHeld: true},
		{name: "node with istio-proxy: status added", pod: pod("a", nil, nil, withProxy), ns: ambientNS, patch: addStatus, atMode: classify.ModeNode, want: classify.ModeNode, wantHeld: true},
		{name: "node: inject=false", pod: loadPod(t, "plain"), ns: ambientNS, patch: injectFalse, atMode: classify.ModeNode, want: classify.ModeNode},
		// The operator's --excluded-namespaces applies to running pods.
		{name: "sidecar in a namespace the agent now excludes", cfg: classify.Config{ExcludedNamespaces: []string{"shop"}}, addCfg: classify.DefaultConfig(), pod: loadPod(t, "sidecar-classic"), ns: injectionNS, atMode: classify.ModeSidecar, want: classify.ModeNone},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg, addCfg := orDefault(c.cfg), orDefault(c.addCfg)
			if c.addCfg.AgentLabels == nil && c.addCfg.ExcludedNamespaces == nil {
				addCfg = cfg
			}
			at := classify.Classify(addCfg, classify.Input{Pod: c.pod, NamespaceLabels: c.ns})
			if at.Mode != c.atMode {
				t.Fatalf("at creation: %s (%s), want %s", at.Mode, at.Reason, c.atMode)
			}
			if c.legacyRule {
				at.Rule = ""
			}
			nsNow := c.nsNow
			if nsNow == nil {
				nsNow = c.ns
			}
			d, held := classify.Live(cfg, at, classify.Input{Pod: c.patch.apply(c.pod), NamespaceLabels: nsNow})
			if d.Mode != c.want {
				t.Errorf("running pod: %s (%s: %s), want %s", d.Mode, d.Rule, d.Reason, c.want)
			}
			if d.Rule == "" || d.Reason == "" {
				t.Errorf("decision without rule or reason: %+v", d)
			}
			if (held != "") != c.wantHeld {
				t.Errorf("held = %q, want held %v", held, c.wantHeld)
			}
			if !classify.Movable(at.Rule, c.pod) && d.Mode == at.Mode && d.Reason != at.Reason {
				t.Errorf("a fixed decision changed its reason: %q -> %q", at.Reason, d.Reason)
			}
		})
	}
}

func orDefault(c classify.Config) classify.Config {
	if c.AgentLabels == nil && c.ExcludedNamespaces == nil {
		return classify.DefaultConfig()
	}
	return c
}

// TestLiveIgnoresPodPatches is the trust rule as an invariant: for every
// fixture pod in every namespace state, no patch of its labels or
// annotations other than istio.io/dataplane-mode changes what the running
// pod gets. Widening what a pod patch may move fails here.
func TestLiveIgnoresPodPatches(t *testing.T) {
	nsStates := map[string]map[string]string{"unlabeled": nil, "injection": injectionNS, "ambient": ambientNS}
	cfg := classify.DefaultConfig()
	for _, fx := range fixtures {
		for nsName, nsAdd := range nsStates {
			for nsNowName, nsNow := range nsStates {
				base := loadPod(t, fx.name)
				at := classify.Classify(cfg, classify.Input{Pod: base, NamespaceLabels: nsAdd})
				want, _ := classify.Live(cfg, at, classify.Input{Pod: base, NamespaceLabels: nsNow})
				for _, p := range podPatches {
					got, _ := classify.Live(cfg, at, classify.Input{Pod: p.apply(base), NamespaceLabels: maps.Clone(nsNow)})
					if got.Mode != want.Mode {
						t.Errorf("%s created in a %s namespace (%s), namespace now %s: %q moves it %s -> %s (%s)",
							fx.name, nsName, at.Mode, nsNowName, p.name, want.Mode, got.Mode, got.Reason)
					}
				}
				if at.Mode == classify.ModeSidecar && want.Mode != classify.ModeSidecar {
					t.Errorf("%s: a sidecar pod moved to %s when its namespace became %s", fx.name, want.Mode, nsNowName)
				}
			}
		}
	}
}
