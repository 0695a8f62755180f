package kubeharness_test

import (
	"context"
	"os/exec"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/sidelane/sidelane/internal/kubeharness"
)

func TestStart(t *testing.T) {
	c := kubeharness.Start(t)
	cs, err := kubernetes.NewForConfig(c.RESTConfig)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "harness", Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}}
	if _, err := cs.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create namespace: %v", err)
	}
	// Privileged, host-network pods must be admitted (the agent runs as one).
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "harness"},
		Spec: corev1.PodSpec{
			NodeName:    "node-a",
			HostNetwork: true,
			Containers: []corev1.Container{{
				Name: "c", Image: "example.invalid/c",
				SecurityContext: &corev1.SecurityContext{Privileged: new(true)},
			}},
		},
	}
	if _, err := cs.CoreV1().Pods("harness").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create pod: %v", err)
	}

	// kubectl with the kubeconfig sees the same objects.
	out, err := exec.Command(c.Kubectl, "--kubeconfig", c.Kubeconfig, "get", "pods", "-n", "harness",
		"--field-selector", "spec.nodeName=node-a", "-o", "name").CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl: %v\n%s", err, out)
	}
	if got := strings.TrimSpace(string(out)); got != "pod/p" {
		t.Fatalf("kubectl get pods = %q, want pod/p", got)
	}
}
