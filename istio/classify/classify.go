// Package classify decides, from a pod and its namespace's labels alone,
// which datapath mode sidelane gives the pod: capture for its Istio sidecar,
// steer it to the per-node proxy (Istio's "ambient" labels), or leave it
// alone. It is pure code (no I/O) and follows the rules Istio's own CNI
// plugin and injector apply, so a pod is treated the same whether Istio's
// iptables capture or sidelane's runs on the node.
package classify

import (
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"istio.io/api/annotation"
	"istio.io/api/label"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/validation"
)

// Mode is a datapath mode. The values equal the agent's Mode* constants.
type Mode string

const (
	ModeNone    Mode = "none"    // sidelane leaves the pod alone
	ModeSidecar Mode = "sidecar" // capture to the pod's own Envoy sidecar
	ModeNode    Mode = "node"    // sidecar-free: steer to the per-node proxy
)

// Rule names the rule that decided. It is a short stable code for metrics
// labels and tests; Decision.Reason is the sentence for people.
type Rule string

const (
	RuleAgentPod          Rule = "agent-pod"
	RuleHostNetwork       Rule = "host-network"
	RuleExcludedNamespace Rule = "excluded-namespace"
	RuleSidecar           Rule = "sidecar"
	RuleInjectDisabled    Rule = "inject-disabled"
	RuleIstioInit         Rule = "istio-init"
	RuleProxyNotSidecar   Rule = "proxy-not-sidecar"
	RuleEnvoyDisabled     Rule = "envoy-disabled"
	RuleNoSidecarStatus   Rule = "no-sidecar-status"
	RuleProxyNotRunning   Rule = "proxy-not-running"
	RuleAmbientPod        Rule = "ambient-pod"
	RuleAmbientNamespace  Rule = "ambient-namespace"
	RuleAmbientOptOut     Rule = "ambient-opt-out"
	RuleInjectionMissing  Rule = "injection-missing"
	RuleNotInMesh         Rule = "not-in-mesh"
)

// Names Istio gives its injected containers and uses in its labels.
const (
	ProxyContainer     = "istio-proxy"
	InitContainer      = "istio-init"
	InjectionNSLabel   = "istio-injection" // namespace label: enabled / disabled
	DataplaneAmbient   = "ambient"
	DataplaneNone      = "none"
	AgentLabelDefault  = "app.kubernetes.io/name"
	AgentLabelValue    = "sidelane"
	DefaultExcludedNS  = "kube-system"
	disableEnvoyEnvVar = "DISABLE_ENVOY"
)

// Config is the node agent's classification policy.
type Config struct {
	// ExcludedNamespaces are never touched (Istio CNI's excludeNamespaces).
	ExcludedNamespaces []string
	// AgentNamespace and AgentLabels identify sidelane's own pods, which are
	// never captured: an agent that captured itself could not come back up.
	// An empty AgentNamespace matches every namespace; empty AgentLabels
	// match no pod.
	AgentNamespace string
	AgentLabels    map[string]string
}

// DefaultConfig excludes kube-system and recognizes the agent by the
// app.kubernetes.io/name=sidelane label.
func DefaultConfig() Config {
	return Config{
		ExcludedNamespaces: []string{DefaultExcludedNS},
		AgentLabels:        map[string]string{AgentLabelDefault: AgentLabelValue},
	}
}

// ParseNamespaces parses a comma-separated namespace list (a flag value).
// Every name must be a valid namespace name; empty items are skipped.
func ParseNamespaces(s string) ([]string, error) {
	var out []string
	for item := range strings.SplitSeq(s, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		if errs := validation.IsDNS1123Label(item); len(errs) > 0 {
			return nil, fmt.Errorf("namespace %q: %s", item, strings.Join(errs, "; "))
		}
		if !slices.Contains(out, item) {
			out = append(out, item)
		}
	}
	return out, nil
}

// Input is everything the decision depends on.
type Input struct {
	Pod             *corev1.Pod
	NamespaceLabels map[string]string
}

// Decision is the verdict for one pod.
type Decision struct {
	Mode   Mode   `json:"mode"`
	Rule   Rule   `json:"rule"`
	Reason string `json:"reason"`
	// Sidecar describes the pod's injected sidecar when it has one (also
	// when the pod is left alone despite it, e.g. istio-init captures it).
	Sidecar *Sidecar `json:"sidecar,omitempty"`
}

// Sidecar is what the pod spec says about its Istio sidecar.
type Sidecar struct {
	// Native: istio-proxy is a Kubernetes native sidecar (an init container
	// with restartPolicy Always) rather than a regular container.
	Native bool `json:"native"`
	// Revision is the control-plane revision that injected it, from the
	// sidecar.istio.io/status annotation ("default" for the default one).
	Revision string `json:"revision,omitempty"`
}

// Classify decides the pod's mode. The order of the checks matters and
// mirrors Istio: pods sidelane must never touch first, then an injected
// sidecar (which wins over ambient labels, as in Istio), then ambient.
func Classify(cfg Config, in Input) Decision {
	pod := in.Pod
	switch {
	case isAgentPod(cfg, pod):
		return none(RuleAgentPod, "sidelane's own agent pod is never captured")
	case pod.Spec.HostNetwork:
		return none(RuleHostNetwork, "the pod uses the host's network namespace (hostNetwork: true), which sidelane never captures")
	case slices.Contains(cfg.ExcludedNamespaces, pod.Namespace):
		return none(RuleExcludedNamespace, fmt.Sprintf("namespace %s is excluded from capture (--excluded-namespaces)", pod.Namespace))
	}

	proxy, native := proxyContainer(pod)
	_, hasStatus := pod.Annotations[annotation.SidecarStatus.Name]
	if proxy != nil {
		if d, ok := classifySidecar(pod, proxy, native, hasStatus); ok {
			return d
		}
	}
	if hasStatus && proxy == nil {
		// Istio never enrolls a pod carrying the injection status in
		// ambient: ztunnel and a sidecar on one pod is unsupported.
		return none(RuleProxyNotRunning, fmt.Sprintf("the pod has the %s annotation but no %s container, and Istio puts injected pods in neither sidecar nor ambient mode", annotation.SidecarStatus.Name, ProxyContainer))
	}
	if d, ok := classifyAmbient(pod, in.NamespaceLabels); ok {
		return d
	}
	if proxy != nil {
		return none(RuleNoSidecarStatus, fmt.Sprintf("the pod has an %s container but no %s annotation: Istio did not inject it, and Istio CNI leaves such pods alone", ProxyContainer, annotation.SidecarStatus.Name))
	}
	return notInMesh(pod, in.NamespaceLabels)
}

func none(r Rule, reason string) Decision { return Decision{Mode: ModeNone, Rule: r, Reason: reason} }

func isAgentPod(cfg Config, pod *corev1.Pod) bool {
	if len(cfg.AgentLabels) == 0 {
		return false
	}
	if cfg.AgentNamespace != "" && pod.Namespace != cfg.AgentNamespace {
		return false
	}
	for k, v := range cfg.AgentLabels {
		if pod.Labels[k] != v {
			return false
		}
	}
	return true
}

// proxyContainer finds istio-proxy among the containers or the init
// containers. native reports it is an init container with restartPolicy
// Always (a Kubernetes native sidecar); an init container without it is
// returned with native false and must not count as a running proxy.
func proxyContainer(pod *corev1.Pod) (c *corev1.Container, native bool) {
	for i := range pod.Spec.InitContainers {
		ic := &pod.Spec.InitContainers[i]
		if ic.Name == ProxyContainer {
			return ic, ic.RestartPolicy != nil && *ic.RestartPolicy == corev1.ContainerRestartPolicyAlways
		}
	}
	for i := range pod.Spec.Containers {
		if pod.Spec.Containers[i].Name == ProxyContainer {
			return &pod.Spec.Containers[i], false
		}
	}
	return nil, false
}

func isInitOnly(pod *corev1.Pod, c *corev1.Container, native bool) bool {
	if native {
		return false
	}
	for i := range pod.Spec.InitContainers {
		if &pod.Spec.InitContainers[i] == c {
			return true
		}
	}
	return false
}

// classifySidecar applies Istio CNI's checks for a pod with an istio-proxy
// container, in its order. ok is false when the pod has no usable sidecar
// and the ambient rules decide instead.
func classifySidecar(pod *corev1.Pod, proxy *corev1.Container, native, hasStatus bool) (Decision, bool) {
	sc := &Sidecar{Native: native, Revision: statusRevision(pod.Annotations[annotation.SidecarStatus.Name])}
	with := func(d Decision) (Decision, bool) { d.Sidecar = sc; return d, true }

	if isInitOnly(pod, proxy, native) {
		// Istio CNI would capture this pod, but an init container that is
		// not a native sidecar exits before the app starts: capturing to an
		// Envoy that is not running would black-hole the pod's traffic.
		return with(none(RuleProxyNotRunning, fmt.Sprintf("%s is an init container without restartPolicy: Always, so no sidecar runs next to the app", ProxyContainer)))
	}
	if hasContainer(pod.Spec.InitContainers, InitContainer) {
		return with(none(RuleIstioInit, fmt.Sprintf("the pod has Istio's %s init container, whose iptables rules already capture its traffic (the injector ran without Istio CNI)", InitContainer)))
	}
	if v, ok := envValue(proxy, disableEnvoyEnvVar); ok {
		if b, err := strconv.ParseBool(v); err == nil && b {
			return with(none(RuleEnvoyDisabled, fmt.Sprintf("%s sets %s=%s: no Envoy runs to receive captured traffic", ProxyContainer, disableEnvoyEnvVar, v)))
		}
	}
	if len(proxy.Args) >= 2 && proxy.Args[0] == "proxy" && proxy.Args[1] != "sidecar" {
		return with(none(RuleProxyNotSidecar, fmt.Sprintf("%s runs as %q (a gateway), not as a sidecar: gateways are not captured", ProxyContainer, proxy.Args[1])))
	}
	if v, src := injectSetting(pod); v != "" {
		if b, err := strconv.ParseBool(v); err == nil && !b {
			return with(none(RuleInjectDisabled, fmt.Sprintf("%s %s=%s disables the sidecar", src, label.SidecarInject.Name, v)))
		}
	}
	if !hasStatus {
		return Decision{}, false
	}
	kind := "a regular container"
	if native {
		kind = "a native sidecar (init container with restartPolicy: Always)"
	}
	rev := ""
	if sc.Revision != "" {
		rev = ", revision " + sc.Revision
	}
	return with(Decision{
		Mode:   ModeSidecar,
		Rule:   RuleSidecar,
		Reason: fmt.Sprintf("Istio injected a sidecar (%s annotation, %s as %s%s)", annotation.SidecarStatus.Name, ProxyContainer, kind, rev),
	})
}

// classifyAmbient applies Istio's default ambient enablement selectors: the
// pod label istio.io/dataplane-mode=ambient, or the namespace label unless
// the pod opts out with istio.io/dataplane-mode=none.
func classifyAmbient(pod *corev1.Pod, nsLabels map[string]string) (Decision, bool) {
	key := label.IoIstioDataplaneMode.Name
	podMode, podSet := pod.Labels[key]
	switch {
	case podMode == DataplaneAmbient:
		return Decision{Mode: ModeNode, Rule: RuleAmbientPod, Reason: fmt.Sprintf("pod labeled %s=%s", key, DataplaneAmbient)}, true
	case nsLabels[key] == DataplaneAmbient && podMode == DataplaneNone:
		return none(RuleAmbientOptOut, fmt.Sprintf("namespace %s is labeled %s=%s but the pod opts out with %s=%s", pod.Namespace, key, DataplaneAmbient, key, DataplaneNone)), true
	case nsLabels[key] == DataplaneAmbient:
		r := fmt.Sprintf("namespace %s labeled %s=%s", pod.Namespace, key, DataplaneAmbient)
		if podSet {
			r += fmt.Sprintf(" (the pod's own value %q is neither %s nor %s)", podMode, DataplaneAmbient, DataplaneNone)
		}
		return Decision{Mode: ModeNode, Rule: RuleAmbientNamespace, Reason: r}, true
	}
	return Decision{}, false
}

// notInMesh explains a pod left alone, saying which injection label would
// have given it a sidecar when one is set: the pod was created before the
// label, or without the injector webhook, and needs a restart.
func notInMesh(pod *corev1.Pod, nsLabels map[string]string) Decision {
	if v, src := injectSetting(pod); v != "" {
		if b, err := strconv.ParseBool(v); err == nil && !b {
			return none(RuleInjectDisabled, fmt.Sprintf("%s %s=%s disables the sidecar, and no ambient label applies", src, label.SidecarInject.Name, v))
		}
	}
	var want string
	switch {
	case nsLabels[InjectionNSLabel] == "enabled":
		want = fmt.Sprintf("namespace %s has %s=enabled", pod.Namespace, InjectionNSLabel)
	case nsLabels[InjectionNSLabel] == "" && nsLabels[label.IoIstioRev.Name] != "":
		want = fmt.Sprintf("namespace %s has %s=%s", pod.Namespace, label.IoIstioRev.Name, nsLabels[label.IoIstioRev.Name])
	case nsLabels[InjectionNSLabel] == "" && pod.Labels[label.IoIstioRev.Name] != "":
		want = fmt.Sprintf("the pod has %s=%s", label.IoIstioRev.Name, pod.Labels[label.IoIstioRev.Name])
	case nsLabels[InjectionNSLabel] == "" && pod.Labels[label.SidecarInject.Name] == "true":
		want = fmt.Sprintf("the pod has %s=true", label.SidecarInject.Name)
	}
	if want != "" {
		return none(RuleInjectionMissing, want+" but no sidecar was injected (created before the label, or the injector did not run): restart the pod to inject it")
	}
	return none(RuleNotInMesh, fmt.Sprintf("not in the mesh: no Istio sidecar and no %s=%s label on the pod or namespace", label.IoIstioDataplaneMode.Name, DataplaneAmbient))
}

// injectSetting returns sidecar.istio.io/inject from the label, else the
// (deprecated) annotation: Istio prefers the label when both are set.
func injectSetting(pod *corev1.Pod) (value, source string) {
	if v, ok := pod.Labels[label.SidecarInject.Name]; ok {
		return v, "label"
	}
	if v, ok := pod.Annotations[annotation.SidecarInject.Name]; ok {
		return v, "annotation"
	}
	return "", ""
}

// statusRevision reads "revision" from the sidecar.istio.io/status JSON;
// a value that does not parse yields "" (the annotation's presence is what
// counts, as in Istio).
func statusRevision(status string) string {
	var s struct {
		Revision string `json:"revision"`
	}
	if json.Unmarshal([]byte(status), &s) != nil {
		return ""
	}
	return s.Revision
}

func hasContainer(cs []corev1.Container, name string) bool {
	return slices.ContainsFunc(cs, func(c corev1.Container) bool { return c.Name == name })
}

func envValue(c *corev1.Container, name string) (string, bool) {
	for _, e := range c.Env {
		if e.Name == name {
			return e.Value, true
		}
	}
	return "", false
}

// Live re-decides the mode of a pod that is already running, from the
// decision it got when its sandbox was created (at, from CNI ADD) and the
// pod and namespace as they are now. It is the trust rule for anyone who
// can patch a pod: Istio decides capture once, at pod creation (its
// injector mutates the pod at admission, istio-cni programs the netns when
// the sandbox is created), so a running pod's labels and annotations must
// not be able to switch its capture off. Live therefore lets only these
// move a running pod:
//
//   - the istio.io/dataplane-mode label of the pod's namespace, and the
//     pod's own istio.io/dataplane-mode label (Istio ambient does the same),
//     and only for a pod whose creation-time decision came from the ambient
//     rules (it has no Istio sidecar): such a pod moves between node and
//     none;
//   - the agent's own --excluded-namespaces (the operator's, not the pod's,
//     setting): a pod in an excluded namespace goes to none.
//
// Everything else is fixed for the pod's life: a sidecar pod stays sidecar
// (removing sidecar.istio.io/status or labeling sidecar.istio.io/inject=false
// changes nothing while it runs), a pod left alone for a sidecar reason
// (istio-init, gateway, DISABLE_ENVOY, inject=false next to an istio-proxy,
// an injection status without istio-proxy) never moves to node, and neither
// does the agent's own pod; a node pod never moves to none by gaining the
// status annotation or the agent's labels. held is non-empty when the pod's
// current labels and annotations would decide differently for a new pod: it
// says what the pod would get after a restart, for a log line and an Event.
//
// at.Rule may be empty (an attachment recorded before the rule was kept):
// a sidecar or node attachment keeps its family, a none attachment takes the
// rule Classify gives now.
func Live(cfg Config, at Decision, in Input) (d Decision, held string) {
	pod := in.Pod
	now := Classify(cfg, in)
	if at.Rule == "" {
		at.Rule = legacyRule(at.Mode, now.Rule)
	}
	switch {
	case slices.Contains(cfg.ExcludedNamespaces, pod.Namespace):
		d = none(RuleExcludedNamespace, fmt.Sprintf("namespace %s is excluded from capture (--excluded-namespaces)", pod.Namespace))
	case Movable(at.Rule, pod):
		d = ambientOrNone(pod, in.NamespaceLabels)
	default:
		d = at
	}
	if now.Mode != d.Mode {
		held = fmt.Sprintf("a new pod with these labels and annotations would get %s mode (%s), but a running pod's capture is fixed when it is created (only istio.io/dataplane-mode labels move it): restart the pod to apply", now.Mode, now.Reason)
	}
	return d, held
}

// Movable reports whether a running pod whose creation-time decision had
// rule r may be moved by the istio.io/dataplane-mode labels: only a pod the
// ambient rules decided, i.e. one without a usable Istio sidecar. Whether the
// pod has an istio-proxy container cannot change while it runs (a pod's
// containers are immutable), so it tells the two inject-disabled cases
// apart.
func Movable(r Rule, pod *corev1.Pod) bool {
	switch r {
	case RuleAmbientPod, RuleAmbientNamespace, RuleAmbientOptOut, RuleInjectionMissing, RuleNotInMesh, RuleNoSidecarStatus:
		return true
	case RuleInjectDisabled:
		proxy, _ := proxyContainer(pod)
		return proxy == nil // inject=false on a pod without a sidecar: decided by notInMesh
	}
	return false
}

// ambientOrNone is Classify's decision for a pod that the sidecar rules
// do not decide, from the dataplane-mode labels alone.
func ambientOrNone(pod *corev1.Pod, nsLabels map[string]string) Decision {
	if d, ok := classifyAmbient(pod, nsLabels); ok {
		return d
	}
	if proxy, _ := proxyContainer(pod); proxy != nil {
		return none(RuleNoSidecarStatus, fmt.Sprintf("the pod has an %s container that Istio did not inject when the pod was created, and Istio CNI leaves such pods alone", ProxyContainer))
	}
	return notInMesh(pod, nsLabels)
}

func legacyRule(mode Mode, nowRule Rule) Rule {
	switch mode {
	case ModeSidecar:
		return RuleSidecar
	case ModeNode:
		return RuleAmbientNamespace
	}
	return nowRule
}
