// Package istioref is what is left of a hand-written copy of istio-cni's
// annotation logic: the `pilot-agent istio-iptables` flags istio-cni's
// redirect amounts to, for sidelane-bench's Istio contender. The bench is
// a command of the product, which must not depend on istio.io/istio, and
// Istio exports no function from a pod to those flags (its NewRedirect
// keeps them unexported), so this stays. The tests use Istio's own code
// instead (internal/istiocni).
package istioref

import (
	"strconv"
	"strings"

	"github.com/sidelane/sidelane/istio/capture"
)

// Flags are istio-cni's istio-iptables settings for pod (its NewRedirect
// and defaults, cni/pkg/plugin), as command-line flags.
func Flags(pod capture.Pod) []string {
	a := pod.Annotations
	get := func(name, def string) string {
		if v, ok := a[name]; ok {
			return v
		}
		return def
	}
	// istio-cni appends Istio's own ports to excludeInboundPorts.
	excludeIn := strings.TrimSpace(get(capture.AnnotationExcludeInboundPorts, "15020"))
	if excludeIn != "" && !strings.HasSuffix(excludeIn, ",") {
		excludeIn += ","
	}
	excludeIn += "15020,15021,15090"
	var ports []string
	for _, p := range strings.Split(excludeIn, ",") {
		if !contains(ports, p) {
			ports = append(ports, p)
		}
	}
	flags := []string{
		"-p", "15001", "-z", "15006",
		"-u", strconv.Itoa(int(proxyID(pod.ProxyUID))), "-g", strconv.Itoa(int(proxyID(pod.ProxyGID))),
		"-m", get(capture.AnnotationInterceptionMode, "REDIRECT"),
		"-i", get(capture.AnnotationIncludeOutboundIPRanges, "*"),
		"-x", get(capture.AnnotationExcludeOutboundIPRanges, ""),
		"-b", get(capture.AnnotationIncludeInboundPorts, "*"),
		"-d", strings.Join(ports, ","),
		"-o", get(capture.AnnotationExcludeOutboundPorts, "15020"),
		"-q", get(capture.AnnotationIncludeOutboundPorts, ""),
		"-c", get(capture.AnnotationExcludeInterfaces, ""),
	}
	if envBool(pod, capture.EnvDNSCapture) {
		flags = append(flags, "--redirect-dns", "--capture-all-dns")
	}
	if envBool(pod, capture.EnvDualStack) {
		flags = append(flags, "--dual-stack")
	}
	return flags
}

// proxyID is istio-cni's rule for the proxy's uid/gid: the container's
// unless unset or root, else 1337.
func proxyID(id *int64) uint32 {
	if id == nil || *id <= 0 {
		return capture.DefaultProxyUID
	}
	return uint32(*id)
}

// envBool reads an ISTIO_* knob from the proxy's env, or else from a
// simple `NAME: "value"` line of the proxy.istio.io/config proxyMetadata
// (the injector turns those into env).
func envBool(p capture.Pod, name string) bool {
	v, ok := p.ProxyEnv[name]
	if !ok {
		cfg := p.Annotations[capture.AnnotationProxyConfig]
		if i := strings.Index(cfg, name+":"); i >= 0 {
			if f := strings.Fields(cfg[i+len(name)+1:]); len(f) > 0 {
				v = strings.Trim(f[0], `"'`)
			}
		}
	}
	b, _ := strconv.ParseBool(v)
	return b
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
