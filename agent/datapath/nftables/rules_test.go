package nftables

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sidelane/sidelane/istio/capture"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

func ptr(v int64) *int64 { return &v }

// ruleCases are pods whose tables are golden-tested here and compared
// with Istio's nftables backend in the privileged test (a dual-stack pod:
// IPv6 captured with ISTIO_DUAL_STACK only).
var ruleCases = []struct {
	name string
	pod  capture.Pod
	// istioRefuses: Istio refuses this pod: istio-cni's NewRedirect takes
	// single ports only in includeOutboundPorts (and past it Istio's
	// nftables backend would hand nft a "first:last" range it refuses);
	// sidelane accepts the range, as istio-init's iptables does.
	istioRefuses bool
}{
	{name: "defaults"},
	{name: "all-knobs", istioRefuses: true, pod: capture.Pod{
		Annotations: map[string]string{
			capture.AnnotationIncludeOutboundIPRanges: "10.96.0.0/12,fd00:10:96::/112",
			capture.AnnotationExcludeOutboundIPRanges: "10.96.0.10/32,fd00:10:96::a/128",
			capture.AnnotationIncludeInboundPorts:     "8080,9090",
			capture.AnnotationExcludeInboundPorts:     "9091",
			capture.AnnotationIncludeOutboundPorts:    "3306,8000:8100",
			capture.AnnotationExcludeOutboundPorts:    "5432,6379",
			capture.AnnotationExcludeInterfaces:       "net1,eth2",
		},
		ProxyEnv: map[string]string{capture.EnvDualStack: "true"},
		ProxyUID: ptr(2000),
		ProxyGID: ptr(3000),
	}},
	{name: "all-knobs-no-range", pod: capture.Pod{
		Annotations: map[string]string{
			capture.AnnotationIncludeOutboundIPRanges: "10.96.0.0/12,fd00:10:96::/112",
			capture.AnnotationExcludeOutboundIPRanges: "10.96.0.10/32,fd00:10:96::a/128",
			capture.AnnotationIncludeInboundPorts:     "8080,9090",
			capture.AnnotationIncludeOutboundPorts:    "3306",
			capture.AnnotationExcludeOutboundPorts:    "5432,6379",
			capture.AnnotationExcludeInterfaces:       "net1,eth2",
		},
		ProxyEnv: map[string]string{capture.EnvDualStack: "true"},
		ProxyUID: ptr(2000),
		ProxyGID: ptr(3000),
	}},
	{name: "dns", pod: capture.Pod{ProxyEnv: map[string]string{capture.EnvDNSCapture: "true", capture.EnvDualStack: "true"}}},
	{name: "dns-ipv4-only", pod: capture.Pod{ProxyEnv: map[string]string{capture.EnvDNSCapture: "true"}}},
	{name: "invalid-drop", pod: capture.Pod{ProxyEnv: map[string]string{capture.EnvInvalidDrop: "true", capture.EnvDualStack: "true"}}},
	{name: "include-loopback", pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationIncludeOutboundIPRanges: "127.0.0.1/32,10.0.0.0/8",
	}}},
	{name: "exclude-inbound", pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationExcludeInboundPorts:  "8000,15021",
		capture.AnnotationExcludeOutboundPorts: "",
	}}},
	{name: "no-inbound", pod: capture.Pod{Annotations: map[string]string{capture.AnnotationIncludeInboundPorts: ""}}},
	{name: "interception-none", pod: capture.Pod{Annotations: map[string]string{capture.AnnotationInterceptionMode: "NONE"}}},
	{name: "nothing-captured", pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationIncludeOutboundIPRanges: "",
		capture.AnnotationIncludeOutboundPorts:    "",
		capture.AnnotationIncludeInboundPorts:     "",
	}}},
	{name: "slash-zero", pod: capture.Pod{
		Annotations: map[string]string{
			capture.AnnotationIncludeOutboundIPRanges: "0.0.0.0/0,::/0",
			capture.AnnotationExcludeOutboundIPRanges: "0.0.0.0/0,::/0",
		},
		ProxyEnv: map[string]string{capture.EnvDualStack: "true"},
	}},
	{name: "include-and-exclude-inbound", pod: capture.Pod{Annotations: map[string]string{
		capture.AnnotationIncludeInboundPorts: "80,15008,15020",
		capture.AnnotationExcludeInboundPorts: "80,9090",
	}}},
}

func settings(t *testing.T, pod capture.Pod) capture.Settings {
	t.Helper()
	s, _, err := capture.Parse(pod)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestTablesGolden checks the tables (testdata/tables); -update rewrites.
func TestTablesGolden(t *testing.T) {
	for _, tc := range ruleCases {
		t.Run(tc.name, func(t *testing.T) {
			s := settings(t, tc.pod)
			golden(t, filepath.Join("testdata", "tables", tc.name+".golden"), Render(Tables(s, s.DualStack)))
		})
	}
}

func golden(t *testing.T, path, got string) {
	t.Helper()
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs (go test -update to accept):\n got:\n%s\nwant:\n%s", path, got, want)
	}
}

// Without IPv6 capture every base chain returns IPv6 first, and no rule
// names an IPv6 address.
func TestNoIPv6WithoutDualStack(t *testing.T) {
	s := settings(t, capture.Pod{
		Annotations: map[string]string{capture.AnnotationExcludeOutboundIPRanges: "fd00::/8,10.0.0.0/8"},
		ProxyEnv:    map[string]string{capture.EnvDNSCapture: "true", capture.EnvInvalidDrop: "true"},
	})
	for _, tb := range Tables(s, false) {
		for _, c := range tb.Chains {
			if c.Base != nil && c.Rules[0] != ipv6Guard {
				t.Errorf("%s/%s starts with %q, want the IPv6 return", tb.Name, c.Name, c.Rules[0])
			}
			for _, r := range c.Rules {
				if strings.Contains(r, "ip6 ") {
					t.Errorf("%s/%s: IPv6 rule %q", tb.Name, c.Name, r)
				}
			}
		}
	}
}

func TestNoneInstallsNothing(t *testing.T) {
	s := settings(t, capture.Pod{Annotations: map[string]string{capture.AnnotationInterceptionMode: "NONE"}})
	if got := Tables(s, true); got != nil {
		t.Errorf("interception NONE: %v", got)
	}
}

func TestInvalidDropOnlyWhenAsked(t *testing.T) {
	for _, on := range []bool{false, true} {
		s := capture.Defaults()
		s.DropInvalid = on
		got := strings.Contains(Render(Tables(s, true)), "ct state invalid counter jump istio-drop")
		if got != on {
			t.Errorf("DropInvalid=%v: drop rule present=%v", on, got)
		}
	}
}
