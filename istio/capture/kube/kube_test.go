package kube

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sidelane/sidelane/istio/capture"
)

func TestPod(t *testing.T) {
	uid, gid := int64(2000), int64(3000)
	always := corev1.ContainerRestartPolicyAlways
	for _, tc := range []struct {
		name   string
		native bool
	}{{"sidecar container", false}, {"native sidecar", true}} {
		t.Run(tc.name, func(t *testing.T) {
			proxy := corev1.Container{
				Name:            ProxyContainer,
				Env:             []corev1.EnvVar{{Name: capture.EnvDNSCapture, Value: "true"}},
				SecurityContext: &corev1.SecurityContext{RunAsUser: &uid, RunAsGroup: &gid},
			}
			p := &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Annotations: map[string]string{capture.AnnotationExcludeOutboundPorts: "5432"}},
				Spec: corev1.PodSpec{
					InitContainers: []corev1.Container{{Name: "istio-validation"}},
					Containers:     []corev1.Container{{Name: "app", Env: []corev1.EnvVar{{Name: capture.EnvDNSCapture, Value: "false"}}}},
				},
			}
			if tc.native {
				proxy.RestartPolicy = &always
				p.Spec.InitContainers = append(p.Spec.InitContainers, proxy)
			} else {
				p.Spec.Containers = append(p.Spec.Containers, proxy)
			}
			if !HasSidecar(p) {
				t.Fatal("HasSidecar = false")
			}
			s, _, err := capture.Parse(Pod(p))
			if err != nil {
				t.Fatal(err)
			}
			if !s.DNSCapture || s.ProxyUIDs[0] != 2000 || s.ProxyGIDs[0] != 3000 || len(s.ExcludeOutboundPorts) != 1 {
				t.Errorf("settings not taken from istio-proxy and annotations: %+v", s)
			}
		})
	}
	if HasSidecar(&corev1.Pod{}) {
		t.Error("HasSidecar of an empty pod")
	}
}
