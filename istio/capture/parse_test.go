package capture

import (
	"encoding/json"
	"errors"
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

func ptr(v int64) *int64 { return &v }

// parseCases are pods as Istio's injector leaves them; each has a golden
// file testdata/parse/<name>.golden with the Settings (or error) Parse gives.
var parseCases = []struct {
	name string
	pod  Pod
}{
	{"no-annotations", Pod{}},
	{"injected-defaults", Pod{Annotations: map[string]string{
		AnnotationInterceptionMode:        "REDIRECT",
		AnnotationIncludeInboundPorts:     "*",
		AnnotationExcludeInboundPorts:     "15020",
		AnnotationIncludeOutboundIPRanges: "*",
	}}},
	{"all-knobs", Pod{
		Annotations: map[string]string{
			AnnotationIncludeOutboundIPRanges: "10.96.0.0/12,fd00:10:96::/112,192.168.1.7/24",
			AnnotationExcludeOutboundIPRanges: "10.96.0.10/32,fd00:10:96::a/128",
			AnnotationIncludeInboundPorts:     "8080, 9090,8080",
			AnnotationExcludeInboundPorts:     "9091",
			AnnotationIncludeOutboundPorts:    "3306,8000:8100",
			AnnotationExcludeOutboundPorts:    "5432,6379",
			AnnotationExcludeInterfaces:       "net1, eth2",
		},
		ProxyEnv: map[string]string{EnvDNSCapture: "true", EnvDualStack: "true"},
		ProxyUID: ptr(2000),
		ProxyGID: ptr(3000),
	}},
	{"include-nothing", Pod{Annotations: map[string]string{
		AnnotationIncludeOutboundIPRanges: "",
		AnnotationIncludeInboundPorts:     "",
		AnnotationExcludeOutboundPorts:    "",
	}}},
	{"include-loopback", Pod{Annotations: map[string]string{AnnotationIncludeOutboundIPRanges: "127.0.0.1/32,10.0.0.0/8"}}},
	{"root-proxy-uses-1337", Pod{ProxyUID: ptr(0), ProxyGID: ptr(0)}},
	{"interception-none", Pod{Annotations: map[string]string{AnnotationInterceptionMode: "NONE"}}},
	{"dns-from-proxy-config-yaml", Pod{Annotations: map[string]string{
		AnnotationProxyConfig: "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n",
	}}},
	{"dns-from-proxy-config-json", Pod{Annotations: map[string]string{
		AnnotationProxyConfig: `{"proxyMetadata":{"ISTIO_META_DNS_CAPTURE":"1"}}`,
	}}},
	{"dns-env-overrides-proxy-config", Pod{
		Annotations: map[string]string{AnnotationProxyConfig: "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n"},
		ProxyEnv:    map[string]string{EnvDNSCapture: "false"},
	}},
	{"dns-not-a-bool-warns", Pod{ProxyEnv: map[string]string{EnvDNSCapture: "yes"}}},
	{"invalid-drop", Pod{ProxyEnv: map[string]string{EnvInvalidDrop: "true"}}},
	{"invalid-drop-from-proxy-config", Pod{Annotations: map[string]string{
		AnnotationProxyConfig: "proxyMetadata:\n  INVALID_DROP: \"1\"\n",
	}}},
	{"invalid-drop-not-a-bool-warns", Pod{ProxyEnv: map[string]string{EnvInvalidDrop: "on"}}},
	// istio-iptables uses excludeInboundPorts only with includeInboundPorts
	// "*", so a "*" there is harmless with an explicit list.
	{"exclude-inbound-wildcard-with-list", Pod{Annotations: map[string]string{
		AnnotationIncludeInboundPorts: "80",
		AnnotationExcludeInboundPorts: "*",
	}}},
	{"include-nothing-exclude-inbound-wildcard", Pod{Annotations: map[string]string{
		AnnotationIncludeInboundPorts: "",
		AnnotationExcludeInboundPorts: "*",
	}}},
	// Errors: each names the annotation and the value.
	{"bad-include-cidr", Pod{Annotations: map[string]string{AnnotationIncludeOutboundIPRanges: "10.0.0.0/8,10.1.0.0/33"}}},
	{"bad-exclude-cidr-wildcard", Pod{Annotations: map[string]string{AnnotationExcludeOutboundIPRanges: "*"}}},
	{"bad-cidr-space", Pod{Annotations: map[string]string{AnnotationExcludeOutboundIPRanges: "10.0.0.0/8, 10.1.0.0/16"}}},
	{"bad-inbound-port", Pod{Annotations: map[string]string{AnnotationIncludeInboundPorts: "80,http"}}},
	{"bad-inbound-range", Pod{Annotations: map[string]string{AnnotationExcludeInboundPorts: "8000:8100"}}},
	{"bad-outbound-port-high", Pod{Annotations: map[string]string{AnnotationExcludeOutboundPorts: "65536"}}},
	{"bad-outbound-port-empty-item", Pod{Annotations: map[string]string{AnnotationExcludeOutboundPorts: "80,"}}},
	{"bad-outbound-range-reversed", Pod{Annotations: map[string]string{AnnotationIncludeOutboundPorts: "9000:8000"}}},
	{"bad-outbound-include-wildcard", Pod{Annotations: map[string]string{AnnotationIncludeOutboundPorts: "*"}}},
	{"bad-outbound-exclude-wildcard", Pod{Annotations: map[string]string{AnnotationExcludeOutboundPorts: "*"}}},
	{"bad-exclude-inbound-wildcard", Pod{Annotations: map[string]string{AnnotationExcludeInboundPorts: "*"}}},
	{"bad-inbound-wildcard-in-list", Pod{Annotations: map[string]string{AnnotationIncludeInboundPorts: "80,*"}}},
	{"bad-interface", Pod{Annotations: map[string]string{AnnotationExcludeInterfaces: "eth0,0bad"}}},
	{"bad-interception-mode", Pod{Annotations: map[string]string{AnnotationInterceptionMode: "redirect"}}},
	{"unsupported-tproxy", Pod{Annotations: map[string]string{AnnotationInterceptionMode: "TPROXY"}}},
	{"unsupported-reroute-virtual", Pod{Annotations: map[string]string{AnnotationRerouteVirtInterfaces: "virt0"}}},
	{"bad-proxy-config", Pod{Annotations: map[string]string{AnnotationProxyConfig: "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: true\n"}}},
}

type parseGolden struct {
	Settings *Settings `json:"settings,omitempty"`
	Warnings []string  `json:"warnings,omitempty"`
	Error    string    `json:"error,omitempty"`
}

func TestParseGolden(t *testing.T) {
	for _, tc := range parseCases {
		t.Run(tc.name, func(t *testing.T) {
			s, warnings, err := Parse(tc.pod)
			var g parseGolden
			g.Warnings = warnings
			if err != nil {
				g.Error = err.Error()
				if !reflectZero(s) {
					t.Errorf("Parse returned settings with an error: %+v", s)
				}
			} else {
				g.Settings = &s
			}
			got, err := json.MarshalIndent(g, "", "  ")
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, '\n')
			path := filepath.Join("testdata", "parse", tc.name+".golden")
			if *update {
				if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test -update)", err)
			}
			if string(got) != string(want) {
				t.Errorf("Parse differs from %s (go test -update to accept):\n got: %s\nwant: %s", path, got, want)
			}
		})
	}
}

func reflectZero(s Settings) bool {
	b, _ := json.Marshal(s)
	z, _ := json.Marshal(Settings{})
	return string(b) == string(z)
}

// TestErrorsNameAnnotation checks every rejected value is reported with the
// annotation's name and the value, which is what an operator greps for.
func TestErrorsNameAnnotation(t *testing.T) {
	for _, tc := range parseCases {
		if !strings.HasPrefix(tc.name, "bad-") && !strings.HasPrefix(tc.name, "unsupported-") {
			continue
		}
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := Parse(tc.pod)
			if err == nil {
				t.Fatal("Parse accepted it")
			}
			for name, value := range tc.pod.Annotations {
				if !strings.Contains(err.Error(), name) || !strings.Contains(err.Error(), strconv.Quote(value)) {
					t.Errorf("error %q does not name %s=%q", err, name, value)
				}
			}
			if strings.HasPrefix(tc.name, "unsupported-") != errors.Is(err, ErrUnsupported) {
				t.Errorf("errors.Is(%v, ErrUnsupported) is wrong", err)
			}
		})
	}
}

func TestParseOrDefaultsFallsBack(t *testing.T) {
	s, _, err := ParseOrDefaults(Pod{Annotations: map[string]string{
		AnnotationExcludeOutboundPorts:    "5432",
		AnnotationExcludeOutboundIPRanges: "not-a-cidr",
	}})
	if err == nil {
		t.Fatal("no error for a bad CIDR")
	}
	want, _ := json.Marshal(Defaults())
	got, _ := json.Marshal(s)
	if string(got) != string(want) {
		t.Errorf("fallback is not Defaults(): got %s", got)
	}
}

// TestParseOrDefaultsKeepsPodKnobs: the fallback is Istio's default capture
// for this pod, so it keeps what is not an annotation Istio rejects: the
// proxy's uid/gid (else the sidecar's own connections are captured again),
// ISTIO_DUAL_STACK and ISTIO_META_DNS_CAPTURE (env or proxyMetadata).
func TestParseOrDefaultsKeepsPodKnobs(t *testing.T) {
	for _, tc := range []struct {
		name string
		pod  Pod
	}{
		{"bad CIDR, env", Pod{
			Annotations: map[string]string{AnnotationIncludeOutboundIPRanges: "bad"},
			ProxyEnv:    map[string]string{EnvDualStack: "true", EnvDNSCapture: "true"},
			ProxyUID:    ptr(1500), ProxyGID: ptr(1600),
		}},
		{"wildcard outbound port, proxyMetadata", Pod{
			Annotations: map[string]string{
				AnnotationIncludeOutboundPorts: "*",
				AnnotationProxyConfig:          "proxyMetadata:\n  ISTIO_DUAL_STACK: \"true\"\n  ISTIO_META_DNS_CAPTURE: \"true\"\n",
			},
			ProxyUID: ptr(1500), ProxyGID: ptr(1600),
		}},
		{"TPROXY", Pod{
			Annotations: map[string]string{AnnotationInterceptionMode: ModeTPROXY},
			ProxyEnv:    map[string]string{EnvDualStack: "1", EnvDNSCapture: "1"},
			ProxyUID:    ptr(1500), ProxyGID: ptr(1600),
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, _, err := ParseOrDefaults(tc.pod)
			if err == nil {
				t.Fatal("no error")
			}
			want := Defaults()
			want.ProxyUIDs, want.ProxyGIDs = []uint32{1500}, []uint32{1600}
			want.DualStack, want.DNSCapture = true, true
			w, _ := json.Marshal(want)
			got, _ := json.Marshal(s)
			if string(got) != string(w) {
				t.Errorf("fallback\n got %s\nwant %s", got, w)
			}
		})
	}
	// A proxyMetadata that does not parse is the rejected knob itself: the
	// env still counts.
	s, _, err := ParseOrDefaults(Pod{
		Annotations: map[string]string{AnnotationProxyConfig: "proxyMetadata: ["},
		ProxyEnv:    map[string]string{EnvDNSCapture: "true"},
	})
	if err == nil || !s.DNSCapture || !s.OutboundAllCIDRs {
		t.Errorf("bad proxy config: err %v, settings %+v", err, s)
	}
}

func TestDefaultsMatchNoAnnotations(t *testing.T) {
	s, _, err := Parse(Pod{})
	if err != nil {
		t.Fatal(err)
	}
	want, _ := json.Marshal(Defaults())
	got, _ := json.Marshal(s)
	if string(got) != string(want) {
		t.Errorf("Parse(no annotations) = %s, Defaults() = %s", got, want)
	}
}

func TestCaptureIPv6(t *testing.T) {
	v4 := netip.MustParseAddr("10.0.0.5")
	v6 := netip.MustParseAddr("fd00::5")
	ll := netip.MustParseAddr("fe80::1")
	for _, tc := range []struct {
		ips       []netip.Addr
		dualStack bool
		want      bool
	}{
		{[]netip.Addr{v4}, false, false},
		{[]netip.Addr{v6, ll}, false, true},
		{[]netip.Addr{v4, v6}, false, false},
		{[]netip.Addr{v4, v6}, true, true},
		{[]netip.Addr{v4, ll}, true, false},
	} {
		if got := (Settings{DualStack: tc.dualStack}).CaptureIPv6(tc.ips); got != tc.want {
			t.Errorf("CaptureIPv6(%v, dualStack=%v) = %v, want %v", tc.ips, tc.dualStack, got, tc.want)
		}
	}
}

// FuzzParse feeds arbitrary values to every knob. Parse must not panic,
// errors must name an annotation, and accepted Settings must keep the
// invariants the backends rely on.
func FuzzParse(f *testing.F) {
	f.Add("*", "", "*", "", "", "", "", "REDIRECT", "", "true")
	f.Add("10.0.0.0/8,fd00::/8", "10.1.0.0/16", "80,443", "9090", "8000:8100", "25", "eth1", "NONE", "proxyMetadata: {ISTIO_META_DNS_CAPTURE: 'true'}", "0")
	f.Add("1.2.3.4/33", "*", "x", "8000:8100", "*", "80,", "0eth", "TPROXY", "[", "yes")
	f.Fuzz(func(t *testing.T, incCIDR, excCIDR, incIn, excIn, incOut, excOut, ifaces, mode, proxyConfig, dns string) {
		pod := Pod{
			Annotations: map[string]string{
				AnnotationIncludeOutboundIPRanges: incCIDR,
				AnnotationExcludeOutboundIPRanges: excCIDR,
				AnnotationIncludeInboundPorts:     incIn,
				AnnotationExcludeInboundPorts:     excIn,
				AnnotationIncludeOutboundPorts:    incOut,
				AnnotationExcludeOutboundPorts:    excOut,
				AnnotationExcludeInterfaces:       ifaces,
				AnnotationInterceptionMode:        mode,
				AnnotationProxyConfig:             proxyConfig,
			},
			ProxyEnv: map[string]string{EnvDNSCapture: dns},
		}
		s, _, err := Parse(pod)
		if err != nil {
			if !strings.Contains(err.Error(), "annotation ") {
				t.Fatalf("error names no annotation: %v", err)
			}
			return
		}
		if mode == ModeNone {
			if s.CapturesAnything() {
				t.Fatalf("NONE captures: %+v", s)
			}
			return
		}
		for _, p := range []uint16{HBONEPort, 15020, 15021, 15090} {
			if !slices.ContainsFunc(s.ExcludeInboundPorts, func(r PortRange) bool { return r.Contains(p) }) {
				t.Fatalf("inbound port %d not excluded: %+v", p, s.ExcludeInboundPorts)
			}
		}
		for _, list := range [][]PortRange{s.IncludeInboundPorts, s.ExcludeInboundPorts, s.IncludeOutboundPorts, s.ExcludeOutboundPorts} {
			for _, r := range list {
				if r.First > r.Last {
					t.Fatalf("reversed range %+v", r)
				}
			}
		}
		for _, p := range append(slices.Clone(s.IncludeOutboundCIDRs), s.ExcludeOutboundCIDRs...) {
			if !p.IsValid() || p != p.Masked() {
				t.Fatalf("prefix %v not valid and masked", p)
			}
		}
		if len(s.ProxyUIDs) != 1 || len(s.ProxyGIDs) != 1 || s.OutboundPort == 0 || s.InboundPort == 0 {
			t.Fatalf("ports or proxy ids missing: %+v", s)
		}
	})
}

// TPROXY is refused with an error that names the annotation, the value
// and what to set instead.
func TestParseTPROXYSaysWhatToUse(t *testing.T) {
	_, _, err := Parse(Pod{Annotations: map[string]string{AnnotationInterceptionMode: ModeTPROXY}})
	if !errors.Is(err, ErrUnsupported) {
		t.Fatalf("error %v, want ErrUnsupported", err)
	}
	for _, s := range []string{AnnotationInterceptionMode, `"TPROXY"`, AnnotationInterceptionMode + ": REDIRECT"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not say %s", err, s)
		}
	}
}

// INVALID_DROP is read like ISTIO_DUAL_STACK: env first, then proxyMetadata.
func TestParseInvalidDrop(t *testing.T) {
	for _, tc := range []struct {
		pod  Pod
		want bool
	}{
		{Pod{}, false},
		{Pod{ProxyEnv: map[string]string{EnvInvalidDrop: "true"}}, true},
		{Pod{ProxyEnv: map[string]string{EnvInvalidDrop: "false"}, Annotations: map[string]string{
			AnnotationProxyConfig: "proxyMetadata:\n  INVALID_DROP: \"true\"\n"}}, false},
		{Pod{Annotations: map[string]string{AnnotationProxyConfig: "proxyMetadata:\n  INVALID_DROP: \"true\"\n"}}, true},
		{Pod{ProxyEnv: map[string]string{EnvInvalidDrop: "on"}}, false},
	} {
		s, _, err := Parse(tc.pod)
		if err != nil {
			t.Fatal(err)
		}
		if s.DropInvalid != tc.want {
			t.Errorf("%+v: DropInvalid %v, want %v", tc.pod, s.DropInvalid, tc.want)
		}
	}
}
