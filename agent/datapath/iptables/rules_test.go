package iptables

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

// ruleCases are pods whose rule sets are golden-tested here and compared
// with istio-cni's own in the privileged test (but where istio-cni
// refuses the pod: istioCNIRefuses).
// istioCNIRefuses are the ruleCases istio-cni's NewRedirect refuses, and
// why sidelane accepts them.
var istioCNIRefuses = map[string]string{
	"all-knobs":         "istio-cni takes single ports only in includeOutboundPorts; sidelane also accepts first:last ranges, as istio-init's iptables does",
	"interception-none": "istio-cni accepts REDIRECT and TPROXY only; sidelane installs nothing for NONE, as the injector without istio-cni",
}

var ruleCases = []struct {
	name string
	pod  capture.Pod
}{
	{"defaults", capture.Pod{}},
	{"all-knobs", capture.Pod{
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
	// all-knobs without the port range, which istio-cni refuses.
	{"all-knobs-no-range", capture.Pod{
		Annotations: map[string]string{
			capture.AnnotationIncludeOutboundIPRanges: "10.96.0.0/12,fd00:10:96::/112",
			capture.AnnotationExcludeOutboundIPRanges: "10.96.0.10/32,fd00:10:96::a/128",
			capture.AnnotationIncludeInboundPorts:     "8080,9090",
			capture.AnnotationExcludeInboundPorts:     "9091",
			capture.AnnotationIncludeOutboundPorts:    "3306",
			capture.AnnotationExcludeOutboundPorts:    "5432,6379",
			capture.AnnotationExcludeInterfaces:       "net1,eth2",
		},
		ProxyEnv: map[string]string{capture.EnvDualStack: "true"},
		ProxyUID: ptr(2000),
		ProxyGID: ptr(3000),
	}},
	{"dns", capture.Pod{ProxyEnv: map[string]string{capture.EnvDNSCapture: "true", capture.EnvDualStack: "true"}}},
	{"include-loopback", capture.Pod{Annotations: map[string]string{
		capture.AnnotationIncludeOutboundIPRanges: "127.0.0.1/32,10.0.0.0/8",
	}}},
	{"exclude-inbound", capture.Pod{Annotations: map[string]string{
		capture.AnnotationExcludeInboundPorts:  "8000,15021",
		capture.AnnotationExcludeOutboundPorts: "",
	}}},
	{"no-inbound", capture.Pod{Annotations: map[string]string{capture.AnnotationIncludeInboundPorts: ""}}},
	{"interception-none", capture.Pod{Annotations: map[string]string{capture.AnnotationInterceptionMode: "NONE"}}},
	// Nothing included: istio-iptables still installs its chains, so the
	// sidecar calling its own pod address still goes to 15006.
	{"nothing-captured", capture.Pod{Annotations: map[string]string{
		capture.AnnotationIncludeOutboundIPRanges: "",
		capture.AnnotationIncludeOutboundPorts:    "",
		capture.AnnotationIncludeInboundPorts:     "",
	}}},
	// iptables-save prints no "-d 0.0.0.0/0" (nor "::/0").
	{"slash-zero", capture.Pod{
		Annotations: map[string]string{
			capture.AnnotationIncludeOutboundIPRanges: "0.0.0.0/0,::/0",
			capture.AnnotationExcludeOutboundIPRanges: "0.0.0.0/0,::/0",
		},
		ProxyEnv: map[string]string{capture.EnvDualStack: "true"},
	}},
	// INVALID_DROP: the mangle table drops conntrack INVALID packets.
	{"invalid-drop", capture.Pod{ProxyEnv: map[string]string{capture.EnvInvalidDrop: "true", capture.EnvDualStack: "true"}}},
	// Only 15008 is always returned; the excludes apply only with "*".
	{"include-and-exclude-inbound", capture.Pod{Annotations: map[string]string{
		capture.AnnotationIncludeInboundPorts: "80,15008,15020",
		capture.AnnotationExcludeInboundPorts: "80,9090",
	}}},
}

func TestRulesGolden(t *testing.T) {
	for _, tc := range ruleCases {
		t.Run(tc.name, func(t *testing.T) {
			s, _, err := capture.Parse(tc.pod)
			if err != nil {
				t.Fatal(err)
			}
			got := "# IPv4\n" + Render(Rules(s, IPv4)) + "# IPv6\n" + Render(Rules(s, IPv6))
			path := filepath.Join("testdata", "rules", tc.name+".golden")
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
				t.Errorf("rules differ from %s (go test -update to accept):\n%s", path, got)
			}
		})
	}
}

// TestHooksLast checks the order Enroll relies on: every rule in a
// built-in chain comes after every rule in an Istio chain, so the Istio
// chains are complete before anything jumps to them.
func TestHooksLast(t *testing.T) {
	for _, tc := range ruleCases {
		s, _, _ := capture.Parse(tc.pod)
		for _, f := range []Family{IPv4, IPv6} {
			seenHook := false
			for _, r := range Rules(s, f) {
				if builtin(r.Chain) {
					seenHook = true
				} else if seenHook {
					t.Errorf("%s: %s comes after a built-in chain's rule", tc.name, r)
				}
			}
		}
	}
}

func TestNoneInstallsNothing(t *testing.T) {
	s, _, err := capture.Parse(capture.Pod{Annotations: map[string]string{capture.AnnotationInterceptionMode: "NONE"}})
	if err != nil {
		t.Fatal(err)
	}
	if r := Rules(s, IPv4); len(r) != 0 {
		t.Errorf("NONE gives rules: %v", r)
	}
}

func TestRuleSpecsHaveNoSpaces(t *testing.T) {
	// Verify and remove split `iptables -S` lines on spaces; a token with
	// a space would break that.
	for _, tc := range ruleCases {
		s, _, _ := capture.Parse(tc.pod)
		for _, r := range append(Rules(s, IPv4), Rules(s, IPv6)...) {
			for _, tok := range r.Spec {
				if tok == "" || strings.ContainsAny(tok, " \t") {
					t.Errorf("%s: bad token %q in %s", tc.name, tok, r)
				}
			}
		}
	}
}

// FuzzRules builds rules from arbitrary knobs (through the parser, as the
// agent does) and checks what Enroll and Verify rely on: hooks last, no
// token Verify's space split would break, every jump target created.
func FuzzRules(f *testing.F) {
	f.Add("*", "", "*", "", "", "", "", "true")
	f.Add("10.0.0.0/8,fd00::/8,127.0.0.1/32", "10.1.0.0/16,fd00:1::/64", "80,443", "9090", "8000:8100", "25", "eth1,net2", "false")
	f.Fuzz(func(t *testing.T, incCIDR, excCIDR, incIn, excIn, incOut, excOut, ifaces, dns string) {
		s, _, err := capture.Parse(capture.Pod{
			Annotations: map[string]string{
				capture.AnnotationIncludeOutboundIPRanges: incCIDR,
				capture.AnnotationExcludeOutboundIPRanges: excCIDR,
				capture.AnnotationIncludeInboundPorts:     incIn,
				capture.AnnotationExcludeInboundPorts:     excIn,
				capture.AnnotationIncludeOutboundPorts:    incOut,
				capture.AnnotationExcludeOutboundPorts:    excOut,
				capture.AnnotationExcludeInterfaces:       ifaces,
			},
			ProxyEnv: map[string]string{capture.EnvDNSCapture: dns},
		})
		if err != nil {
			return
		}
		for _, fam := range []Family{IPv4, IPv6} {
			rules := Rules(s, fam)
			chains := Chains(rules)
			hook := false
			for _, r := range rules {
				if builtin(r.Chain) {
					hook = true
				} else if hook {
					t.Fatalf("%s after a hook", r)
				}
				for _, tok := range r.Spec {
					if tok == "" || strings.ContainsAny(tok, " \t\n") {
						t.Fatalf("bad token %q in %s", tok, r)
					}
				}
				if n := len(r.Spec); n >= 2 && r.Spec[n-2] == "-j" && strings.HasPrefix(r.Spec[n-1], "ISTIO_") {
					found := false
					for _, c := range chains[r.Table] {
						found = found || c == r.Spec[n-1]
					}
					if !found {
						t.Fatalf("jump to %s in %s but the chain is not created", r.Spec[n-1], r.Table)
					}
				}
			}
			if Render(rules) != Render(Rules(s, fam)) {
				t.Fatal("rules are not deterministic")
			}
		}
	})
}
