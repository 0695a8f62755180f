// Package envoyfilter renders compiled L7 policy as Istio EnvoyFilter
// resources for sidecar-mode pods: per group of pods selected by the same
// policies, one EnvoyFilter whose workload selector picks exactly those pods
// and whose patches insert the RBAC HTTP filter before the router in the
// sidecar's inbound HTTP filter chain of every protected port. The rules
// match callers by the SPIFFE ID in their Istio mTLS peer certificate
// (compile.IdentityPeerCertificate). Pure: no API calls.
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

	"google.golang.org/protobuf/encoding/protojson"
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
	rbacType   = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
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
		rules, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(p.RBAC)
		if err != nil {
			return nil, fmt.Errorf("port %d: %w", p.Port, err)
		}
		var typed map[string]any
		if err := json.Unmarshal(rules, &typed); err != nil {
			return nil, fmt.Errorf("port %d: %w", p.Port, err)
		}
		typed["@type"] = rbacType
		value, err := structpb.NewStruct(map[string]any{"name": FilterName, "typed_config": typed})
		if err != nil {
			return nil, fmt.Errorf("port %d: %w", p.Port, err)
		}
		spec.ConfigPatches = append(spec.ConfigPatches, &networkingv1alpha3.EnvoyFilter_EnvoyConfigObjectPatch{
			ApplyTo: networkingv1alpha3.EnvoyFilter_HTTP_FILTER,
			Match: &networkingv1alpha3.EnvoyFilter_EnvoyConfigObjectMatch{
				Context: networkingv1alpha3.EnvoyFilter_SIDECAR_INBOUND,
				ObjectTypes: &networkingv1alpha3.EnvoyFilter_EnvoyConfigObjectMatch_Listener{Listener: &networkingv1alpha3.EnvoyFilter_ListenerMatch{
					PortNumber: uint32(p.Port),
					FilterChain: &networkingv1alpha3.EnvoyFilter_ListenerMatch_FilterChainMatch{
						Filter: &networkingv1alpha3.EnvoyFilter_ListenerMatch_FilterMatch{
							Name:      "envoy.filters.network.http_connection_manager",
							SubFilter: &networkingv1alpha3.EnvoyFilter_ListenerMatch_SubFilterMatch{Name: "envoy.filters.http.router"},
						},
					},
				}},
			},
			// Before the router: after Istio's own authn/authz filters,
			// so Istio's AuthorizationPolicies still apply first.
			Patch: &networkingv1alpha3.EnvoyFilter_Patch{Operation: networkingv1alpha3.EnvoyFilter_Patch_INSERT_BEFORE, Value: value},
		})
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
