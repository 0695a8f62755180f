package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// Hand-written deep copies: k8s.io/code-generator is not served by the module
// proxy this project builds from. TestDeepCopy guards them by checking that a
// copy of a fully populated policy shares no memory with the original.

// DeepCopyObject implements runtime.Object.
func (in *L7Policy) DeepCopyObject() runtime.Object { return in.DeepCopy() }

// DeepCopyObject implements runtime.Object.
func (in *L7PolicyList) DeepCopyObject() runtime.Object { return in.DeepCopy() }

// DeepCopy returns a copy of in that shares no memory with it.
func (in *L7Policy) DeepCopy() *L7Policy {
	if in == nil {
		return nil
	}
	out := new(L7Policy)
	out.TypeMeta = in.TypeMeta
	in.ObjectMeta.DeepCopyInto(&out.ObjectMeta)
	out.Spec = *in.Spec.DeepCopy()
	out.Status = *in.Status.DeepCopy()
	return out
}

// DeepCopy returns a copy of in that shares no memory with it.
func (in *L7PolicyList) DeepCopy() *L7PolicyList {
	if in == nil {
		return nil
	}
	out := new(L7PolicyList)
	out.TypeMeta = in.TypeMeta
	in.ListMeta.DeepCopyInto(&out.ListMeta)
	if in.Items != nil {
		out.Items = make([]L7Policy, len(in.Items))
		for i := range in.Items {
			out.Items[i] = *in.Items[i].DeepCopy()
		}
	}
	return out
}

// DeepCopy returns a copy of in that shares no memory with it.
func (in *L7PolicySpec) DeepCopy() *L7PolicySpec {
	if in == nil {
		return nil
	}
	out := new(L7PolicySpec)
	in.PodSelector.DeepCopyInto(&out.PodSelector)
	if in.Ports != nil {
		out.Ports = make([]PortRules, len(in.Ports))
		for i := range in.Ports {
			out.Ports[i] = *in.Ports[i].DeepCopy()
		}
	}
	return out
}

// DeepCopy returns a copy of in that shares no memory with it.
func (in *PortRules) DeepCopy() *PortRules {
	if in == nil {
		return nil
	}
	out := &PortRules{Port: in.Port}
	if in.Rules != nil {
		out.Rules = make([]Rule, len(in.Rules))
		for i := range in.Rules {
			out.Rules[i] = *in.Rules[i].DeepCopy()
		}
	}
	return out
}

// DeepCopy returns a copy of in that shares no memory with it.
func (in *Rule) DeepCopy() *Rule {
	if in == nil {
		return nil
	}
	out := new(Rule)
	if in.From != nil {
		out.From = make([]Peer, len(in.From))
		for i := range in.From {
			out.From[i] = *in.From[i].DeepCopy()
		}
	}
	if in.HTTP != nil {
		out.HTTP = make([]HTTPRule, len(in.HTTP))
		for i := range in.HTTP {
			out.HTTP[i] = *in.HTTP[i].DeepCopy()
		}
	}
	return out
}

// DeepCopy returns a copy of in that shares no memory with it.
func (in *Peer) DeepCopy() *Peer {
	if in == nil {
		return nil
	}
	return &Peer{
		Principals:        copyStrings(in.Principals),
		Namespaces:        copyStrings(in.Namespaces),
		ServiceAccounts:   copyStrings(in.ServiceAccounts),
		PodSelector:       in.PodSelector.DeepCopy(),
		NamespaceSelector: in.NamespaceSelector.DeepCopy(),
	}
}

// DeepCopy returns a copy of in that shares no memory with it.
func (in *HTTPRule) DeepCopy() *HTTPRule {
	if in == nil {
		return nil
	}
	out := &HTTPRule{Method: in.Method, Path: in.Path, Host: in.Host}
	if in.Headers != nil {
		out.Headers = make([]HeaderMatch, len(in.Headers))
		for i := range in.Headers {
			out.Headers[i] = *in.Headers[i].DeepCopy()
		}
	}
	return out
}

// DeepCopy returns a copy of in that shares no memory with it.
func (in *HeaderMatch) DeepCopy() *HeaderMatch {
	if in == nil {
		return nil
	}
	out := &HeaderMatch{Name: in.Name}
	if in.Exact != nil {
		v := *in.Exact
		out.Exact = &v
	}
	if in.Regex != nil {
		v := *in.Regex
		out.Regex = &v
	}
	if in.Present != nil {
		v := *in.Present
		out.Present = &v
	}
	return out
}

// DeepCopy returns a copy of in that shares no memory with it.
func (in *L7PolicyStatus) DeepCopy() *L7PolicyStatus {
	if in == nil {
		return nil
	}
	out := &L7PolicyStatus{ObservedGeneration: in.ObservedGeneration, SelectedPods: in.SelectedPods}
	if in.Conditions != nil {
		out.Conditions = make([]metav1.Condition, len(in.Conditions))
		for i := range in.Conditions {
			in.Conditions[i].DeepCopyInto(&out.Conditions[i])
		}
	}
	return out
}

func copyStrings(in []string) []string {
	if in == nil {
		return nil
	}
	return append([]string(nil), in...)
}
