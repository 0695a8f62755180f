package charttest

import (
	"context"
	"fmt"
	"log/slog"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/sidelane/sidelane/internal/kubeharness"
	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/controller"
	"github.com/sidelane/sidelane/policy/envoyfilter"
	"github.com/sidelane/sidelane/policy/input"
)

// TestControllerWorksWithChartRBAC runs the real controller code (leader
// election, informers, server-side apply, status, garbage collection) with
// nothing but the controller ServiceAccount's token and the chart's RBAC:
// the access reviews in TestRBACIsLeast say what is allowed, this says it
// is enough.
func TestControllerWorksWithChartRBAC(t *testing.T) {
	c := kubeharness.Start(t)
	admin := installRBAC(t, c)
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/api").Output()
	if err != nil {
		t.Fatalf("locate istio.io/api: %v", err)
	}
	admin.must("apply", "--server-side", "-f", strings.TrimSpace(string(out))+"/kubernetes/customresourcedefinitions.gen.yaml")
	admin.must("apply", "--server-side", "-f", filepath.Join(chartDir(t), "crds", "sidelane.io_l7policies.yaml"))
	admin.must("wait", "--for=condition=Established", "--timeout=120s", "crd/envoyfilters.networking.istio.io", "crd/l7policies.sidelane.io")
	admin.must("create", "namespace", "shop")

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	adminKube := kubernetes.NewForConfigOrDie(c.RESTConfig)
	adminDyn := dynamic.NewForConfigOrDie(c.RESTConfig)
	if _, err := adminKube.CoreV1().Pods("shop").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "api-0", Namespace: "shop", Labels: map[string]string{"app": "api"}},
		Spec:       corev1.PodSpec{ServiceAccountName: "api", Containers: []corev1.Container{{Name: "app", Image: "app"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	sa := asServiceAccount(t, c, admin, release+"-controller")
	rc, err := clientcmd.BuildConfigFromFlags("", sa.kcfg)
	if err != nil {
		t.Fatal(err)
	}
	kube, dyn := kubernetes.NewForConfigOrDie(rc), dynamic.NewForConfigOrDie(rc)
	log := slog.New(slog.NewTextHandler(testLog{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ctrl, err := controller.New(log, kube, dyn, "cluster.local", prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	t.Cleanup(func() { stop(); <-done })
	ctrl.Start(runCtx)
	go func() {
		done <- controller.RunLeader(runCtx, log, kube, controller.Election{Namespace: namespace, Identity: "rbac-test"}, func(ctx context.Context) {
			if err := ctrl.Run(ctx); err != nil {
				t.Error(err)
			}
		})
	}()

	pol := &unstructured.Unstructured{}
	pol.SetAPIVersion(v1alpha1.SchemeGroupVersion.String())
	pol.SetKind(v1alpha1.Kind)
	pol.SetName("api")
	if err := unstructured.SetNestedField(pol.Object, map[string]any{
		"podSelector": map[string]any{"matchLabels": map[string]any{"app": "api"}},
		"ports":       []any{map[string]any{"port": int64(8080)}},
	}, "spec"); err != nil {
		t.Fatal(err)
	}
	if _, err := adminDyn.Resource(input.L7PolicyGVR).Namespace("shop").Create(ctx, pol, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	efName := envoyfilter.Name([]string{"api"})
	eventually(t, "EnvoyFilter written and status Enforced, as the controller's service account", func() string {
		if _, err := adminDyn.Resource(controller.EnvoyFilterGVR).Namespace("shop").Get(ctx, efName, metav1.GetOptions{}); err != nil {
			return err.Error()
		}
		u, err := adminDyn.Resource(input.L7PolicyGVR).Namespace("shop").Get(ctx, "api", metav1.GetOptions{})
		if err != nil {
			return err.Error()
		}
		var p v1alpha1.L7Policy
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &p); err != nil {
			return err.Error()
		}
		if !meta.IsStatusConditionTrue(p.Status.Conditions, controller.ConditionEnforced) {
			return fmt.Sprintf("status %+v", p.Status)
		}
		return ""
	})
	if err := adminDyn.Resource(input.L7PolicyGVR).Namespace("shop").Delete(ctx, "api", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "EnvoyFilter garbage-collected", func() string {
		if _, err := adminDyn.Resource(controller.EnvoyFilterGVR).Namespace("shop").Get(ctx, efName, metav1.GetOptions{}); err == nil {
			return "still there"
		}
		return ""
	})
	if l, err := adminKube.CoordinationV1().Leases(namespace).Get(ctx, controller.LeaseName, metav1.GetOptions{}); err != nil || *l.Spec.HolderIdentity != "rbac-test" {
		t.Errorf("lease: %v %v", l, err)
	}
}

func eventually(t *testing.T, what string, cond func() string) {
	t.Helper()
	var last string
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if last = cond(); last == "" {
			return
		}
	}
	t.Fatalf("%s: %s", what, last)
}

type testLog struct{ t *testing.T }

func (w testLog) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}
