// Package v1alpha1 holds the L7Policy API (group sidelane.io, version
// v1alpha1): which pods a policy protects and which HTTP requests, from whom,
// each protected port accepts. The CRD manifest in
// charts/sidelane/crds/sidelane.io_l7policies.yaml mirrors these types.
package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// Group, Version and the names the API server serves L7Policy under.
const (
	Group    = "sidelane.io"
	Version  = "v1alpha1"
	Kind     = "L7Policy"
	ListKind = "L7PolicyList"
	Resource = "l7policies"
)

// SchemeGroupVersion is the group and version of this package's types.
var SchemeGroupVersion = schema.GroupVersion{Group: Group, Version: Version}

// AddToScheme registers L7Policy and L7PolicyList with a scheme, so client-go
// (typed REST clients, informers) can encode and decode them.
func AddToScheme(s *runtime.Scheme) error {
	s.AddKnownTypes(SchemeGroupVersion, &L7Policy{}, &L7PolicyList{})
	metav1.AddToGroupVersion(s, SchemeGroupVersion)
	return nil
}

// L7Policy protects the HTTP ports of the pods it selects: on every port it
// lists, a request is allowed only if some rule of some policy selecting the
// same pod and port allows it.
type L7Policy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   L7PolicySpec   `json:"spec"`
	Status L7PolicyStatus `json:"status,omitempty"`
}

// L7PolicyList is a list of L7Policy.
type L7PolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`

	Items []L7Policy `json:"items"`
}

// L7PolicySpec selects the protected pods and says what each port accepts.
type L7PolicySpec struct {
	// PodSelector selects the protected pods in the policy's namespace.
	// An empty selector ({}) selects every pod of the namespace.
	PodSelector metav1.LabelSelector `json:"podSelector"`
	// Ports lists the protected container ports, each at most once.
	Ports []PortRules `json:"ports"`
}

// PortRules is what one protected port accepts.
type PortRules struct {
	// Port is the container (target) port the pod listens on, 1-65535.
	Port int32 `json:"port"`
	// Rules are alternatives: a request is allowed if any rule allows it.
	// No rules at all means nothing is allowed on this port (deny all).
	Rules []Rule `json:"rules,omitempty"`
}

// Rule allows the requests that come from one of From and match one of HTTP.
type Rule struct {
	// From lists allowed callers; any entry may match. Empty: any caller.
	From []Peer `json:"from,omitempty"`
	// HTTP lists allowed requests; any entry may match. Empty: any request.
	HTTP []HTTPRule `json:"http,omitempty"`
}

// Peer names callers. Every field that is set must match (AND); within a
// list field any entry may match (OR). At least one field must be set.
type Peer struct {
	// Principals are SPIFFE IDs, spiffe://<trust-domain>/ns/<ns>/sa/<sa>, as
	// in Istio's peer certificates. A trailing "*" matches any suffix.
	Principals []string `json:"principals,omitempty"`
	// Namespaces matches callers running in any of these namespaces.
	Namespaces []string `json:"namespaces,omitempty"`
	// ServiceAccounts matches callers running as "<namespace>/<name>".
	ServiceAccounts []string `json:"serviceAccounts,omitempty"`
	// PodSelector selects calling pods. Alone it selects pods of the
	// policy's namespace; with NamespaceSelector, pods of the selected
	// namespaces (as in NetworkPolicy).
	PodSelector *metav1.LabelSelector `json:"podSelector,omitempty"`
	// NamespaceSelector selects the namespaces of calling pods.
	NamespaceSelector *metav1.LabelSelector `json:"namespaceSelector,omitempty"`
}

// HTTPRule matches requests; every field that is set must match. The
// regular expressions are RE2 and must match the whole value, as in
// CiliumNetworkPolicy rules.http.
type HTTPRule struct {
	// Method is an RE2 regex on the request method, e.g. "GET|HEAD".
	Method string `json:"method,omitempty"`
	// Path is an RE2 regex on the request path without the query string.
	Path string `json:"path,omitempty"`
	// Host is an RE2 regex on the :authority (Host) header as sent,
	// including a port if the client sent one.
	Host string `json:"host,omitempty"`
	// Headers must all match.
	Headers []HeaderMatch `json:"headers,omitempty"`
}

// HeaderMatch checks one request header. Exactly one of Exact, Regex and
// Present is set.
type HeaderMatch struct {
	// Name is the header name; matching ignores case.
	Name string `json:"name"`
	// Exact requires the header to have this value.
	Exact *string `json:"exact,omitempty"`
	// Regex requires the header's value to match this RE2 regex.
	Regex *string `json:"regex,omitempty"`
	// Present true requires the header; false requires its absence.
	Present *bool `json:"present,omitempty"`
}

// L7PolicyStatus is written by the single writer (see the README).
type L7PolicyStatus struct {
	// ObservedGeneration is the spec generation the conditions describe.
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// SelectedPods counts the pods the policy selects.
	SelectedPods int32 `json:"selectedPods,omitempty"`
	// Conditions: Accepted (True, or False with reason Invalid and the
	// validation errors as message).
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// Condition types and reasons set on L7Policy status.
const (
	ConditionAccepted = "Accepted"
	ReasonValid       = "Valid"
	ReasonInvalid     = "Invalid"
)
