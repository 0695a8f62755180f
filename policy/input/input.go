// Package input turns what the Kubernetes API holds (L7Policy objects from a
// dynamic informer, pods from a typed one) into the policy compiler's input.
// It only reads: both the node agent (per-node xDS, explain) and the
// cluster-wide controller (EnvoyFilters, policy status) use it, so neither
// links the other's code.
package input

import (
	"log/slog"
	"net/netip"
	"sort"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/compile"
)

// L7PolicyGVR is the L7Policy resource.
var L7PolicyGVR = schema.GroupVersionResource{Group: v1alpha1.Group, Version: v1alpha1.Version, Resource: v1alpha1.Resource}

// DecodePolicies turns the L7Policy informer's objects into policies,
// sorted by namespace/name; undecodable ones are logged and skipped.
func DecodePolicies(log *slog.Logger, objs []runtime.Object) []v1alpha1.L7Policy {
	policies := make([]v1alpha1.L7Policy, 0, len(objs))
	for _, o := range objs {
		var p v1alpha1.L7Policy
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.(*unstructured.Unstructured).Object, &p); err != nil {
			log.Warn("undecodable l7policy", "error", err)
			continue
		}
		policies = append(policies, p)
	}
	sort.Slice(policies, func(i, j int) bool {
		return policies[i].Namespace+"/"+policies[i].Name < policies[j].Namespace+"/"+policies[j].Name
	})
	return policies
}

// Inventory is the compiler's view of the running pods (finished and
// terminating ones are left out) and of the namespaces' labels, which
// `from` namespaceSelectors match (without them a namespaceSelector selects
// nothing).
func Inventory(pods []*corev1.Pod, namespaces []*corev1.Namespace) compile.Inventory {
	var inv compile.Inventory
	for _, ns := range namespaces {
		inv.Namespaces = append(inv.Namespaces, compile.Namespace{Name: ns.Name, Labels: ns.Labels})
	}
	for _, p := range pods {
		if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed || p.DeletionTimestamp != nil {
			continue
		}
		inv.Pods = append(inv.Pods, toPod(p))
	}
	return inv
}

func toPod(p *corev1.Pod) compile.Pod {
	out := compile.Pod{Namespace: p.Namespace, Name: p.Name, Labels: p.Labels, ServiceAccount: p.Spec.ServiceAccountName}
	for _, ip := range p.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			out.IPs = append(out.IPs, a)
		}
	}
	return out
}
