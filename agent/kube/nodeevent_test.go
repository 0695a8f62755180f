package kube_test

import (
	"context"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/sidelane/sidelane/agent/kube"
)

// A datapath repair is recorded as a Warning Event on the agent's node.
func TestNodeEventOnRepair(t *testing.T) {
	ctx := context.Background()
	cs, err := kubernetes.NewForConfig(cluster.RESTConfig)
	if err != nil {
		t.Fatal(err)
	}
	const node = "node-repair-event"
	if _, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ra := startAgent(t, cs, node, t.TempDir())
	ra.ctrl.NodeEventf(kube.EventDatapathRepaired, "sidelane re-attached its eBPF datapath: %s", "cgroup_link connect4: detached")
	eventually(t, "repair event on the node", func() bool {
		evs, err := cs.CoreV1().Events(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + node})
		if err != nil {
			t.Fatal(err)
		}
		return slices.ContainsFunc(evs.Items, func(e corev1.Event) bool {
			return e.Reason == kube.EventDatapathRepaired && e.Type == corev1.EventTypeWarning &&
				e.InvolvedObject.Kind == "Node" && e.Message == "sidelane re-attached its eBPF datapath: cgroup_link connect4: detached"
		})
	})
}
