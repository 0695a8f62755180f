package cnirpc

import (
	"net/netip"
	"time"

	"github.com/sidelane/sidelane/istio/capture"
)

// Explanation is the agent's account of one pod, for `sidelane explain`.
type Explanation struct {
	Pod      PodRef `json:"pod"`
	Datapath string `json:"datapath"`
	// Attachments are the pod's CNI attachments the agent manages, each
	// with the mode, reason and capture settings in force.
	Attachments []ExplainedAttachment `json:"attachments"`
	// Current is what the classifier decides now; it differs from an
	// attachment's mode only while a live move is pending or failed.
	Current *ExplainedDecision `json:"current,omitempty"`
	// CurrentError says why the classifier gave no decision.
	CurrentError string `json:"currentError,omitempty"`
	// L7 is the L7 policy that selects the pod, when the agent compiles
	// policies (its node proxy feed runs); nil when it does not know.
	L7 *ExplainedL7 `json:"l7,omitempty"`
}

// ExplainedL7 is the L7 policy in force for a pod.
type ExplainedL7 struct {
	// Policies are the selecting L7Policies' names (the pod's namespace);
	// empty: none, the pod's ports are not protected.
	Policies []string `json:"policies"`
	// Ports are the protected ports.
	Ports []int32 `json:"ports,omitempty"`
}

// ExplainedAttachment is one attachment's state.
type ExplainedAttachment struct {
	Network     string            `json:"network"`
	ContainerID string            `json:"containerID"`
	IfName      string            `json:"ifname"`
	Netns       string            `json:"netns"`
	IPs         []netip.Prefix    `json:"ips,omitempty"`
	Mode        string            `json:"mode"`
	Reason      string            `json:"reason"`
	Capture     *capture.Settings `json:"capture,omitempty"`
	Added       time.Time         `json:"added"`
	// Counters are the datapath's per-pod counters (e.g. captured
	// connections), when the datapath keeps any.
	Counters map[string]uint64 `json:"counters,omitempty"`
}

// ExplainedDecision is a classifier verdict.
type ExplainedDecision struct {
	Mode    string            `json:"mode"`
	Reason  string            `json:"reason"`
	Capture *capture.Settings `json:"capture,omitempty"`
}
