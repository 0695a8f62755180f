// Package validate checks L7Policy objects: the same rules the CRD schema and
// its CEL expressions enforce at admission, plus what CEL cannot express
// (RE2 regexes compile, label selectors parse). The agent and the EnvoyFilter
// writer run these before compiling, so an object admitted by an older CRD
// still cannot reach a proxy half-checked.
package validate

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	metav1validation "k8s.io/apimachinery/pkg/apis/meta/v1/validation"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"sigs.k8s.io/yaml"

	"github.com/sidelane/sidelane/policy/api/v1alpha1"
)

// Limits shared with the CRD schema (maxItems / maxLength), which keep the
// CEL cost estimate bounded and a single policy's Envoy config reasonable.
const (
	MaxPorts       = 16
	MaxRules       = 16
	MaxPeers       = 16
	MaxHTTP        = 16
	MaxHeaders     = 16
	MaxListItems   = 256
	MaxRegexLength = 1024
)

// Policy returns every problem with p, each naming its field path.
func Policy(p *v1alpha1.L7Policy) field.ErrorList {
	var errs field.ErrorList
	meta := field.NewPath("metadata")
	if p.Name == "" {
		errs = append(errs, field.Required(meta.Child("name"), ""))
	} else {
		for _, m := range validation.IsDNS1123Subdomain(p.Name) {
			errs = append(errs, field.Invalid(meta.Child("name"), p.Name, m))
		}
	}
	if p.Namespace == "" {
		errs = append(errs, field.Required(meta.Child("namespace"), ""))
	} else {
		for _, m := range validation.IsDNS1123Label(p.Namespace) {
			errs = append(errs, field.Invalid(meta.Child("namespace"), p.Namespace, m))
		}
	}
	return append(errs, Spec(&p.Spec, field.NewPath("spec"))...)
}

// Spec validates an L7PolicySpec found at path.
func Spec(s *v1alpha1.L7PolicySpec, path *field.Path) field.ErrorList {
	errs := selector(&s.PodSelector, path.Child("podSelector"))
	ports := path.Child("ports")
	switch {
	case len(s.Ports) == 0:
		errs = append(errs, field.Required(ports, "at least one port"))
	case len(s.Ports) > MaxPorts:
		errs = append(errs, field.TooMany(ports, len(s.Ports), MaxPorts))
	}
	seen := map[int32]bool{}
	for i := range s.Ports {
		pr := &s.Ports[i]
		pp := ports.Index(i)
		if pr.Port < 1 || pr.Port > 65535 {
			errs = append(errs, field.Invalid(pp.Child("port"), pr.Port, "must be between 1 and 65535"))
		} else if seen[pr.Port] {
			errs = append(errs, field.Duplicate(pp.Child("port"), pr.Port))
		}
		seen[pr.Port] = true
		if len(pr.Rules) > MaxRules {
			errs = append(errs, field.TooMany(pp.Child("rules"), len(pr.Rules), MaxRules))
		}
		for j := range pr.Rules {
			errs = append(errs, rule(&pr.Rules[j], pp.Child("rules").Index(j))...)
		}
	}
	return errs
}

func rule(r *v1alpha1.Rule, path *field.Path) field.ErrorList {
	var errs field.ErrorList
	if len(r.From) > MaxPeers {
		errs = append(errs, field.TooMany(path.Child("from"), len(r.From), MaxPeers))
	}
	for i := range r.From {
		errs = append(errs, peer(&r.From[i], path.Child("from").Index(i))...)
	}
	if len(r.HTTP) > MaxHTTP {
		errs = append(errs, field.TooMany(path.Child("http"), len(r.HTTP), MaxHTTP))
	}
	for i := range r.HTTP {
		errs = append(errs, httpRule(&r.HTTP[i], path.Child("http").Index(i))...)
	}
	return errs
}

func peer(p *v1alpha1.Peer, path *field.Path) field.ErrorList {
	var errs field.ErrorList
	if len(p.Principals)+len(p.Namespaces)+len(p.ServiceAccounts) == 0 && p.PodSelector == nil && p.NamespaceSelector == nil {
		errs = append(errs, field.Required(path, "at least one of principals, namespaces, serviceAccounts, podSelector, namespaceSelector"))
	}
	for _, l := range []struct {
		name string
		n    int
	}{{"principals", len(p.Principals)}, {"namespaces", len(p.Namespaces)}, {"serviceAccounts", len(p.ServiceAccounts)}} {
		if l.n > MaxListItems {
			errs = append(errs, field.TooMany(path.Child(l.name), l.n, MaxListItems))
		}
	}
	for i, s := range p.Principals {
		if err := Principal(s); err != nil {
			errs = append(errs, field.Invalid(path.Child("principals").Index(i), s, err.Error()))
		}
	}
	for i, s := range p.Namespaces {
		for _, m := range validation.IsDNS1123Label(s) {
			errs = append(errs, field.Invalid(path.Child("namespaces").Index(i), s, m))
		}
	}
	for i, s := range p.ServiceAccounts {
		ns, name, ok := strings.Cut(s, "/")
		msgs := validation.IsDNS1123Label(ns)
		msgs = append(msgs, validation.IsDNS1123Subdomain(name)...)
		if !ok || len(msgs) > 0 {
			errs = append(errs, field.Invalid(path.Child("serviceAccounts").Index(i), s, "must be <namespace>/<name>"))
		}
	}
	if p.PodSelector != nil {
		errs = append(errs, selector(p.PodSelector, path.Child("podSelector"))...)
	}
	if p.NamespaceSelector != nil {
		errs = append(errs, selector(p.NamespaceSelector, path.Child("namespaceSelector"))...)
	}
	return errs
}

// Principal checks a SPIFFE ID pattern: spiffe://<trust-domain>/<path>, with
// an optional single "*" at the very end meaning "any suffix".
func Principal(s string) error {
	rest, ok := strings.CutPrefix(s, "spiffe://")
	if !ok {
		return fmt.Errorf("must start with spiffe://")
	}
	body := strings.TrimSuffix(rest, "*")
	if strings.Contains(body, "*") {
		return fmt.Errorf("\"*\" is allowed only at the end")
	}
	td, _, _ := strings.Cut(body, "/")
	if td == "" && rest != "*" { // "spiffe://*" alone means any SPIFFE ID
		return fmt.Errorf("trust domain is empty")
	}
	for _, r := range body {
		if r <= ' ' || r == 0x7f {
			return fmt.Errorf("must not contain spaces or control characters")
		}
	}
	return nil
}

func httpRule(h *v1alpha1.HTTPRule, path *field.Path) field.ErrorList {
	var errs field.ErrorList
	errs = append(errs, regex(h.Method, path.Child("method"))...)
	errs = append(errs, regex(h.Path, path.Child("path"))...)
	errs = append(errs, regex(h.Host, path.Child("host"))...)
	if len(h.Headers) > MaxHeaders {
		errs = append(errs, field.TooMany(path.Child("headers"), len(h.Headers), MaxHeaders))
	}
	for i := range h.Headers {
		errs = append(errs, header(&h.Headers[i], path.Child("headers").Index(i))...)
	}
	return errs
}

func header(h *v1alpha1.HeaderMatch, path *field.Path) field.ErrorList {
	var errs field.ErrorList
	switch {
	case h.Name == "":
		errs = append(errs, field.Required(path.Child("name"), ""))
	case strings.HasPrefix(h.Name, ":"):
		errs = append(errs, field.Invalid(path.Child("name"), h.Name, "pseudo-headers are not allowed: use method, path or host"))
	case !isToken(h.Name):
		errs = append(errs, field.Invalid(path.Child("name"), h.Name, "must be an HTTP header name (RFC 9110 token)"))
	}
	n := 0
	for _, set := range []bool{h.Exact != nil, h.Regex != nil, h.Present != nil} {
		if set {
			n++
		}
	}
	if n != 1 {
		errs = append(errs, field.Invalid(path, fmt.Sprintf("%d of exact, regex, present set", n), "exactly one of exact, regex, present must be set"))
	}
	if h.Regex != nil {
		if *h.Regex == "" {
			errs = append(errs, field.Required(path.Child("regex"), "an empty regex matches only an empty value: use exact: \"\""))
		}
		errs = append(errs, regex(*h.Regex, path.Child("regex"))...)
	}
	return errs
}

// regex checks an RE2 pattern. Go's regexp implements RE2 syntax, the
// dialect Envoy's safe_regex and grpc-go use.
func regex(s string, path *field.Path) field.ErrorList {
	if s == "" {
		return nil
	}
	if len(s) > MaxRegexLength {
		return field.ErrorList{field.TooLong(path, "", MaxRegexLength)}
	}
	if _, err := regexp.Compile(s); err != nil {
		return field.ErrorList{field.Invalid(path, s, "invalid RE2 regex: "+strings.TrimPrefix(err.Error(), "error parsing regexp: "))}
	}
	return nil
}

func selector(s *metav1.LabelSelector, path *field.Path) field.ErrorList {
	return metav1validation.ValidateLabelSelector(s, metav1validation.LabelSelectorValidationOptions{}, path)
}

func isToken(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0) {
			return false
		}
	}
	return true
}

// Decode parses one L7Policy from YAML or JSON, rejecting unknown fields and
// a wrong apiVersion or kind, and validates it. On error it returns nil.
func Decode(data []byte) (*v1alpha1.L7Policy, error) {
	js, err := yaml.YAMLToJSON(data)
	if err != nil {
		return nil, fmt.Errorf("decode l7policy: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.DisallowUnknownFields()
	var p v1alpha1.L7Policy
	if err := dec.Decode(&p); err != nil {
		return nil, fmt.Errorf("decode l7policy: %w", err)
	}
	if dec.More() {
		return nil, fmt.Errorf("decode l7policy: trailing data after the object")
	}
	if want := v1alpha1.SchemeGroupVersion.String(); p.APIVersion != want || p.Kind != v1alpha1.Kind {
		return nil, fmt.Errorf("decode l7policy: apiVersion/kind %q/%q, want %q/%q", p.APIVersion, p.Kind, want, v1alpha1.Kind)
	}
	if errs := Policy(&p); len(errs) > 0 {
		return nil, fmt.Errorf("l7policy %s/%s: %w", p.Namespace, p.Name, errs.ToAggregate())
	}
	return &p, nil
}
