package main

import (
	"context"
	"strings"
	"testing"

	"github.com/sidelane/sidelane/agent"
	"github.com/sidelane/sidelane/agent/cnirpc"
)

func TestStandaloneClassifier(t *testing.T) {
	for _, tt := range []struct {
		mode, want string
		capture    bool
	}{
		{agent.ModeNone, agent.ModeNone, false},
		{agent.ModeSidecar, agent.ModeSidecar, true},
	} {
		c, err := standaloneClassifier(tt.mode)
		if err != nil {
			t.Fatal(err)
		}
		d, err := c.Classify(context.Background(), cnirpc.PodRef{})
		if err != nil || d.Mode != tt.want || (d.Capture != nil) != tt.capture {
			t.Errorf("--standalone-mode %s: %+v, %v; want mode %s, capture settings %v", tt.mode, d, err, tt.want, tt.capture)
		}
	}
	for _, bad := range []string{"", "node", "Sidecar"} {
		if _, err := standaloneClassifier(bad); err == nil || !strings.Contains(err.Error(), "--standalone-mode") {
			t.Errorf("--standalone-mode %q: %v, want an error naming the flag", bad, err)
		}
	}
}
