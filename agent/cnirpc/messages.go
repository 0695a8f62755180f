// Package cnirpc is the wire protocol between the sidelane CNI plugin and the
// node agent: one JSON request and one JSON reply per Unix-socket connection.
//
// The protocol is versioned so that a plugin binary left on the host by an
// older release keeps talking to a newer agent (and the other way round)
// during a rolling upgrade: the agent rejects versions it does not know with
// an error that names both versions.
package cnirpc

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
)

// Version is the protocol version this build speaks.
const Version = 1

// MaxMessageSize bounds what either side reads, so a broken peer cannot make
// the agent allocate without limit.
const MaxMessageSize = 1 << 20

// Op names a request.
type Op string

// The operations, one per CNI verb that needs the agent.
const (
	OpAdd    Op = "add"
	OpDel    Op = "del"
	OpCheck  Op = "check"
	OpGC     Op = "gc"
	OpStatus Op = "status"
	// OpExplain is not a CNI verb: `sidelane explain` asks the agent why a
	// pod is in its mode. It shares the socket (root only) on purpose, so
	// pod details never leave the node.
	OpExplain Op = "explain"
)

// PodRef identifies the Kubernetes pod behind a sandbox, as the runtime
// passed it in CNI_ARGS. All fields are empty for non-Kubernetes sandboxes.
type PodRef struct {
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name,omitempty"`
	UID       string `json:"uid,omitempty"`
}

// Attachment is the key CNI uses for one network attachment.
type Attachment struct {
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifname"`
}

// Request is what the plugin sends.
type Request struct {
	Version int    `json:"version"`
	Op      Op     `json:"op"`
	Network string `json:"network,omitempty"` // CNI network name

	Attachment
	Netns string `json:"netns,omitempty"`
	Pod   PodRef `json:"pod,omitzero"`
	// IPs are the sandbox's addresses from the primary plugin's result, in
	// the primary's order.
	IPs []netip.Prefix `json:"ips,omitempty"`

	// ValidAttachments is cni.dev/valid-attachments for OpGC: every other
	// attachment of Network is stale.
	ValidAttachments []Attachment `json:"validAttachments,omitempty"`
}

// Reply is what the agent answers.
type Reply struct {
	Version int    `json:"version"`
	OK      bool   `json:"ok"`
	Error   string `json:"error,omitempty"`
	// Retry tells the plugin the failure is transient (agent starting,
	// pod not yet in the agent's cache), so CNI code 11 fits.
	Retry bool `json:"retry,omitempty"`

	// Status: Ready is false while the agent cannot serve ADD.
	Ready  bool   `json:"ready,omitempty"`
	Reason string `json:"reason,omitempty"`

	// Mode is the datapath mode the agent chose for the pod on add/check.
	Mode string `json:"mode,omitempty"`
	// Removed counts attachments removed by OpGC.
	Removed int `json:"removed,omitempty"`

	// Explain answers OpExplain.
	Explain *Explanation `json:"explain,omitempty"`
}

// ErrVersion is returned by Decode for a request of another protocol version.
var ErrVersion = errors.New("unsupported protocol version")

// DecodeRequest reads and validates one request. It rejects unknown fields so
// that a mismatched peer fails loudly instead of being half understood.
func DecodeRequest(r io.Reader) (*Request, error) {
	var req Request
	if err := decodeStrict(r, &req); err != nil {
		return nil, fmt.Errorf("decode request: %w", err)
	}
	if req.Version != Version {
		return nil, fmt.Errorf("%w %d (agent speaks %d)", ErrVersion, req.Version, Version)
	}
	if err := req.Validate(); err != nil {
		return nil, err
	}
	return &req, nil
}

// Validate checks the fields each operation needs.
func (r *Request) Validate() error {
	switch r.Op {
	case OpAdd, OpDel, OpCheck:
		if r.ContainerID == "" {
			return fmt.Errorf("op %s: containerID is required", r.Op)
		}
		if r.IfName == "" {
			return fmt.Errorf("op %s: ifname is required", r.Op)
		}
		if r.Network == "" {
			return fmt.Errorf("op %s: network is required", r.Op)
		}
		if r.Op == OpAdd && r.Netns == "" {
			return fmt.Errorf("op %s: netns is required", r.Op)
		}
		for i, p := range r.IPs {
			if !p.IsValid() {
				return fmt.Errorf("op %s: ips[%d] is not a valid prefix", r.Op, i)
			}
		}
	case OpGC:
		if r.Network == "" {
			return fmt.Errorf("op %s: network is required", r.Op)
		}
		for i, a := range r.ValidAttachments {
			if a.ContainerID == "" {
				return fmt.Errorf("op %s: validAttachments[%d].containerID is required", r.Op, i)
			}
		}
	case OpStatus:
	case OpExplain:
		if r.Pod.Namespace == "" || r.Pod.Name == "" {
			return fmt.Errorf("op %s: pod.namespace and pod.name are required", r.Op)
		}
	case "":
		return errors.New("op is required")
	default:
		return fmt.Errorf("unknown op %q", r.Op)
	}
	return nil
}

// DecodeReply reads one reply.
func DecodeReply(r io.Reader) (*Reply, error) {
	var rep Reply
	if err := decodeStrict(r, &rep); err != nil {
		return nil, fmt.Errorf("decode reply: %w", err)
	}
	if rep.Version != Version {
		return nil, fmt.Errorf("%w %d in reply (plugin speaks %d)", ErrVersion, rep.Version, Version)
	}
	return &rep, nil
}

func decodeStrict(r io.Reader, v any) error {
	data, err := io.ReadAll(io.LimitReader(r, MaxMessageSize+1))
	if err != nil {
		return err
	}
	if len(data) > MaxMessageSize {
		return fmt.Errorf("message larger than %d bytes", MaxMessageSize)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("trailing data after message")
	}
	return nil
}
