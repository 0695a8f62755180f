package kube_test

import (
	"errors"
	"io"
	"log/slog"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/sidelane/sidelane/agent/kube"
	"github.com/sidelane/sidelane/istio/classify"
)

// TestShutdownTaintFollowsDaemonSet: a graceful stop re-adds the taint
// while the agent's DaemonSet exists (a rollout), and leaves it off when
// helm uninstall removed the DaemonSet (or its RBAC): otherwise the node
// stays tainted with no agent left to remove it.
func TestShutdownTaintFollowsDaemonSet(t *testing.T) {
	ds := types.NamespacedName{Namespace: "sidelane-system", Name: "sidelane"}
	now := metav1.Now()
	tests := []struct {
		name      string
		daemonSet types.NamespacedName
		objects   []runtime.Object
		getErr    error
		wantTaint bool
	}{
		{"rollout: the DaemonSet exists", ds, []runtime.Object{&appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: ds.Namespace, Name: ds.Name}}}, nil, true},
		{"uninstall: the DaemonSet is gone", ds, nil, nil, false},
		{"uninstall: the DaemonSet is being deleted", ds, []runtime.Object{&appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{
			Namespace: ds.Namespace, Name: ds.Name, DeletionTimestamp: &now, Finalizers: []string{"foregroundDeletion"}}}}, nil, false},
		{"uninstall: the agent's RBAC is gone", ds, nil, apierrors.NewForbidden(schema.GroupResource{Group: "apps", Resource: "daemonsets"}, ds.Name, errors.New("no")), false},
		{"API unreachable: keep the node closed", ds, nil, errors.New("connection refused"), true},
		{"no --daemonset: always", types.NamespacedName{}, nil, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			objs := append([]runtime.Object{&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1"}}}, tt.objects...)
			cs := fake.NewClientset(objs...)
			if tt.getErr != nil {
				cs.PrependReactor("get", "daemonsets", func(k8stesting.Action) (bool, runtime.Object, error) {
					return true, nil, tt.getErr
				})
			}
			ctrl, err := kube.New(kube.Config{Client: cs, NodeName: "n1", Classify: classify.DefaultConfig(),
				Log: slog.New(slog.NewTextHandler(io.Discard, nil)), ManageTaint: true, DaemonSet: tt.daemonSet})
			if err != nil {
				t.Fatal(err)
			}
			ctrl.Shutdown()
			if got := hasTaint(t, cs, "n1"); got != tt.wantTaint {
				t.Errorf("taint after a graceful stop: %v, want %v", got, tt.wantTaint)
			}
		})
	}
}
