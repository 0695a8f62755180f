package controller

import (
	"fmt"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sidelane/sidelane/policy/api/v1alpha1"
)

func TestSidecarEnforcement(t *testing.T) {
	cond := func(status metav1.ConditionStatus, gen int64) []metav1.Condition {
		return []metav1.Condition{{Type: ConditionEnforced, Status: status, Reason: "R", Message: "m", ObservedGeneration: gen}}
	}
	tests := []struct {
		name  string
		gen   int64
		conds []metav1.Condition
		want  bool
		why   string
	}{
		{"never processed", 1, nil, false, "no sidelane controller has processed this policy"},
		{"behind", 3, cond(metav1.ConditionTrue, 2), false, "generation 3 (last processed: 2)"},
		{"not enforced", 2, cond(metav1.ConditionFalse, 2), false, "R: m"},
		{"enforced", 2, cond(metav1.ConditionTrue, 2), true, "m"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := &v1alpha1.L7Policy{ObjectMeta: metav1.ObjectMeta{Generation: tc.gen}, Status: v1alpha1.L7PolicyStatus{Conditions: tc.conds}}
			ok, why := SidecarEnforcement(p)
			if ok != tc.want || !strings.Contains(why, tc.why) {
				t.Errorf("SidecarEnforcement = %v, %q; want %v, containing %q", ok, why, tc.want, tc.why)
			}
		})
	}
}

// TestControllerAbsent: with no controller, nothing writes status, and the
// status says nothing applies the policy to sidecars; a controller that
// ran once and went away leaves a status that is visibly behind.
func TestControllerAbsent(t *testing.T) {
	e := newEnv(t)
	e.pod("api-0", "api")
	e.apply("api", "api", "    - port: 8080\n")
	p := e.policy("api")
	if ok, why := SidecarEnforcement(p); ok || !strings.Contains(why, "no sidelane controller") {
		t.Errorf("no controller ever ran: %v, %q", ok, why)
	}
	if p.Status.ObservedGeneration != 0 || len(p.Status.Conditions) != 0 {
		t.Errorf("something wrote status with no controller running: %+v", p.Status)
	}

	ctrl := e.startController("replica-a")
	e.eventually("enforced", func() string {
		if ok, why := SidecarEnforcement(e.policy("api")); !ok {
			return why
		}
		return ""
	})
	ctrl.stop()
	e.apply("api", "api", "    - port: 8080\n    - port: 9090\n")
	p = e.policy("api")
	if p.Generation != 2 {
		t.Fatalf("generation %d after a spec change, want 2", p.Generation)
	}
	if ok, why := SidecarEnforcement(p); ok || !strings.Contains(why, "generation 2 (last processed: 1)") {
		t.Errorf("controller gone: %v, %q", ok, why)
	}
}

// TestWaitsForAPIs: started before the CRDs exist, the controller reports
// why it is not ready, then starts by itself once they are served.
func TestWaitsForAPIs(t *testing.T) {
	e := newEnvWithoutCRDs(t)
	p := e.startControllerOpt("replica-a", false, "--log-level", "debug")
	e.eventually("not ready, saying why", func() string {
		code, body := p.fetch("/readyz")
		if code != 503 || !strings.Contains(body, "waiting for the L7Policy and EnvoyFilter APIs") {
			return fmt.Sprintf("/readyz %d %q", code, body)
		}
		return ""
	})
	e.installCRDs()
	e.pod("api-0", "api")
	e.apply("api", "api", "    - port: 8080\n")
	e.eventually("ready and writing once the APIs are served", func() string {
		if code := p.get("/readyz"); code != 200 {
			return fmt.Sprintf("/readyz %d", code)
		}
		if ok, why := SidecarEnforcement(e.policy("api")); !ok {
			return why
		}
		return ""
	})
}
