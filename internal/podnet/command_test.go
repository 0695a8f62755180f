package podnet

import (
	"context"
	"slices"
	"testing"
)

func TestCommandPinned(t *testing.T) {
	for _, tc := range []struct {
		cpus string
		want []string
	}{
		{"", []string{"ip", "netns", "exec", "p1", "haproxy", "-db"}},
		{"1", []string{"ip", "netns", "exec", "p1", "taskset", "-c", "1", "haproxy", "-db"}},
	} {
		s := &NS{Name: "p1", CPUs: tc.cpus}
		if got := s.Command(context.Background(), "haproxy", "-db").Args; !slices.Equal(got, tc.want) {
			t.Errorf("CPUs %q: %q, want %q", tc.cpus, got, tc.want)
		}
	}
}
