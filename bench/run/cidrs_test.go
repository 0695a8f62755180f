package run

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/sidelane/sidelane/istio/capture"
)

func TestExcludedCIDRs(t *testing.T) {
	for _, n := range []int{0, 1, 10, 1000, 10000} {
		v := ExcludedCIDRs(n)
		var parts []string
		if v != "" {
			parts = strings.Split(v, ",")
		}
		if len(parts) != n {
			t.Fatalf("n=%d: got %d CIDRs", n, len(parts))
		}
		seen := map[netip.Prefix]bool{}
		for _, p := range parts {
			pfx, err := netip.ParsePrefix(p)
			if err != nil {
				t.Fatalf("n=%d: %q: %v", n, p, err)
			}
			if seen[pfx] {
				t.Fatalf("n=%d: %s twice", n, pfx)
			}
			seen[pfx] = true
			if netip.MustParsePrefix("10.0.0.0/8").Overlaps(pfx) || pfx.Addr().IsLoopback() {
				t.Fatalf("n=%d: %s overlaps the pods' or loopback addresses", n, pfx)
			}
		}
		// One command-line argument is at most 128 KiB (MAX_ARG_STRLEN).
		if len(v) >= 128*1024 {
			t.Fatalf("n=%d: %d bytes, too long for one argument", n, len(v))
		}
		// sidelane's parser must take it as Istio would.
		s, _, err := capture.Parse(capture.Pod{Annotations: map[string]string{capture.AnnotationExcludeOutboundIPRanges: v}})
		if err != nil {
			t.Fatalf("n=%d: parse: %v", n, err)
		}
		if len(s.ExcludeOutboundCIDRs) != n {
			t.Fatalf("n=%d: parsed %d excluded CIDRs", n, len(s.ExcludeOutboundCIDRs))
		}
	}
}
