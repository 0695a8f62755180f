package run

import (
	"slices"
	"strings"
)

// ParseOnly splits the -only flag ("a,b") into scenario names.
func ParseOnly(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// selected reports whether scenario runs under the -only list (all do
// when it is empty).
func selected(only []string, scenario string) bool {
	return len(only) == 0 || slices.Contains(only, scenario)
}
