package controller

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"github.com/sidelane/sidelane/internal/kubeharness"
	"github.com/sidelane/sidelane/internal/testenv"
	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/envoyfilter"
)

func kubectl(t *testing.T, c *kubeharness.Cluster, args ...string) {
	t.Helper()
	cmd := exec.Command(c.Kubectl, append([]string{"--kubeconfig", c.Kubeconfig}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out.String())
	}
}

func istioCRDs(t *testing.T) string {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/api").Output()
	if err != nil {
		t.Fatalf("locate istio.io/api: %v", err)
	}
	return strings.TrimSpace(string(out)) + "/kubernetes/customresourcedefinitions.gen.yaml"
}

const policyYAML = `apiVersion: sidelane.io/v1alpha1
kind: L7Policy
metadata: {name: %s, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ports:
%s`

// TestE2E runs two writers competing for the Lease against a real
// kube-apiserver with Istio's CRDs, then creates, updates, invalidates and
// deletes policies and checks the EnvoyFilters and statuses follow.
func TestE2E(t *testing.T) {
	testenv.Privileged(t)
	c := kubeharness.Start(t)
	kubectl(t, c, "apply", "--server-side", "-f", istioCRDs(t))
	kubectl(t, c, "apply", "--server-side", "-f", "../../charts/sidelane/crds/sidelane.io_l7policies.yaml")
	kubectl(t, c, "wait", "--for=condition=Established", "--timeout=120s", "crd/envoyfilters.networking.istio.io", "crd/l7policies.sidelane.io")
	kube := kubernetes.NewForConfigOrDie(c.RESTConfig)
	dyn := dynamic.NewForConfigOrDie(c.RESTConfig)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	for _, ns := range []string{"shop", "sidelane-system"} {
		if _, err := kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []struct{ name, app string }{{"api-0", "api"}, {"api-1", "api"}, {"web-0", "web"}} {
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: "shop", Labels: map[string]string{"app": p.app}},
			Spec:       corev1.PodSpec{ServiceAccountName: p.app, Containers: []corev1.Container{{Name: "app", Image: "app"}}},
		}
		if _, err := kube.CoreV1().Pods("shop").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	// Two agents compete; only the lease holder runs the controller.
	runCtx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	t.Cleanup(func() { stop(); wg.Wait() })
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	for _, id := range []string{"node-a", "node-b"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := RunLeader(runCtx, log, kube, "sidelane-system", id, func(ctx context.Context) {
				ctrl, err := New(log.With("identity", id), kube, dyn, "cluster.local", prometheus.NewRegistry())
				if err != nil {
					t.Error(err)
					return
				}
				if err := ctrl.Run(ctx); err != nil {
					t.Error(err)
				}
			})
			if err != nil {
				t.Error(err)
			}
		}()
	}

	policies := dyn.Resource(L7PolicyGVR).Namespace("shop")
	filters := dyn.Resource(EnvoyFilterGVR).Namespace("shop")
	apply := func(name, ports string) *unstructured.Unstructured {
		t.Helper()
		var u unstructured.Unstructured
		if err := yaml.Unmarshal([]byte(fmt.Sprintf(policyYAML, name, ports)), &u.Object); err != nil {
			t.Fatal(err)
		}
		out, err := policies.Apply(ctx, name, &u, metav1.ApplyOptions{FieldManager: "test", Force: true})
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	// eventually polls cond until it returns "" (or the deadline).
	eventually := func(what string, cond func() string) {
		t.Helper()
		var last string
		for deadline := time.Now().Add(90 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
			if last = cond(); last == "" {
				return
			}
		}
		t.Fatalf("%s: %s", what, last)
	}
	status := func(name string) v1alpha1.L7PolicyStatus {
		u, err := policies.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return v1alpha1.L7PolicyStatus{}
		}
		var p v1alpha1.L7Policy
		_ = runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &p)
		return p.Status
	}
	efName := envoyfilter.Name([]string{"api"})

	// Create.
	pol := apply("api", "    - port: 8080\n      rules: [{from: [{serviceAccounts: [shop/web]}], http: [{method: GET, path: /items}]}]\n")
	eventually("EnvoyFilter created", func() string {
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
	eventually("status accepted with 2 pods", func() string {
		st := status("api")
		if !meta.IsStatusConditionTrue(st.Conditions, v1alpha1.ConditionAccepted) || !meta.IsStatusConditionTrue(st.Conditions, ConditionEnforced) || st.SelectedPods != 2 {
			return fmt.Sprintf("status %+v", st)
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
	if _, err := kube.CoreV1().Pods("shop").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "api-2", Namespace: "shop", Labels: map[string]string{"app": "api"}},
		Spec:       corev1.PodSpec{ServiceAccountName: "api", Containers: []corev1.Container{{Name: "app", Image: "app"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually("status counts 3 pods", func() string {
		if st := status("api"); st.SelectedPods != 3 {
			return fmt.Sprintf("status %+v", st)
		}
		return ""
	})
	if ef, err := filters.Get(ctx, efName, metav1.GetOptions{}); err != nil || ef.GetResourceVersion() != rv {
		t.Errorf("unchanged EnvoyFilter was rewritten (resourceVersion %s -> %s, %v)", rv, ef.GetResourceVersion(), err)
	}

	// Update: a second port becomes a second patch.
	apply("api", "    - port: 8080\n      rules: [{http: [{method: GET}]}]\n    - port: 9090\n")
	eventually("EnvoyFilter updated", func() string {
		ef, err := filters.Get(ctx, efName, metav1.GetOptions{})
		if err != nil {
			return err.Error()
		}
		patches, _, _ := unstructured.NestedSlice(ef.Object, "spec", "configPatches")
		if len(patches) != 2 {
			return fmt.Sprintf("%d patches", len(patches))
		}
		return ""
	})

	// Invalid (an RE2 error the CRD cannot see): reported, changes nothing.
	apply("bad", "    - port: 8080\n      rules: [{http: [{path: '/items/[0-9'}]}]\n")
	eventually("invalid status", func() string {
		c := meta.FindStatusCondition(status("bad").Conditions, v1alpha1.ConditionAccepted)
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
		if err := policies.Delete(ctx, n, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	eventually("EnvoyFilter deleted", func() string {
		l, err := filters.List(ctx, metav1.ListOptions{})
		if err != nil {
			return err.Error()
		}
		if len(l.Items) != 0 {
			return fmt.Sprintf("%d EnvoyFilters left", len(l.Items))
		}
		return ""
	})

	lease, err := kube.CoordinationV1().Leases("sidelane-system").Get(ctx, LeaseName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if h := *lease.Spec.HolderIdentity; h != "node-a" && h != "node-b" {
		t.Errorf("lease holder %q", h)
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}
