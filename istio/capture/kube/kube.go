// Package kube reads a capture.Pod out of a Kubernetes pod the way
// istio-cni does (its ExtractPodInfo): all annotations, and the env and
// securityContext of the container named istio-proxy, which may be a
// regular container or a native sidecar (an init container).
package kube

import (
	corev1 "k8s.io/api/core/v1"

	"github.com/sidelane/sidelane/istio/capture"
)

// ProxyContainer is the name Istio's injector gives the sidecar.
const ProxyContainer = "istio-proxy"

// Pod returns p's capture knobs. Env entries set with valueFrom are not
// resolved (istio-cni does not resolve them either).
func Pod(p *corev1.Pod) capture.Pod {
	out := capture.Pod{Annotations: p.Annotations, ProxyEnv: map[string]string{}}
	containers := append(append([]corev1.Container{}, p.Spec.InitContainers...), p.Spec.Containers...)
	for _, c := range containers {
		if c.Name != ProxyContainer {
			continue
		}
		for _, e := range c.Env {
			out.ProxyEnv[e.Name] = e.Value
		}
		if sc := c.SecurityContext; sc != nil {
			out.ProxyUID, out.ProxyGID = sc.RunAsUser, sc.RunAsGroup
		}
	}
	return out
}

// HasSidecar reports whether p has an istio-proxy container at all.
func HasSidecar(p *corev1.Pod) bool {
	for _, list := range [][]corev1.Container{p.Spec.InitContainers, p.Spec.Containers} {
		for _, c := range list {
			if c.Name == ProxyContainer {
				return true
			}
		}
	}
	return false
}
