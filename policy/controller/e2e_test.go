package controller

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/envoyfilter"
)

// TestE2E runs two `sidelane controller` processes competing for the Lease
// against a real kube-apiserver with Istio's CRDs, then creates, updates,
// invalidates and deletes policies and checks the EnvoyFilters and statuses
// follow.
func TestE2E(t *testing.T) {
	e := newEnv(t)
	ctx := e.ctx
	e.pod("api-0", "api")
	e.pod("api-1", "api")
	e.pod("web-0", "web")
	a := e.startController("replica-a")
	b := e.startController("replica-b")

	filters := e.filters()
	efName := envoyfilter.Name([]string{"api"})

	// Create.
	pol := e.apply("api", "api", "    - port: 8080\n      rules: [{from: [{serviceAccounts: [shop/web]}], http: [{method: GET, path: /items}]}]\n")
	e.eventually("EnvoyFilter created", func() string {
		ef, err := filters.Get(ctx, efName, metav1.GetOptions{})
		if err != nil {
			return err.Error()
		}
		owners := ef.GetOwnerReferences()
		if len(owners) != 1 || owners[0].UID != pol.GetUID() || owners[0].Kind != v1alpha1.Kind {
			return fmt.Sprintf("owner references %v", owners)
		}
		if ef.GetLabels()[envoyfilter.LabelManagedBy] != envoyfilter.ManagedByValue || ef.GetAnnotations()[envoyfilter.AnnotationPolicies] != "api" {
			return fmt.Sprintf("labels %v annotations %v", ef.GetLabels(), ef.GetAnnotations())
		}
		sel, _, _ := unstructured.NestedStringMap(ef.Object, "spec", "workloadSelector", "labels")
		if sel["app"] != "api" || len(sel) != 1 {
			return fmt.Sprintf("workload selector %v", sel)
		}
		return ""
	})
	e.eventually("status accepted with 2 pods", func() string {
		p := e.policy("api")
		st := p.Status
		if !meta.IsStatusConditionTrue(st.Conditions, v1alpha1.ConditionAccepted) || !meta.IsStatusConditionTrue(st.Conditions, ConditionEnforced) || st.SelectedPods != 2 {
			return fmt.Sprintf("status %+v", st)
		}
		if ok, why := SidecarEnforcement(p); !ok {
			return why
		}
		return ""
	})

	// A new api pod changes the status but not the EnvoyFilter: the writer
	// must not rewrite an unchanged object (a defaulting mismatch would make
	// it write on every pass).
	ef, err := filters.Get(ctx, efName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rv := ef.GetResourceVersion()
	e.pod("api-2", "api")
	e.eventually("status counts 3 pods", func() string {
		if st := e.policy("api").Status; st.SelectedPods != 3 {
			return fmt.Sprintf("status %+v", st)
		}
		return ""
	})
	if ef, err := filters.Get(ctx, efName, metav1.GetOptions{}); err != nil || ef.GetResourceVersion() != rv {
		t.Errorf("unchanged EnvoyFilter was rewritten (resourceVersion %s -> %s, %v)", rv, ef.GetResourceVersion(), err)
	}

	// Update: a second port adds a second pair of patches (HTTP and TCP)
	// to the first pair and the catch-all pair.
	e.apply("api", "api", "    - port: 8080\n      rules: [{http: [{method: GET}]}]\n    - port: 9090\n")
	e.eventually("EnvoyFilter updated", func() string {
		ef, err := filters.Get(ctx, efName, metav1.GetOptions{})
		if err != nil {
			return err.Error()
		}
		patches, _, _ := unstructured.NestedSlice(ef.Object, "spec", "configPatches")
		if len(patches) != 6 {
			return fmt.Sprintf("%d patches", len(patches))
		}
		return ""
	})

	// Invalid (an RE2 error the CRD cannot see): reported, changes nothing.
	e.apply("bad", "api", "    - port: 8080\n      rules: [{http: [{path: '/items/[0-9'}]}]\n")
	e.eventually("invalid status", func() string {
		c := meta.FindStatusCondition(e.policy("bad").Status.Conditions, v1alpha1.ConditionAccepted)
		if c == nil || c.Status != metav1.ConditionFalse || c.Reason != v1alpha1.ReasonInvalid || !strings.Contains(c.Message, "spec.ports[0].rules[0].http[0].path") {
			return fmt.Sprintf("accepted condition %+v", c)
		}
		return ""
	})
	if _, err := filters.Get(ctx, envoyfilter.Name([]string{"api", "bad"}), metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("invalid policy produced an EnvoyFilter: %v", err)
	}
	if _, err := filters.Get(ctx, efName, metav1.GetOptions{}); err != nil {
		t.Errorf("invalid policy disturbed the valid one's EnvoyFilter: %v", err)
	}

	// Delete: the controller garbage-collects the EnvoyFilter itself (no
	// kube-controller-manager runs here, so owner references alone would not).
	for _, n := range []string{"api", "bad"} {
		if err := e.policies().Delete(ctx, n, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	e.eventually("EnvoyFilter deleted", func() string {
		l, err := filters.List(ctx, metav1.ListOptions{})
		if err != nil {
			return err.Error()
		}
		if len(l.Items) != 0 {
			return fmt.Sprintf("%d EnvoyFilters left", len(l.Items))
		}
		return ""
	})
	// Exactly the lease holder reports itself leading.
	holder := e.leaseHolder()
	for id, p := range map[string]*controllerProc{"replica-a": a, "replica-b": b} {
		_, m := p.fetch("/metrics")
		want := "sidelane_controller_leader 0"
		if id == holder {
			want = "sidelane_controller_leader 1"
		}
		if !strings.Contains(m, want) {
			t.Errorf("%s (lease holder %q): /metrics lacks %q", id, holder, want)
		}
	}
}

// TestNamespaceSelector: a `from` namespaceSelector resolves against the
// namespaces' labels, so the controller must watch namespaces (it did not:
// the selector matched no namespace and the rule admitted nobody).
func TestNamespaceSelector(t *testing.T) {
	e := newEnv(t)
	if _, err := e.kube.CoreV1().Namespaces().Create(e.ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "ops", Labels: map[string]string{"team": "ops"}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.kube.CoreV1().Pods("ops").Create(e.ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "prom-0", Namespace: "ops"},
		Spec:       corev1.PodSpec{ServiceAccountName: "prom", Containers: []corev1.Container{{Name: "app", Image: "app"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.pod("api-0", "api")
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	c, err := New(log, e.kube, e.dyn, "cluster.local", prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(e.ctx)
	done := make(chan error, 1)
	defer func() { stop(); <-done }()
	c.Start(ctx)
	go func() { done <- c.Run(ctx) }()
	e.apply("api", "api", "    - port: 8080\n      rules: [{from: [{namespaceSelector: {matchLabels: {team: ops}}}]}]\n")
	e.eventually("EnvoyFilter admits the selected namespace's service account", func() string {
		ef, err := e.filters().Get(e.ctx, envoyfilter.Name([]string{"api"}), metav1.GetOptions{})
		if err != nil {
			return err.Error()
		}
		b, _ := json.Marshal(ef.Object["spec"])
		if !strings.Contains(string(b), "spiffe://cluster.local/ns/ops/sa/prom") {
			return "no principal for ops/prom in " + string(b)
		}
		return ""
	})
}
