// Package compile turns L7Policies plus the pods they select into Envoy RBAC
// HTTP filter configs (envoy.extensions.filters.http.rbac.v3.RBAC). It is
// pure: no I/O, no clock, deterministic output, so its results are golden-
// tested and shared by the EnvoyFilter writer (sidecar mode) and the agent's
// xDS server (per-node mode).
//
// Semantics (the README's "L7 policy" section says the same):
//   - A port of a pod is protected when some valid policy selects the pod and
//     lists the port. A protected port allows only what some rule of some such
//     policy allows; everything else gets 403 (default deny on that port).
//   - Policies add up (union). A port listed with no rules denies everything
//     unless another policy allows something on it.
//   - Ports no policy lists are not touched.
//   - Invalid policies are left out and reported; they change nothing.
package compile

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	rbacfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/validate"
)

// Identity says how callers are recognised in the compiled rules.
type Identity string

const (
	// IdentityPeerCertificate matches callers by the SPIFFE URI SAN of their
	// mTLS peer certificate (Istio sidecars with mTLS on). Pod and namespace
	// selectors resolve to the service accounts of the selected pods.
	IdentityPeerCertificate Identity = "peer-certificate"
	// IdentitySourceIP matches callers by the source IP of the connection
	// (the per-node Envoy, which sees the pod's own address). Every "from"
	// field resolves to the IPs of the pods it matches.
	IdentitySourceIP Identity = "source-ip"
)

// Options parameterise a compilation.
type Options struct {
	Identity Identity `json:"identity"`
	// TrustDomain is the mesh's SPIFFE trust domain (Istio: cluster.local).
	TrustDomain string `json:"trustDomain"`
}

// Pod is what the compiler needs to know about a pod.
type Pod struct {
	Namespace      string            `json:"namespace"`
	Name           string            `json:"name"`
	Labels         map[string]string `json:"labels,omitempty"`
	ServiceAccount string            `json:"serviceAccount,omitempty"`
	IPs            []netip.Addr      `json:"ips,omitempty"`
}

// SPIFFE returns the pod's SPIFFE ID as Istio issues it.
func (p *Pod) SPIFFE(trustDomain string) string {
	sa := p.ServiceAccount
	if sa == "" {
		sa = "default"
	}
	return SPIFFE(trustDomain, p.Namespace, sa)
}

// SPIFFE builds spiffe://<trust-domain>/ns/<ns>/sa/<sa>.
func SPIFFE(trustDomain, ns, sa string) string {
	return "spiffe://" + trustDomain + "/ns/" + ns + "/sa/" + sa
}

// Namespace is what the compiler needs to know about a namespace.
type Namespace struct {
	Name   string            `json:"name"`
	Labels map[string]string `json:"labels,omitempty"`
}

// Inventory is the cluster state the policies are resolved against.
type Inventory struct {
	Pods       []Pod       `json:"pods,omitempty"`
	Namespaces []Namespace `json:"namespaces,omitempty"`
}

// Result is a compilation's output.
type Result struct {
	// Groups are the protected pods, grouped by the exact set of policies
	// selecting them (pods of one group get identical filters). Sorted.
	Groups []Group
	// Policies reports on every input policy, in input order.
	Policies []PolicyReport
}

// PolicyReport is the per-policy outcome, the source of status conditions.
type PolicyReport struct {
	Namespace, Name string
	// SelectedPods counts the pods the policy selects (0 when invalid).
	SelectedPods int
	// Err is the validation error; an invalid policy is left out.
	Err error
}

// Group is a set of pods in one namespace selected by the same policies.
type Group struct {
	Namespace string
	// Policies are the names of the selecting policies, sorted.
	Policies []string
	// Pods are the selected pods, sorted by name.
	Pods []PodRef
	// Ports are the protected ports, sorted.
	Ports []Port
}

// PodRef names a selected pod and carries its labels and IPs.
type PodRef struct {
	Name   string
	Labels map[string]string
	IPs    []netip.Addr
}

// Port is one protected port and its RBAC filter config.
type Port struct {
	Port int32
	RBAC *rbacfilterv3.RBAC
}

// Compile resolves the policies against inv. Invalid policies are reported
// in Result.Policies and otherwise ignored; the error is only for bad options
// or a config the Envoy protos reject (a bug).
func Compile(policies []v1alpha1.L7Policy, inv Inventory, opts Options) (*Result, error) {
	switch opts.Identity {
	case IdentityPeerCertificate, IdentitySourceIP:
	default:
		return nil, fmt.Errorf("compile: identity %q: want %q or %q", opts.Identity, IdentityPeerCertificate, IdentitySourceIP)
	}
	if opts.TrustDomain == "" || strings.ContainsAny(opts.TrustDomain, "/* ") {
		return nil, fmt.Errorf("compile: trustDomain %q: must be a non-empty trust domain name", opts.TrustDomain)
	}
	c := &compiler{inv: inv, opts: opts, nsLabels: map[string]map[string]string{}}
	for _, ns := range inv.Namespaces {
		c.nsLabels[ns.Name] = ns.Labels
	}

	res := &Result{}
	type key struct{ ns, name string }
	byKey := map[key]*v1alpha1.L7Policy{}
	selected := map[key][]string{} // pod namespace/name -> policy names
	podByKey := map[key]*Pod{}
	for i := range policies {
		p := &policies[i]
		rep := PolicyReport{Namespace: p.Namespace, Name: p.Name}
		if errs := validate.Policy(p); len(errs) > 0 {
			rep.Err = errs.ToAggregate()
			res.Policies = append(res.Policies, rep)
			continue
		}
		sel, _ := metav1.LabelSelectorAsSelector(&p.Spec.PodSelector) // validated
		for j := range inv.Pods {
			pod := &inv.Pods[j]
			if pod.Namespace != p.Namespace || !sel.Matches(labels.Set(pod.Labels)) {
				continue
			}
			rep.SelectedPods++
			k := key{pod.Namespace, pod.Name}
			selected[k] = append(selected[k], p.Name)
			podByKey[k] = pod
		}
		byKey[key{p.Namespace, p.Name}] = p
		res.Policies = append(res.Policies, rep)
	}

	groups := map[string]*Group{}
	for k, names := range selected {
		slices.Sort(names)
		names = slices.Compact(names)
		gk := k.ns + "\x00" + strings.Join(names, "\x00")
		g := groups[gk]
		if g == nil {
			g = &Group{Namespace: k.ns, Policies: names}
			groups[gk] = g
		}
		pod := podByKey[k]
		ips := slices.Clone(pod.IPs)
		slices.SortFunc(ips, netip.Addr.Compare)
		g.Pods = append(g.Pods, PodRef{Name: pod.Name, Labels: pod.Labels, IPs: ips})
	}
	for _, g := range groups {
		sort.Slice(g.Pods, func(i, j int) bool { return g.Pods[i].Name < g.Pods[j].Name })
		var ps []*v1alpha1.L7Policy
		for _, n := range g.Policies {
			ps = append(ps, byKey[key{g.Namespace, n}])
		}
		ports, err := c.ports(ps)
		if err != nil {
			return nil, err
		}
		g.Ports = ports
		res.Groups = append(res.Groups, *g)
	}
	sort.Slice(res.Groups, func(i, j int) bool {
		a, b := res.Groups[i], res.Groups[j]
		if a.Namespace != b.Namespace {
			return a.Namespace < b.Namespace
		}
		return strings.Join(a.Policies, ",") < strings.Join(b.Policies, ",")
	})
	return res, nil
}

type compiler struct {
	inv      Inventory
	opts     Options
	nsLabels map[string]map[string]string
}

// ports builds one RBAC config per port any of ps lists, from the rules of
// the policies that list it.
func (c *compiler) ports(ps []*v1alpha1.L7Policy) ([]Port, error) {
	byPort := map[int32]map[string]*rbacv3.Policy{}
	for _, p := range ps {
		for _, pr := range p.Spec.Ports {
			m := byPort[pr.Port]
			if m == nil {
				m = map[string]*rbacv3.Policy{}
				byPort[pr.Port] = m
			}
			for i := range pr.Rules {
				// The name traces an Envoy RBAC policy (and its stats and
				// logs) back to the L7Policy rule it came from.
				name := fmt.Sprintf("%s/%s/port-%d/rule-%d", p.Namespace, p.Name, pr.Port, i)
				m[name] = c.rule(p, &pr.Rules[i])
			}
		}
	}
	var out []Port
	for port, policies := range byPort {
		cfg := &rbacfilterv3.RBAC{Rules: &rbacv3.RBAC{Action: rbacv3.RBAC_ALLOW, Policies: policies}}
		if err := cfg.ValidateAll(); err != nil {
			return nil, fmt.Errorf("compile: port %d: envoy rejects the rbac config: %w", port, err)
		}
		out = append(out, Port{Port: port, RBAC: cfg})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Port < out[j].Port })
	return out, nil
}

func (c *compiler) rule(p *v1alpha1.L7Policy, r *v1alpha1.Rule) *rbacv3.Policy {
	perm := anyPermission()
	if len(r.HTTP) > 0 {
		var alts []*rbacv3.Permission
		for i := range r.HTTP {
			alts = append(alts, httpPermission(&r.HTTP[i]))
		}
		perm = orPermissions(alts)
	}
	princ := anyPrincipal()
	if len(r.From) > 0 {
		var alts []*rbacv3.Principal
		for i := range r.From {
			alts = append(alts, c.peer(p.Namespace, &r.From[i]))
		}
		princ = orPrincipals(alts)
	}
	return &rbacv3.Policy{Permissions: []*rbacv3.Permission{perm}, Principals: []*rbacv3.Principal{princ}}
}

func httpPermission(h *v1alpha1.HTTPRule) *rbacv3.Permission {
	var all []*rbacv3.Permission
	if h.Method != "" {
		all = append(all, headerPermission(&routev3.HeaderMatcher{Name: ":method", HeaderMatchSpecifier: regexHeader(h.Method)}))
	}
	if h.Path != "" {
		all = append(all, &rbacv3.Permission{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcherv3.PathMatcher{
			Rule: &matcherv3.PathMatcher_Path{Path: regexString(h.Path)}}}})
	}
	if h.Host != "" {
		all = append(all, headerPermission(&routev3.HeaderMatcher{Name: ":authority", HeaderMatchSpecifier: regexHeader(h.Host)}))
	}
	for _, hm := range h.Headers {
		m := &routev3.HeaderMatcher{Name: strings.ToLower(hm.Name)}
		switch {
		case hm.Exact != nil:
			m.HeaderMatchSpecifier = &routev3.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{
				MatchPattern: &matcherv3.StringMatcher_Exact{Exact: *hm.Exact}}}
		case hm.Regex != nil:
			m.HeaderMatchSpecifier = regexHeader(*hm.Regex)
		default:
			// present_match true + invert_match for "absent": the form both
			// Envoy and grpc-go read the same way.
			m.HeaderMatchSpecifier = &routev3.HeaderMatcher_PresentMatch{PresentMatch: true}
			m.InvertMatch = !*hm.Present
		}
		all = append(all, headerPermission(m))
	}
	switch len(all) {
	case 0:
		return anyPermission()
	case 1:
		return all[0]
	}
	return &rbacv3.Permission{Rule: &rbacv3.Permission_AndRules{AndRules: &rbacv3.Permission_Set{Rules: all}}}
}

// peer compiles one "from" entry: every set field must match.
func (c *compiler) peer(policyNS string, p *v1alpha1.Peer) *rbacv3.Principal {
	if c.opts.Identity == IdentitySourceIP {
		return c.peerByIP(policyNS, p)
	}
	var all []*rbacv3.Principal
	if len(p.Principals) > 0 {
		var alts []*rbacv3.Principal
		for _, s := range p.Principals {
			if prefix, ok := strings.CutSuffix(s, "*"); ok {
				alts = append(alts, authenticated(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: prefix}}))
			} else {
				alts = append(alts, authenticated(exact(s)))
			}
		}
		all = append(all, orPrincipals(alts))
	}
	if len(p.Namespaces) > 0 {
		var alts []*rbacv3.Principal
		for _, ns := range p.Namespaces {
			prefix := "spiffe://" + c.opts.TrustDomain + "/ns/" + ns + "/sa/"
			alts = append(alts, authenticated(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: prefix}}))
		}
		all = append(all, orPrincipals(alts))
	}
	if len(p.ServiceAccounts) > 0 {
		var alts []*rbacv3.Principal
		for _, s := range p.ServiceAccounts {
			ns, sa, _ := strings.Cut(s, "/")
			alts = append(alts, authenticated(exact(SPIFFE(c.opts.TrustDomain, ns, sa))))
		}
		all = append(all, orPrincipals(alts))
	}
	if p.PodSelector != nil || p.NamespaceSelector != nil {
		// A certificate names a service account, not a pod: the selector
		// admits every pod sharing a selected pod's service account.
		ids := map[string]bool{}
		for _, pod := range c.selectPods(policyNS, p.PodSelector, p.NamespaceSelector) {
			ids[pod.SPIFFE(c.opts.TrustDomain)] = true
		}
		var alts []*rbacv3.Principal
		for _, id := range sortedKeys(ids) {
			alts = append(alts, authenticated(exact(id)))
		}
		all = append(all, orPrincipals(alts))
	}
	return andPrincipals(all)
}

// peerByIP resolves every set field to pods, intersects them and matches the
// connection's source address against their IPs.
func (c *compiler) peerByIP(policyNS string, p *v1alpha1.Peer) *rbacv3.Principal {
	match := make([]bool, len(c.inv.Pods))
	for i := range match {
		match[i] = true
	}
	keep := func(f func(*Pod) bool) {
		for i := range c.inv.Pods {
			match[i] = match[i] && f(&c.inv.Pods[i])
		}
	}
	if len(p.Principals) > 0 {
		keep(func(pod *Pod) bool {
			id := pod.SPIFFE(c.opts.TrustDomain)
			for _, s := range p.Principals {
				if prefix, ok := strings.CutSuffix(s, "*"); ok && strings.HasPrefix(id, prefix) || s == id {
					return true
				}
			}
			return false
		})
	}
	if len(p.Namespaces) > 0 {
		keep(func(pod *Pod) bool { return slices.Contains(p.Namespaces, pod.Namespace) })
	}
	if len(p.ServiceAccounts) > 0 {
		keep(func(pod *Pod) bool {
			sa := pod.ServiceAccount
			if sa == "" {
				sa = "default"
			}
			return slices.Contains(p.ServiceAccounts, pod.Namespace+"/"+sa)
		})
	}
	if p.PodSelector != nil || p.NamespaceSelector != nil {
		sel := map[*Pod]bool{}
		for _, pod := range c.selectPods(policyNS, p.PodSelector, p.NamespaceSelector) {
			sel[pod] = true
		}
		keep(func(pod *Pod) bool { return sel[pod] })
	}
	var ips []netip.Addr
	for i, ok := range match {
		if ok {
			ips = append(ips, c.inv.Pods[i].IPs...)
		}
	}
	slices.SortFunc(ips, netip.Addr.Compare)
	ips = slices.Compact(ips)
	var alts []*rbacv3.Principal
	for _, ip := range ips {
		alts = append(alts, &rbacv3.Principal{Identifier: &rbacv3.Principal_DirectRemoteIp{DirectRemoteIp: &corev3.CidrRange{
			AddressPrefix: ip.String(), PrefixLen: wrapperspb.UInt32(uint32(ip.BitLen()))}}})
	}
	return orPrincipals(alts)
}

// selectPods follows NetworkPolicy: a pod selector alone means pods of the
// policy's namespace; a namespace selector alone means every pod of the
// selected namespaces; both mean selected pods in selected namespaces.
func (c *compiler) selectPods(policyNS string, podSel, nsSel *metav1.LabelSelector) []*Pod {
	ps := labels.Everything()
	if podSel != nil {
		ps, _ = metav1.LabelSelectorAsSelector(podSel) // validated
	}
	var ns labels.Selector
	if nsSel != nil {
		ns, _ = metav1.LabelSelectorAsSelector(nsSel)
	}
	var out []*Pod
	for i := range c.inv.Pods {
		pod := &c.inv.Pods[i]
		if ns == nil && pod.Namespace != policyNS {
			continue
		}
		if ns != nil && !ns.Matches(labels.Set(c.nsLabels[pod.Namespace])) {
			continue
		}
		if ps.Matches(labels.Set(pod.Labels)) {
			out = append(out, pod)
		}
	}
	return out
}

func regexString(re string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: re}}}
}

func regexHeader(re string) *routev3.HeaderMatcher_StringMatch {
	return &routev3.HeaderMatcher_StringMatch{StringMatch: regexString(re)}
}

func exact(s string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: s}}
}

func headerPermission(m *routev3.HeaderMatcher) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: m}}
}

func authenticated(m *matcherv3.StringMatcher) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{PrincipalName: m}}}
}

func anyPermission() *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_Any{Any: true}}
}

func anyPrincipal() *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_Any{Any: true}}
}

// nobody matches no caller: a "from" entry that resolves to no pods.
func nobody() *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_NotId{NotId: anyPrincipal()}}
}

func orPermissions(alts []*rbacv3.Permission) *rbacv3.Permission {
	if len(alts) == 1 {
		return alts[0]
	}
	return &rbacv3.Permission{Rule: &rbacv3.Permission_OrRules{OrRules: &rbacv3.Permission_Set{Rules: alts}}}
}

func orPrincipals(alts []*rbacv3.Principal) *rbacv3.Principal {
	switch len(alts) {
	case 0:
		return nobody()
	case 1:
		return alts[0]
	}
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_OrIds{OrIds: &rbacv3.Principal_Set{Ids: alts}}}
}

func andPrincipals(all []*rbacv3.Principal) *rbacv3.Principal {
	if len(all) == 1 {
		return all[0]
	}
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_AndIds{AndIds: &rbacv3.Principal_Set{Ids: all}}}
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// ForPod returns the group holding pod namespace/name: the policies that
// apply to it and its protected ports (what `sidelane explain` shows).
// False means no valid policy selects the pod.
func (r *Result) ForPod(namespace, name string) (*Group, bool) {
	for i := range r.Groups {
		g := &r.Groups[i]
		if g.Namespace != namespace {
			continue
		}
		for _, p := range g.Pods {
			if p.Name == name {
				return g, true
			}
		}
	}
	return nil, false
}
