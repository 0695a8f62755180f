//go:build linux

// Package istiocni is the capture reference sidelane's tests compare
// against: istio-cni's own code (istio.io/istio/cni/pkg/plugin, at the
// Istio version hack/install-tools.sh pins for pilot-agent), run in
// process. A case's pod becomes the corev1.Pod Istio's injector gives it
// (Inject); istio-cni reads it (ExtractPodInfo), validates it and computes
// the redirect (NewRedirect), and its rule manager (iptables or nftables)
// programs it into the pod's network namespace (Program), the calls
// istio-cni's CNI ADD makes once it has fetched the pod.
//
// Only tests import this package: the product must not depend on
// istio.io/istio (TestProductDoesNotImportIstio checks `go list -deps
// ./cmd/...`).
package istiocni

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"

	"istio.io/api/annotation"
	"istio.io/istio/cni/pkg/plugin"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/sidelane/sidelane/istio/capture"
	capturekube "github.com/sidelane/sidelane/istio/capture/kube"
)

// Backend is one of istio-cni's rule managers.
type Backend string

// istio-cni's rule managers.
const (
	IPTables Backend = "iptables"
	NFTables Backend = "nftables"
)

// injectorUID is the runAsUser/runAsGroup Istio's injector gives
// istio-proxy when the pod sets none.
const injectorUID = 1337

// Inject returns the pod Istio's injector (kube-inject with istio-cni
// enabled) makes of p: p's annotations plus sidecar.istio.io/status, an
// istio-validation init container, and an istio-proxy container whose env
// is p.ProxyEnv plus the proxyMetadata of the proxy.istio.io/config
// annotation (the injector turns each entry into env; the pod's env wins,
// as in the injection template) and whose securityContext runs it as
// p.ProxyUID/ProxyGID (1337 when unset). The capture annotations the
// injector itself writes in CNI mode only restate istio-cni's defaults
// (includeOutboundIPRanges "*", excludeInboundPorts gaining the status
// port 15020 that istio-cni adds anyway), so they are left out.
func Inject(p capture.Pod) (*corev1.Pod, error) {
	ann := map[string]string{annotation.SidecarStatus.Name: `{"initContainers":["istio-validation"],"containers":["istio-proxy"]}`}
	for k, v := range p.Annotations {
		ann[k] = v
	}
	env := map[string]string{}
	if cfg, ok := p.Annotations[annotation.ProxyConfig.Name]; ok {
		var pc struct {
			ProxyMetadata map[string]string `json:"proxyMetadata"`
		}
		if err := yaml.Unmarshal([]byte(cfg), &pc); err != nil {
			return nil, fmt.Errorf("annotation %s: %w", annotation.ProxyConfig.Name, err)
		}
		for k, v := range pc.ProxyMetadata {
			env[k] = v
		}
	}
	for k, v := range p.ProxyEnv {
		env[k] = v
	}
	proxy := corev1.Container{
		Name:            capturekube.ProxyContainer,
		Args:            []string{"proxy", "sidecar"},
		SecurityContext: &corev1.SecurityContext{RunAsUser: idOr(p.ProxyUID), RunAsGroup: idOr(p.ProxyGID)},
	}
	for _, k := range slices.Sorted(maps.Keys(env)) {
		proxy.Env = append(proxy.Env, corev1.EnvVar{Name: k, Value: env[k]})
	}
	uid := strconv.FormatInt(*proxy.SecurityContext.RunAsUser, 10)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "pod", Namespace: "default", Annotations: ann},
		Spec: corev1.PodSpec{
			InitContainers: []corev1.Container{{
				Name: ValidationContainer,
				// The injection template's args for a pod without capture
				// annotations (the tests validate only such pods).
				Args: []string{"istio-iptables", "-p", "15001", "-z", "15006", "-u", uid, "-m", "REDIRECT",
					"-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020",
					"--log_output_level=default:info", "--run-validation", "--skip-rule-apply"},
				SecurityContext: proxy.SecurityContext.DeepCopy(),
			}},
			Containers: []corev1.Container{{Name: "app"}, proxy},
		},
	}, nil
}

// ValidationContainer is the init container Istio's injector adds in CNI
// mode: it checks that istio-cni's rules are in place.
const ValidationContainer = "istio-validation"

// ValidationArgs are the args of pod's istio-validation init container
// (pilot-agent's), nil if it has none.
func ValidationArgs(pod *corev1.Pod) []string {
	for _, c := range pod.Spec.InitContainers {
		if c.Name == ValidationContainer {
			return c.Args
		}
	}
	return nil
}

func idOr(id *int64) *int64 {
	if id != nil {
		return id
	}
	v := int64(injectorUID)
	return &v
}

// Redirect is istio-cni's redirect for pod: NewRedirect(ExtractPodInfo(pod)).
// An error is istio-cni refusing the pod (its CNI ADD fails).
func Redirect(pod *corev1.Pod) (*plugin.Redirect, error) {
	return plugin.NewRedirect(plugin.ExtractPodInfo(pod))
}

// WithoutCaptureAnnotations is pod without the annotations NewRedirect
// reads (interceptionMode, traffic.sidecar.istio.io/*, the virtual
// interface ones): what Istio's defaults for that same pod are computed
// from. Its proxy's uid/gid and env stay.
func WithoutCaptureAnnotations(pod *corev1.Pod) *corev1.Pod {
	out := pod.DeepCopy()
	for k := range out.Annotations {
		if strings.HasPrefix(k, "traffic.sidecar.istio.io/") || k == annotation.SidecarInterceptionMode.Name ||
			k == annotation.IoIstioRerouteVirtualInterfaces.Name {
			delete(out.Annotations, k)
		}
	}
	return out
}

// Program installs r in the network namespace at netns with backend's
// rule manager, as istio-cni's ADD does (the manager enters the namespace
// itself and runs iptables-restore, or nft through knftables, there).
func Program(backend Backend, podName, netns string, r *plugin.Redirect) error {
	var mgr plugin.InterceptRuleMgr
	switch backend {
	case IPTables:
		mgr = plugin.IptablesInterceptRuleMgr()
	case NFTables:
		mgr = plugin.NftablesInterceptRuleMgr()
	default:
		return fmt.Errorf("istio-cni has no %q rule manager", backend)
	}
	if err := mgr.Program(podName, netns, r); err != nil {
		return fmt.Errorf("istio-cni %s Program: %w", backend, err)
	}
	return nil
}

// ErrRefused is istio-cni's NewRedirect refusing a pod (its ADD fails).
var ErrRefused = errors.New("istio-cni refuses the pod")

// Apply is istio-cni's ADD for p (injected) in the namespace at netns:
// Inject, Redirect, Program.
func Apply(backend Backend, p capture.Pod, podName, netns string) error {
	pod, err := Inject(p)
	if err != nil {
		return err
	}
	r, err := Redirect(pod)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrRefused, err)
	}
	return Program(backend, podName, netns, r)
}
