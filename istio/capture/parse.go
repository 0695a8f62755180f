package capture

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"sigs.k8s.io/yaml"
)

// The annotations and environment variables Parse reads, as Istio names them.
const (
	AnnotationIncludeOutboundIPRanges = "traffic.sidecar.istio.io/includeOutboundIPRanges"
	AnnotationExcludeOutboundIPRanges = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
	AnnotationIncludeInboundPorts     = "traffic.sidecar.istio.io/includeInboundPorts"
	AnnotationExcludeInboundPorts     = "traffic.sidecar.istio.io/excludeInboundPorts"
	AnnotationIncludeOutboundPorts    = "traffic.sidecar.istio.io/includeOutboundPorts"
	AnnotationExcludeOutboundPorts    = "traffic.sidecar.istio.io/excludeOutboundPorts"
	AnnotationExcludeInterfaces       = "traffic.sidecar.istio.io/excludeInterfaces"
	AnnotationKubevirtInterfaces      = "traffic.sidecar.istio.io/kubevirtInterfaces"
	AnnotationRerouteVirtInterfaces   = "istio.io/reroute-virtual-interfaces"
	AnnotationInterceptionMode        = "sidecar.istio.io/interceptionMode"
	AnnotationProxyConfig             = "proxy.istio.io/config"

	EnvDNSCapture = "ISTIO_META_DNS_CAPTURE"
	EnvDualStack  = "ISTIO_DUAL_STACK"
	// EnvInvalidDrop is istio-cni's INVALID_DROP (istio-iptables'
	// --drop-invalid): drop TCP packets conntrack marks INVALID.
	EnvInvalidDrop = "INVALID_DROP"
)

// Interception modes (sidecar.istio.io/interceptionMode).
const (
	ModeRedirect = "REDIRECT"
	ModeTPROXY   = "TPROXY"
	ModeNone     = "NONE"
)

// Istio's own inbound ports that are never captured: the status port
// (15020), health (15021) and Prometheus (15090), which istio-cni always
// appends to excludeInboundPorts, and HBONE (15008), which istio-iptables
// returns on before any other inbound rule.
var alwaysExcludedInbound = []uint16{15020, 15021, 15090}

// defaultExcludeOutboundPorts is istio-cni's default for an absent
// excludeOutboundPorts annotation (its defaultRedirectExcludePort).
var defaultExcludeOutboundPorts = []PortRange{{First: 15020, Last: 15020}}

// ErrUnsupported marks knobs Istio accepts but sidelane cannot honour; the
// caller treats it like a malformed annotation.
var ErrUnsupported = errors.New("not supported by sidelane")

// Pod is what decides one pod's capture, taken from its spec the way
// istio-cni takes it: all annotations, and the istio-proxy container's
// environment and securityContext.
type Pod struct {
	Annotations map[string]string
	// ProxyEnv is the istio-proxy container's env (name -> value).
	ProxyEnv map[string]string
	// ProxyUID/ProxyGID are istio-proxy's runAsUser/runAsGroup; nil or 0
	// means Istio's default 1337.
	ProxyUID *int64
	ProxyGID *int64
}

// Defaults is Istio's default capture (what istio-cni installs for an
// injected pod with no capture annotations): all outbound TCP to 15001, all
// inbound TCP but Istio's own ports to 15006, the proxy's uid/gid 1337
// exempt, outbound port 15020 exempt, no DNS capture.
func Defaults() Settings {
	return Settings{
		OutboundPort:         OutboundPort,
		InboundPort:          InboundPort,
		ProxyUIDs:            []uint32{DefaultProxyUID},
		ProxyGIDs:            []uint32{DefaultProxyGID},
		OutboundAllCIDRs:     true,
		ExcludeOutboundPorts: slices.Clone(defaultExcludeOutboundPorts),
		InboundAllPorts:      true,
		ExcludeInboundPorts:  withAlwaysExcluded(nil),
		DNSPort:              DNSPort,
	}
}

// ParseOrDefaults is Parse with a fallback, for callers that must capture
// a pod whatever its annotations (the agent does not: like istio-cni it
// fails the pod's ADD when Parse fails). When Parse fails it returns
// Istio's default capture for this pod together with Parse's error: the
// traffic.sidecar.istio.io/* and interception annotations are ignored, but
// the proxy's uid/gid, ISTIO_DUAL_STACK and ISTIO_META_DNS_CAPTURE (env,
// or proxyMetadata when that parses) still apply, as they do for the same
// pod without its bad annotations.
func ParseOrDefaults(p Pod) (Settings, []string, error) {
	s, warnings, err := Parse(p)
	if err == nil {
		return s, warnings, nil
	}
	d := Pod{ProxyEnv: p.ProxyEnv, ProxyUID: p.ProxyUID, ProxyGID: p.ProxyGID}
	if v, ok := p.Annotations[AnnotationProxyConfig]; ok {
		if _, perr := proxyMetadata(p.Annotations); perr == nil {
			d.Annotations = map[string]string{AnnotationProxyConfig: v}
		}
	}
	// d holds no knob Parse can reject.
	s, warnings, derr := Parse(d)
	if derr != nil {
		return Defaults(), warnings, errors.Join(err, derr)
	}
	return s, warnings, err
}

// Parse turns p's capture knobs into Settings with istio-cni's defaults
// and semantics. A value Istio rejects gives an error naming the
// annotation and the value (and zero Settings: nothing is half-applied).
// Values Istio tolerates with a log line (an unparsable
// ISTIO_META_DNS_CAPTURE) come back as warnings.
//
// interceptionMode NONE gives Settings that capture nothing (Istio injects
// no capture for it); TPROXY and the virtual-interface annotations give an
// error wrapping ErrUnsupported.
func Parse(p Pod) (Settings, []string, error) {
	var warnings []string
	a := p.Annotations
	s := Defaults()

	mode, ok := a[AnnotationInterceptionMode]
	if !ok {
		mode = ModeRedirect
	}
	switch mode {
	case ModeRedirect:
	case ModeNone:
		return Settings{OutboundPort: OutboundPort, InboundPort: InboundPort, DNSPort: DNSPort}, nil, nil
	case ModeTPROXY:
		// sidelane's backends capture inbound without NAT (eBPF) or with
		// REDIRECT (iptables, nftables); REDIRECT gives the same
		// capture, only the app sees 127.0.0.6 instead of the client.
		return Settings{}, nil, annotationError(AnnotationInterceptionMode, mode,
			fmt.Errorf("TPROXY is %w: set %s: %s (or remove the annotation)", ErrUnsupported, AnnotationInterceptionMode, ModeRedirect))
	default:
		return Settings{}, nil, annotationError(AnnotationInterceptionMode, mode, errors.New("want REDIRECT, TPROXY or NONE"))
	}
	for _, name := range []string{AnnotationKubevirtInterfaces, AnnotationRerouteVirtInterfaces} {
		if v, ok := a[name]; ok && v != "" {
			return Settings{}, nil, annotationError(name, v, ErrUnsupported)
		}
	}

	s.ProxyUIDs = []uint32{proxyID(p.ProxyUID, DefaultProxyUID)}
	s.ProxyGIDs = []uint32{proxyID(p.ProxyGID, DefaultProxyGID)}

	if v, ok := a[AnnotationIncludeOutboundIPRanges]; ok {
		if v == "*" {
			s.OutboundAllCIDRs = true
		} else {
			cidrs, err := parseCIDRs(v)
			if err != nil {
				return Settings{}, nil, annotationError(AnnotationIncludeOutboundIPRanges, v, err)
			}
			s.OutboundAllCIDRs = false
			s.IncludeOutboundCIDRs = cidrs
		}
	}
	if v, ok := a[AnnotationExcludeOutboundIPRanges]; ok {
		cidrs, err := parseCIDRs(v)
		if err != nil {
			return Settings{}, nil, annotationError(AnnotationExcludeOutboundIPRanges, v, err)
		}
		s.ExcludeOutboundCIDRs = cidrs
	}

	if v, ok := a[AnnotationIncludeInboundPorts]; ok {
		if v == "*" {
			s.InboundAllPorts = true
		} else {
			ports, err := parsePorts(v, false)
			if err != nil {
				return Settings{}, nil, annotationError(AnnotationIncludeInboundPorts, v, err)
			}
			s.InboundAllPorts = false
			s.IncludeInboundPorts = ports
		}
	}
	if v, ok := a[AnnotationExcludeInboundPorts]; ok {
		switch {
		case v == "*" && s.InboundAllPorts:
			// istio-cni passes it on; istio-iptables' iptables-restore
			// then refuses "--dport *" and the pod fails.
			return Settings{}, nil, annotationError(AnnotationExcludeInboundPorts, v,
				fmt.Errorf("%q is not a port (istio-iptables refuses it with %s \"*\")", v, AnnotationIncludeInboundPorts))
		case v == "*":
			// istio-iptables uses the excludes only with includeInboundPorts
			// "*"; with a list (or none) a "*" here is ignored.
		default:
			ports, err := parsePorts(v, false)
			if err != nil {
				return Settings{}, nil, annotationError(AnnotationExcludeInboundPorts, v, err)
			}
			s.ExcludeInboundPorts = withAlwaysExcluded(ports)
		}
	}
	// includeOutboundPorts is the one port list Istio passes to iptables
	// unvalidated by the injector, so iptables' "first:last" ranges work
	// there; sidelane accepts exactly those.
	if v, ok := a[AnnotationIncludeOutboundPorts]; ok {
		ports, err := parsePorts(v, true)
		if err != nil {
			return Settings{}, nil, annotationError(AnnotationIncludeOutboundPorts, v, err)
		}
		s.IncludeOutboundPorts = ports
	}
	if v, ok := a[AnnotationExcludeOutboundPorts]; ok {
		ports, err := parsePorts(v, false)
		if err != nil {
			return Settings{}, nil, annotationError(AnnotationExcludeOutboundPorts, v, err)
		}
		s.ExcludeOutboundPorts = ports
	}
	if v, ok := a[AnnotationExcludeInterfaces]; ok {
		ifaces, err := parseInterfaces(v)
		if err != nil {
			return Settings{}, nil, annotationError(AnnotationExcludeInterfaces, v, err)
		}
		s.ExcludeInterfaces = ifaces
	}

	meta, err := proxyMetadata(a)
	if err != nil {
		return Settings{}, nil, err
	}
	for _, knob := range []struct {
		name string
		dst  *bool
	}{{EnvDNSCapture, &s.DNSCapture}, {EnvDualStack, &s.DualStack}, {EnvInvalidDrop, &s.DropInvalid}} {
		v, src, ok := lookupEnv(p.ProxyEnv, meta, knob.name)
		if !ok {
			continue
		}
		b, err := strconv.ParseBool(v)
		if err != nil {
			// istio-cni logs this and leaves the knob off; so do we.
			warnings = append(warnings, fmt.Sprintf("%s %s=%q is not a boolean: ignored", src, knob.name, v))
			continue
		}
		*knob.dst = b
	}
	return s, warnings, nil
}

func annotationError(name, value string, err error) error {
	return fmt.Errorf("annotation %s=%q: %w", name, value, err)
}

// proxyID is istio-cni's rule: the container's id unless unset or root.
func proxyID(id *int64, def uint32) uint32 {
	if id == nil || *id <= 0 || *id > int64(^uint32(0)) {
		return def
	}
	return uint32(*id)
}

// parseCIDRs parses Istio's comma-separated CIDR list; "" is the empty
// list. Like Istio it does not trim spaces, and it masks host bits as
// iptables does.
func parseCIDRs(v string) ([]netip.Prefix, error) {
	if v == "" {
		return nil, nil
	}
	var out []netip.Prefix
	for _, item := range strings.Split(v, ",") {
		p, err := netip.ParsePrefix(item)
		if err != nil {
			return nil, fmt.Errorf("bad CIDR %q: %w", item, err)
		}
		p = p.Masked()
		if !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out, nil
}

// parsePorts parses Istio's comma-separated port list ("" is empty; each
// item trimmed, as Istio validates it). With ranges, "first:last" is
// accepted too.
func parsePorts(v string, ranges bool) ([]PortRange, error) {
	if strings.TrimSpace(v) == "" {
		return nil, nil
	}
	var out []PortRange
	for _, item := range strings.Split(v, ",") {
		item = strings.TrimSpace(item)
		first, last, isRange := strings.Cut(item, ":")
		if isRange && !ranges {
			return nil, fmt.Errorf("bad port %q: port ranges are not accepted here", item)
		}
		lo, err := parsePort(first)
		if err != nil {
			return nil, err
		}
		hi := lo
		if isRange {
			if hi, err = parsePort(last); err != nil {
				return nil, err
			}
			if hi < lo {
				return nil, fmt.Errorf("bad port range %q: first above last", item)
			}
		}
		r := PortRange{First: lo, Last: hi}
		if !slices.Contains(out, r) {
			out = append(out, r)
		}
	}
	return out, nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil {
		return 0, fmt.Errorf("bad port %q: want a number from 0 to 65535", s)
	}
	return uint16(n), nil
}

// withAlwaysExcluded returns HBONE's port, then ports, then Istio's own
// ports, without duplicates: the order istio-iptables' rules have.
func withAlwaysExcluded(ports []PortRange) []PortRange {
	out := []PortRange{{First: HBONEPort, Last: HBONEPort}}
	add := func(r PortRange) {
		if !slices.Contains(out, r) {
			out = append(out, r)
		}
	}
	for _, r := range ports {
		add(r)
	}
	for _, p := range alwaysExcludedInbound {
		add(PortRange{First: p, Last: p})
	}
	return out
}

var interfaceName = regexp.MustCompile(`^[a-zA-Z][a-zA-Z0-9_.\-]*$`)

// parseInterfaces follows Istio's ValidateInterfaceNames.
func parseInterfaces(v string) ([]string, error) {
	if v == "" {
		return nil, nil
	}
	var out []string
	for _, item := range strings.Split(v, ",") {
		item = strings.TrimSpace(item)
		switch {
		case item == "":
			return nil, errors.New("empty interface name")
		case len(item) > 15:
			return nil, fmt.Errorf("interface name %q longer than 15 characters", item)
		case !interfaceName.MatchString(item):
			return nil, fmt.Errorf("interface name %q has invalid characters", item)
		}
		if !slices.Contains(out, item) {
			out = append(out, item)
		}
	}
	return out, nil
}

// proxyMetadata reads proxyMetadata from the proxy.istio.io/config
// annotation (YAML or JSON ProxyConfig, proto or JSON field names).
func proxyMetadata(a map[string]string) (map[string]string, error) {
	v, ok := a[AnnotationProxyConfig]
	if !ok || strings.TrimSpace(v) == "" {
		return nil, nil
	}
	js, err := yaml.YAMLToJSON([]byte(v))
	if err != nil {
		return nil, annotationError(AnnotationProxyConfig, v, fmt.Errorf("not YAML: %w", err))
	}
	var pc struct {
		ProxyMetadata  map[string]string `json:"proxyMetadata"`
		ProxyMetadata2 map[string]string `json:"proxy_metadata"`
	}
	if string(js) == "null" {
		return nil, nil
	}
	if err := json.Unmarshal(js, &pc); err != nil {
		return nil, annotationError(AnnotationProxyConfig, v, fmt.Errorf("proxyMetadata: %w", err))
	}
	if pc.ProxyMetadata == nil {
		return pc.ProxyMetadata2, nil
	}
	return pc.ProxyMetadata, nil
}

// lookupEnv finds name in the proxy's env, else in proxyMetadata (which the
// injector turns into that env), and says where it came from.
func lookupEnv(env, meta map[string]string, name string) (value, source string, ok bool) {
	if v, ok := env[name]; ok {
		return v, "istio-proxy env", true
	}
	if v, ok := meta[name]; ok {
		return v, AnnotationProxyConfig + " proxyMetadata", true
	}
	return "", "", false
}
