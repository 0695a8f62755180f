// Package envoyfilter renders compiled L7 policy as Istio EnvoyFilter
// resources for sidecar-mode pods: per group of pods selected by the same
// policies, one EnvoyFilter whose workload selector picks exactly those pods
// and whose patches insert the RBAC HTTP filter before the router in the
// sidecar's inbound HTTP filter chain of every protected port, and a
// network RBAC filter before the TCP proxy in the port's inbound TCP filter
// chains (which istiod builds for ports whose protocol it sniffs or that a
// Service declares TCP): without it, a non-HTTP connection (or an mTLS
// client choosing Istio's TCP ALPN) would reach the port untouched. On a
// TCP chain only the rules without an http part can allow anything. A
// protected port that no Service declares has no chain of its own: its
// traffic takes the inbound listener's catch-all chains (HTTP
// virtualInbound-catchall-http, TCP virtualInbound), so those get one more
// pair of filters whose rules apply to the protected ports only
// (destination_port) and allow everything on every other port. The
// rules match callers by the SPIFFE ID in their Istio mTLS peer
// certificate (compile.IdentityPeerCertificate). Pure: no API calls.
package envoyfilter

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"

	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	rbacfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	netrbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
	networkingv1alpha3 "istio.io/api/networking/v1alpha3"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"

	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/compile"
)

// Names and labels on every generated EnvoyFilter.
const (
	APIVersion = "networking.istio.io/v1alpha3"
	Kind       = "EnvoyFilter"
	NamePrefix = "sidelane-l7-"
	// LabelManagedBy marks sidelane's EnvoyFilters, so the writer lists and
	// garbage-collects only its own.
	LabelManagedBy = "app.kubernetes.io/managed-by"
	ManagedByValue = "sidelane"
	// AnnotationPolicies lists the L7Policies (comma-separated names, same
	// namespace) the filter was compiled from; owner references say the same
	// with UIDs, so Kubernetes deletes the filter when all of them are gone.
	AnnotationPolicies = "sidelane.io/policies"
	// FilterName is the inserted HTTP filter's name.
	FilterName = "sidelane.l7policy"
	// NetworkFilterName is the network filter's name on TCP chains.
	NetworkFilterName = "sidelane.l7policy.tcp"
	rbacType          = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
	networkRBACType   = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
	networkStatPrefix = "sidelane_l7policy_tcp."
	// Istio's inbound listener and its catch-all (passthrough) filter
	// chains, for traffic to ports no Service declares.
	virtualInbound         = "virtualInbound"
	catchAllHTTPChain      = "virtualInbound-catchall-http"
	catchAllTCPChain       = "virtualInbound"
	unprotectedPortsPolicy = "sidelane/unprotected-ports"
)

// churnLabels change on every rollout; keeping them out of the workload
// selector avoids rewriting (and reloading) every EnvoyFilter on a rollout.
var churnLabels = []string{"pod-template-hash", "controller-revision-hash"}

// GroupError says why a group of pods got no EnvoyFilter.
type GroupError struct {
	Namespace string
	Policies  []string
	Err       error
}

func (e GroupError) Error() string {
	return fmt.Sprintf("envoyfilter for %s/{%s}: %v", e.Namespace, strings.Join(e.Policies, ","), e.Err)
}

// Build renders one EnvoyFilter per group. allPods is every pod (selected
// or not) of the groups' namespaces: a workload selector must not catch a
// pod outside its group. policies supply the owner UIDs. A group that no
// label selector can isolate is reported and gets no EnvoyFilter.
func Build(res *compile.Result, allPods []compile.Pod, policies []v1alpha1.L7Policy) ([]*unstructured.Unstructured, []GroupError) {
	uids := map[string]types.UID{}
	for _, p := range policies {
		uids[p.Namespace+"/"+p.Name] = p.UID
	}
	var out []*unstructured.Unstructured
	var errs []GroupError
	for _, g := range res.Groups {
		sel, err := selector(g, allPods)
		if err == nil {
			var u *unstructured.Unstructured
			u, err = render(g, sel, uids)
			if err == nil {
				out = append(out, u)
				continue
			}
		}
		errs = append(errs, GroupError{Namespace: g.Namespace, Policies: g.Policies, Err: err})
	}
	return out, errs
}

// Name is the EnvoyFilter name for a set of policies: stable while the set
// is, so updates replace the object instead of creating a new one.
func Name(policies []string) string {
	s := slices.Clone(policies)
	sort.Strings(s)
	h := sha256.Sum256([]byte(strings.Join(s, "\x00")))
	return NamePrefix + hex.EncodeToString(h[:])[:10]
}

// selector is the labels every pod of g carries, if no other pod of the
// namespace carries them all.
func selector(g compile.Group, allPods []compile.Pod) (map[string]string, error) {
	common := map[string]string{}
	for i, p := range g.Pods {
		if i == 0 {
			maps.Copy(common, p.Labels)
			continue
		}
		for k, v := range common {
			if p.Labels[k] != v {
				delete(common, k)
			}
		}
	}
	for _, k := range churnLabels {
		delete(common, k)
	}
	if len(common) == 0 {
		return nil, fmt.Errorf("the selected pods share no labels, and an empty workload selector would apply to every pod of the namespace")
	}
	in := map[string]bool{}
	for _, p := range g.Pods {
		in[p.Name] = true
	}
	sel := labels.SelectorFromSet(common)
	for _, p := range allPods {
		if p.Namespace == g.Namespace && !in[p.Name] && sel.Matches(labels.Set(p.Labels)) {
			return nil, fmt.Errorf("pod %s carries the labels %v shared by the selected pods but is selected by other policies: give the pods distinguishing labels", p.Name, common)
		}
	}
	return common, nil
}

func render(g compile.Group, sel map[string]string, uids map[string]types.UID) (*unstructured.Unstructured, error) {
	spec := &networkingv1alpha3.EnvoyFilter{WorkloadSelector: &networkingv1alpha3.WorkloadSelector{Labels: sel}}
	for _, p := range g.Ports {
		httpValue, err := filterValue(FilterName, rbacType, p.RBAC)
		if err != nil {
			return nil, fmt.Errorf("port %d: %w", p.Port, err)
		}
		tcp := networkRBAC(p.RBAC)
		if err := tcp.ValidateAll(); err != nil {
			return nil, fmt.Errorf("port %d: envoy rejects the network rbac config: %w", p.Port, err)
		}
		tcpValue, err := filterValue(NetworkFilterName, networkRBACType, tcp)
		if err != nil {
			return nil, fmt.Errorf("port %d: %w", p.Port, err)
		}
		spec.ConfigPatches = append(spec.ConfigPatches,
			// Before the router: after Istio's own authn/authz filters,
			// so Istio's AuthorizationPolicies still apply first.
			inboundPatch(networkingv1alpha3.EnvoyFilter_HTTP_FILTER, p.Port, &networkingv1alpha3.EnvoyFilter_ListenerMatch_FilterMatch{
				Name:      "envoy.filters.network.http_connection_manager",
				SubFilter: &networkingv1alpha3.EnvoyFilter_ListenerMatch_SubFilterMatch{Name: "envoy.filters.http.router"},
			}, httpValue),
			// Before the TCP proxy of the port's TCP chains (none when the
			// port is declared HTTP: then the patch matches nothing).
			inboundPatch(networkingv1alpha3.EnvoyFilter_NETWORK_FILTER, p.Port, &networkingv1alpha3.EnvoyFilter_ListenerMatch_FilterMatch{
				Name: "envoy.filters.network.tcp_proxy",
			}, tcpValue),
		)
	}
	if len(g.Ports) > 0 {
		catchHTTP, catchTCP := catchAll(g.Ports)
		for _, c := range []proto.Message{catchHTTP, catchTCP} {
			if err := c.(interface{ ValidateAll() error }).ValidateAll(); err != nil {
				return nil, fmt.Errorf("catch-all chains: envoy rejects the rbac config: %w", err)
			}
		}
		httpValue, err := filterValue(FilterName, rbacType, catchHTTP)
		if err != nil {
			return nil, fmt.Errorf("catch-all chains: %w", err)
		}
		tcpValue, err := filterValue(NetworkFilterName, networkRBACType, catchTCP)
		if err != nil {
			return nil, fmt.Errorf("catch-all chains: %w", err)
		}
		spec.ConfigPatches = append(spec.ConfigPatches,
			catchAllPatch(networkingv1alpha3.EnvoyFilter_HTTP_FILTER, catchAllHTTPChain, &networkingv1alpha3.EnvoyFilter_ListenerMatch_FilterMatch{
				Name:      "envoy.filters.network.http_connection_manager",
				SubFilter: &networkingv1alpha3.EnvoyFilter_ListenerMatch_SubFilterMatch{Name: "envoy.filters.http.router"},
			}, httpValue),
			catchAllPatch(networkingv1alpha3.EnvoyFilter_NETWORK_FILTER, catchAllTCPChain, &networkingv1alpha3.EnvoyFilter_ListenerMatch_FilterMatch{
				Name: "envoy.filters.network.tcp_proxy",
			}, tcpValue),
		)
	}
	specJSON, err := protojson.Marshal(spec)
	if err != nil {
		return nil, err
	}
	var specMap map[string]any
	if err := json.Unmarshal(specJSON, &specMap); err != nil {
		return nil, err
	}
	u := &unstructured.Unstructured{Object: map[string]any{"spec": specMap}}
	u.SetAPIVersion(APIVersion)
	u.SetKind(Kind)
	u.SetNamespace(g.Namespace)
	u.SetName(Name(g.Policies))
	u.SetLabels(map[string]string{LabelManagedBy: ManagedByValue})
	u.SetAnnotations(map[string]string{AnnotationPolicies: strings.Join(g.Policies, ",")})
	var owners []metav1.OwnerReference
	for _, name := range g.Policies {
		if uid := uids[g.Namespace+"/"+name]; uid != "" {
			owners = append(owners, metav1.OwnerReference{
				APIVersion: v1alpha1.SchemeGroupVersion.String(), Kind: v1alpha1.Kind, Name: name, UID: uid,
			})
		}
	}
	u.SetOwnerReferences(owners)
	return u, nil
}

func inboundPatch(to networkingv1alpha3.EnvoyFilter_ApplyTo, port int32, filter *networkingv1alpha3.EnvoyFilter_ListenerMatch_FilterMatch, value *structpb.Struct) *networkingv1alpha3.EnvoyFilter_EnvoyConfigObjectPatch {
	return &networkingv1alpha3.EnvoyFilter_EnvoyConfigObjectPatch{
		ApplyTo: to,
		Match: &networkingv1alpha3.EnvoyFilter_EnvoyConfigObjectMatch{
			Context: networkingv1alpha3.EnvoyFilter_SIDECAR_INBOUND,
			ObjectTypes: &networkingv1alpha3.EnvoyFilter_EnvoyConfigObjectMatch_Listener{Listener: &networkingv1alpha3.EnvoyFilter_ListenerMatch{
				PortNumber:  uint32(port),
				FilterChain: &networkingv1alpha3.EnvoyFilter_ListenerMatch_FilterChainMatch{Filter: filter},
			}},
		},
		Patch: &networkingv1alpha3.EnvoyFilter_Patch{Operation: networkingv1alpha3.EnvoyFilter_Patch_INSERT_BEFORE, Value: value},
	}
}

// filterValue is an EnvoyFilter patch value {name, typed_config}.
func filterValue(name, typeURL string, cfg proto.Message) (*structpb.Struct, error) {
	b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	var typed map[string]any
	if err := json.Unmarshal(b, &typed); err != nil {
		return nil, err
	}
	typed["@type"] = typeURL
	return structpb.NewStruct(map[string]any{"name": name, "typed_config": typed})
}

// networkRBAC is the TCP-level form of a port's HTTP rules: the policies
// that allow any request (rules without an http part) allow the
// connection; every other policy needs HTTP and is left out. No policy
// left: every non-HTTP connection is denied.
func networkRBAC(h *rbacfilterv3.RBAC) *netrbacv3.RBAC {
	out := &rbacv3.RBAC{Action: rbacv3.RBAC_ALLOW, Policies: map[string]*rbacv3.Policy{}}
	for name, p := range h.GetRules().GetPolicies() {
		if len(p.GetPermissions()) > 0 && !slices.ContainsFunc(p.GetPermissions(), func(perm *rbacv3.Permission) bool { return !perm.GetAny() }) {
			out.Policies[name] = p
		}
	}
	return &netrbacv3.RBAC{StatPrefix: networkStatPrefix, Rules: out}
}

// catchAllPatch inserts before filter in the named filter chain of the
// inbound listener. No portNumber: on the virtual inbound listener istiod
// would compare it with the chain's destination_port, which the catch-all
// chains do not have.
func catchAllPatch(to networkingv1alpha3.EnvoyFilter_ApplyTo, chain string, filter *networkingv1alpha3.EnvoyFilter_ListenerMatch_FilterMatch, value *structpb.Struct) *networkingv1alpha3.EnvoyFilter_EnvoyConfigObjectPatch {
	return &networkingv1alpha3.EnvoyFilter_EnvoyConfigObjectPatch{
		ApplyTo: to,
		Match: &networkingv1alpha3.EnvoyFilter_EnvoyConfigObjectMatch{
			Context: networkingv1alpha3.EnvoyFilter_SIDECAR_INBOUND,
			ObjectTypes: &networkingv1alpha3.EnvoyFilter_EnvoyConfigObjectMatch_Listener{Listener: &networkingv1alpha3.EnvoyFilter_ListenerMatch{
				Name:        virtualInbound,
				FilterChain: &networkingv1alpha3.EnvoyFilter_ListenerMatch_FilterChainMatch{Name: chain, Filter: filter},
			}},
		},
		Patch: &networkingv1alpha3.EnvoyFilter_Patch{Operation: networkingv1alpha3.EnvoyFilter_Patch_INSERT_BEFORE, Value: value},
	}
}

// catchAll is the rules of the catch-all chains, which see every port: each
// port's policies restricted to its destination_port, plus one policy that
// allows anything on a port the group does not protect.
func catchAll(ports []compile.Port) (*rbacfilterv3.RBAC, *netrbacv3.RBAC) {
	httpRules := &rbacv3.RBAC{Action: rbacv3.RBAC_ALLOW, Policies: map[string]*rbacv3.Policy{}}
	tcpRules := &rbacv3.RBAC{Action: rbacv3.RBAC_ALLOW, Policies: map[string]*rbacv3.Policy{}}
	var protected []*rbacv3.Permission
	for _, p := range ports {
		port := &rbacv3.Permission{Rule: &rbacv3.Permission_DestinationPort{DestinationPort: uint32(p.Port)}}
		protected = append(protected, port)
		for name, pol := range p.RBAC.GetRules().GetPolicies() {
			httpRules.Policies[name] = onPort(port, pol)
		}
		for name, pol := range networkRBAC(p.RBAC).GetRules().GetPolicies() {
			tcpRules.Policies[name] = onPort(port, pol)
		}
	}
	other := &rbacv3.Policy{
		Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_NotRule{NotRule: &rbacv3.Permission{
			Rule: &rbacv3.Permission_OrRules{OrRules: &rbacv3.Permission_Set{Rules: protected}}}}}},
		Principals: []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Any{Any: true}}},
	}
	httpRules.Policies[unprotectedPortsPolicy] = other
	tcpRules.Policies[unprotectedPortsPolicy] = other
	return &rbacfilterv3.RBAC{Rules: httpRules}, &netrbacv3.RBAC{StatPrefix: networkStatPrefix, Rules: tcpRules}
}

// onPort restricts pol to one destination port.
func onPort(port *rbacv3.Permission, pol *rbacv3.Policy) *rbacv3.Policy {
	return &rbacv3.Policy{
		Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_AndRules{AndRules: &rbacv3.Permission_Set{Rules: []*rbacv3.Permission{
			port, {Rule: &rbacv3.Permission_OrRules{OrRules: &rbacv3.Permission_Set{Rules: pol.GetPermissions()}}},
		}}}}},
		Principals: pol.GetPrincipals(),
	}
}
