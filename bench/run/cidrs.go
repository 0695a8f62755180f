package run

import (
	"fmt"
	"strings"
)

// maxCIDRs is how many distinct /24s ExcludedCIDRs can make.
const maxCIDRs = 9 * 10 * 256

// ExcludedCIDRs is the value of excludeOutboundIPRanges for n distinct
// /24s in 1.0.0.0-9.9.255.0: none of them holds a benchmark pod (those are
// in 10.0.0.0/8), and the shortest spellings come first so 10,000 of them
// stay under Linux's 128 KiB limit for one command-line argument (Istio
// passes the list to istio-iptables as one).
func ExcludedCIDRs(n int) string {
	if n > maxCIDRs {
		n = maxCIDRs
	}
	var b strings.Builder
	count := 0
	for _, lo := range [][2]int{{0, 10}, {10, 100}, {100, 256}} {
		for a := 1; a <= 9; a++ {
			for m := range 10 {
				for c := lo[0]; c < lo[1]; c++ {
					if count == n {
						return b.String()
					}
					if count > 0 {
						b.WriteByte(',')
					}
					fmt.Fprintf(&b, "%d.%d.%d.0/24", a, m, c)
					count++
				}
			}
		}
	}
	return b.String()
}
