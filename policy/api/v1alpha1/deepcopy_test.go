package v1alpha1

import (
	"reflect"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

func full() *L7Policy {
	s, b := "v", true
	sel := &metav1.LabelSelector{MatchLabels: map[string]string{"a": "b"},
		MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "k", Operator: metav1.LabelSelectorOpIn, Values: []string{"x"}}}}
	return &L7Policy{
		ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "n", Labels: map[string]string{"l": "v"}},
		Spec: L7PolicySpec{
			PodSelector: *sel.DeepCopy(),
			Ports: []PortRules{{Port: 80, Rules: []Rule{{
				From: []Peer{{Principals: []string{"spiffe://td/ns/a/sa/b"}, Namespaces: []string{"a"},
					ServiceAccounts: []string{"a/b"}, PodSelector: sel.DeepCopy(), NamespaceSelector: sel.DeepCopy()}},
				HTTP: []HTTPRule{{Method: "GET", Path: "/", Host: "h", Headers: []HeaderMatch{{Name: "x", Exact: &s, Regex: &s, Present: &b}}}},
			}}}},
		},
		Status: L7PolicyStatus{ObservedGeneration: 1, SelectedPods: 2, Conditions: []metav1.Condition{{Type: ConditionAccepted}}},
	}
}

// TestDeepCopy checks the copy is equal and that mutating the copy's every
// pointer and slice leaves the original alone.
func TestDeepCopy(t *testing.T) {
	in := full()
	out := in.DeepCopy()
	if !reflect.DeepEqual(in, out) {
		t.Fatalf("copy differs:\n%+v\n%+v", in, out)
	}
	h := &out.Spec.Ports[0].Rules[0].HTTP[0].Headers[0]
	*h.Exact, *h.Regex, *h.Present = "changed", "changed", false
	out.Spec.Ports[0].Rules[0].From[0].Principals[0] = "changed"
	out.Spec.Ports[0].Rules[0].From[0].PodSelector.MatchLabels["a"] = "changed"
	out.Spec.PodSelector.MatchExpressions[0].Values[0] = "changed"
	out.Status.Conditions[0].Type = "changed"
	if !reflect.DeepEqual(in, full()) {
		t.Fatal("mutating the copy changed the original")
	}
	list := &L7PolicyList{Items: []L7Policy{*in}}
	var obj runtime.Object = list.DeepCopyObject()
	if !reflect.DeepEqual(obj, list) {
		t.Fatal("list copy differs")
	}
	s := runtime.NewScheme()
	if err := AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	gvks, _, err := s.ObjectKinds(&L7Policy{})
	if err != nil || gvks[0].Kind != Kind || gvks[0].Group != Group {
		t.Fatalf("scheme kinds %v, %v", gvks, err)
	}
}
