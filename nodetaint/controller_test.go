package nodetaint

import (
	"context"
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/kubernetes/fake"
)

// TestControllerRetaintsCrashedAgent: the loop around Decide against a fake
// API: a crashed agent's node gets the taint (its other taint kept), a
// Warning Event and a count; the pod turning Ready again removes it.
func TestControllerRetaintsCrashedAgent(t *testing.T) {
	dedicated := corev1.Taint{Key: "example.com/dedicated", Value: "mesh", Effect: corev1.TaintEffectNoSchedule}
	pod := agentPod("agent-x", "n1", crashed)
	pod.Labels = map[string]string{"app.kubernetes.io/component": "agent"}
	cs := fake.NewClientset(node(false, dedicated), pod)
	reg := prometheus.NewRegistry()
	c, err := New(slog.New(slog.DiscardHandler), Config{Client: cs, Namespace: "sidelane-system",
		Selector: labels.SelectorFromSet(labels.Set{"app.kubernetes.io/component": "agent"}), Key: key, Effect: corev1.TaintEffectNoSchedule}, reg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c.Start(ctx)
	done := make(chan struct{})
	go func() { defer close(done); c.Run(ctx) }()
	defer func() { cancel(); <-done }()

	waitTaints := func(want []corev1.Taint) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			n, err := cs.CoreV1().Nodes().Get(ctx, "n1", metav1.GetOptions{})
			if err == nil && slices.Equal(n.Spec.Taints, want) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("taints %v, want %v (%v)", n.Spec.Taints, want, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	ours := corev1.Taint{Key: key, Effect: corev1.TaintEffectNoSchedule}
	waitTaints([]corev1.Taint{dedicated, ours})
	if got := count(t, c.changes.WithLabelValues("added")); got != 1 {
		t.Errorf("sidelane_node_taint_changes_total{action=added} = %v, want 1", got)
	}

	ready := agentPod("agent-x", "n1")
	ready.Labels = pod.Labels
	if _, err := cs.CoreV1().Pods("sidelane-system").UpdateStatus(ctx, ready, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitTaints([]corev1.Taint{dedicated})
	if got := count(t, c.changes.WithLabelValues("removed")); got != 1 {
		t.Errorf("sidelane_node_taint_changes_total{action=removed} = %v, want 1", got)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		evs, _ := cs.CoreV1().Events("default").List(ctx, metav1.ListOptions{})
		var reasons []string
		for _, e := range evs.Items {
			reasons = append(reasons, e.Reason)
		}
		if slices.Contains(reasons, EventTainted) && slices.Contains(reasons, EventUntainted) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("node events %v, want %s and %s", reasons, EventTainted, EventUntainted)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func count(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
