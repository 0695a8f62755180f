package controller

import (
	"fmt"

	"k8s.io/apimachinery/pkg/api/meta"

	"github.com/sidelane/sidelane/policy/api/v1alpha1"
)

// SidecarEnforcement reads from a policy's status alone whether a
// controller applied the policy's current generation to the sidecars. Only
// the controller writes status, so a controller that is absent (never
// installed, or scaled to zero, or every replica down) leaves no trace but
// silence: no Enforced condition, or one whose observedGeneration is behind
// metadata.generation. This function turns that silence into words; it
// cannot tell "no controller" from "a controller that has not caught up
// yet", so it names both. Node agents keep enforcing the policy for per-node
// pods through their own xDS either way; that is not reported in status.
func SidecarEnforcement(p *v1alpha1.L7Policy) (enforced bool, why string) {
	c := meta.FindStatusCondition(p.Status.Conditions, ConditionEnforced)
	switch {
	case c == nil:
		return false, "no sidelane controller has processed this policy: nothing applies it to sidecars (is `sidelane controller` running?)"
	case c.ObservedGeneration < p.Generation:
		return false, fmt.Sprintf("no sidelane controller has processed generation %d (last processed: %d): sidecars keep what generation %d compiled to, if anything (is `sidelane controller` running?)",
			p.Generation, c.ObservedGeneration, c.ObservedGeneration)
	case c.Status != "True":
		return false, c.Reason + ": " + c.Message
	}
	return true, c.Message
}
