// Package istioref drives Istio's own capture as the reference the tests
// compare sidelane against: the flags istio-cni passes to `pilot-agent
// istio-iptables` for a pod. It reads the raw annotations and env, not
// sidelane's parser, so comparing against it also checks the parser.
// Only tests import it.
package istioref

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"

	"github.com/sidelane/sidelane/istio/capture"
)

// Validate is istio-cni's own check of a pod's annotations (NewRedirect's
// annotation validators, cni/pkg/plugin/sidecar_redirect.go, copied here
// without sidelane's parser): an error is istio-cni refusing the pod, so
// its ADD fails. Pods it passes may still be refused by istio-iptables
// itself (a "*" in an outbound port list); run it to find out.
func Validate(pod capture.Pod) error {
	checks := []struct {
		name  string
		check func(string) error
	}{
		{capture.AnnotationInterceptionMode, func(v string) error {
			if v != capture.ModeRedirect && v != capture.ModeTPROXY {
				return fmt.Errorf("interceptionMode invalid: %v", v)
			}
			return nil
		}},
		{capture.AnnotationIncludeOutboundIPRanges, wildcardOr(cidrList)},
		{capture.AnnotationExcludeOutboundIPRanges, cidrList},
		{capture.AnnotationExcludeInboundPorts, wildcardOr(portList)},
		{capture.AnnotationIncludeInboundPorts, wildcardOr(portList)},
		{capture.AnnotationExcludeOutboundPorts, wildcardOr(portList)},
		{capture.AnnotationIncludeOutboundPorts, wildcardOr(portList)},
		{capture.AnnotationExcludeInterfaces, interfaceList},
		{capture.AnnotationRerouteVirtInterfaces, interfaceList},
		{capture.AnnotationKubevirtInterfaces, interfaceList},
	}
	for _, c := range checks {
		if v, ok := pod.Annotations[c.name]; ok {
			if err := c.check(v); err != nil {
				return fmt.Errorf("istio-cni rejects %s=%q: %w", c.name, v, err)
			}
		}
	}
	return nil
}

// DefaultsPod is the same pod without its capture annotations: what
// Istio's default capture for it reads (the proxy's env, proxyMetadata and
// uid/gid).
func DefaultsPod(pod capture.Pod) capture.Pod {
	out := capture.Pod{ProxyEnv: pod.ProxyEnv, ProxyUID: pod.ProxyUID, ProxyGID: pod.ProxyGID}
	if v, ok := pod.Annotations[capture.AnnotationProxyConfig]; ok {
		out.Annotations = map[string]string{capture.AnnotationProxyConfig: v}
	}
	return out
}

func wildcardOr(check func(string) error) func(string) error {
	return func(v string) error {
		if v == "*" {
			return nil
		}
		return check(v)
	}
}

func cidrList(v string) error {
	if v == "" {
		return nil
	}
	for _, c := range strings.Split(v, ",") {
		if _, err := netip.ParsePrefix(c); err != nil {
			return err
		}
	}
	return nil
}

func portList(v string) error {
	v = strings.TrimSpace(v)
	if v == "" {
		return nil
	}
	for _, p := range strings.Split(v, ",") {
		if _, err := strconv.ParseUint(strings.TrimSpace(p), 10, 16); err != nil {
			return err
		}
	}
	return nil
}

var interfaceName = regexp.MustCompile(`^[a-zA-Z][a-zA-Z0-9_.\-]*$`)

func interfaceList(v string) error {
	if v == "" {
		return nil
	}
	for _, i := range strings.Split(v, ",") {
		i = strings.TrimSpace(i)
		switch {
		case i == "":
			return errors.New("empty interface name")
		case len(i) > 15 || !interfaceName.MatchString(i):
			return fmt.Errorf("bad interface name %q", i)
		}
	}
	return nil
}

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
		"-u", strconv.Itoa(int(ProxyID(pod.ProxyUID))), "-g", strconv.Itoa(int(ProxyID(pod.ProxyGID))),
		"-m", get(capture.AnnotationInterceptionMode, "REDIRECT"),
		"-i", get(capture.AnnotationIncludeOutboundIPRanges, "*"),
		"-x", get(capture.AnnotationExcludeOutboundIPRanges, ""),
		"-b", get(capture.AnnotationIncludeInboundPorts, "*"),
		"-d", strings.Join(ports, ","),
		"-o", get(capture.AnnotationExcludeOutboundPorts, "15020"),
		"-q", get(capture.AnnotationIncludeOutboundPorts, ""),
		"-c", get(capture.AnnotationExcludeInterfaces, ""),
	}
	if EnvBool(pod, capture.EnvDNSCapture) {
		flags = append(flags, "--redirect-dns", "--capture-all-dns")
	}
	if EnvBool(pod, capture.EnvDualStack) {
		flags = append(flags, "--dual-stack")
	}
	return flags
}

// ProxyID is istio-cni's rule for the proxy's uid/gid: the container's
// unless unset or root, else 1337.
func ProxyID(id *int64) uint32 {
	if id == nil || *id <= 0 {
		return capture.DefaultProxyUID
	}
	return uint32(*id)
}

// EnvBool reads an ISTIO_* knob from the proxy's env, or else from a
// simple `NAME: "value"` line of the proxy.istio.io/config proxyMetadata
// (the injector turns those into env).
func EnvBool(p capture.Pod, name string) bool {
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
