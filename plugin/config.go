package plugin

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
)

// FailPolicy says what ADD does when the agent cannot be reached or is not
// ready.
type FailPolicy string

const (
	// FailClosed fails ADD, so no pod runs uncaptured (the default).
	FailClosed FailPolicy = "closed"
	// FailOpen passes the primary's result through and logs a warning: the
	// pod runs, uncaptured, until the agent reconciles it.
	FailOpen FailPolicy = "open"
)

// StatusPolicy says what STATUS reports.
type StatusPolicy string

const (
	// StatusIgnore always reports available: an agent outage never turns
	// the node NetworkNotReady (the default; see README "STATUS").
	StatusIgnore StatusPolicy = "ignore"
	// StatusAgent reports the agent's availability (codes 50/51); the
	// runtime then marks the node NetworkNotReady while the agent is down.
	StatusAgent StatusPolicy = "agent"
)

// Defaults for the plugin's config fields.
const (
	DefaultSocket  = "/var/run/sidelane/cni.sock"
	DefaultTimeout = 5 * time.Second
	maxTimeout     = 60 * time.Second
)

// Config is sidelane's entry in the CNI network config list. Unknown fields
// are ignored, as CNI asks of plugins.
type Config struct {
	types.PluginConf

	// AgentSocket is the node agent's Unix socket.
	AgentSocket string `json:"agentSocket,omitempty"`
	// AgentTimeout bounds each call to the agent (Go duration, e.g. "5s").
	AgentTimeout string `json:"agentTimeout,omitempty"`
	// FailPolicy: "closed" (default) or "open".
	FailPolicy FailPolicy `json:"failPolicy,omitempty"`
	// StatusPolicy: "ignore" (default) or "agent".
	StatusPolicy StatusPolicy `json:"statusPolicy,omitempty"`
	// LogLevel: debug, info, warn (default), error.
	LogLevel string `json:"logLevel,omitempty"`
	// LogFile, when set, receives the plugin's logs instead of stderr.
	LogFile string `json:"logFile,omitempty"`

	timeout  time.Duration
	logLevel slog.Level
}

// Timeout is the parsed AgentTimeout.
func (c *Config) Timeout() time.Duration { return c.timeout }

// Level is the parsed LogLevel.
func (c *Config) Level() slog.Level { return c.logLevel }

// ParseConfig decodes and validates the plugin's config, filling in
// defaults. Every error names the offending field. It parses prevResult when
// present but does not require it (DEL, GC and STATUS have none).
func ParseConfig(data []byte) (*Config, error) {
	c := &Config{}
	if err := json.Unmarshal(data, c); err != nil {
		return nil, fmt.Errorf("parse network config: %w", err)
	}
	if c.Name == "" {
		return nil, errors.New("network config: name is required")
	}
	if c.CNIVersion == "" {
		return nil, errors.New("network config: cniVersion is required")
	}
	if c.AgentSocket == "" {
		c.AgentSocket = DefaultSocket
	}
	if !strings.HasPrefix(c.AgentSocket, "/") {
		return nil, fmt.Errorf("invalid agentSocket %q: must be an absolute path", c.AgentSocket)
	}
	c.timeout = DefaultTimeout
	if c.AgentTimeout != "" {
		d, err := time.ParseDuration(c.AgentTimeout)
		if err != nil || d <= 0 || d > maxTimeout {
			return nil, fmt.Errorf("invalid agentTimeout %q: want a duration between 0 and %s, e.g. \"5s\"", c.AgentTimeout, maxTimeout)
		}
		c.timeout = d
	}
	switch c.FailPolicy {
	case "":
		c.FailPolicy = FailClosed
	case FailClosed, FailOpen:
	default:
		return nil, fmt.Errorf("invalid failPolicy %q: want %q or %q", c.FailPolicy, FailClosed, FailOpen)
	}
	switch c.StatusPolicy {
	case "":
		c.StatusPolicy = StatusIgnore
	case StatusIgnore, StatusAgent:
	default:
		return nil, fmt.Errorf("invalid statusPolicy %q: want %q or %q", c.StatusPolicy, StatusIgnore, StatusAgent)
	}
	c.logLevel = slog.LevelWarn
	if c.LogLevel != "" {
		if err := c.logLevel.UnmarshalText([]byte(c.LogLevel)); err != nil {
			return nil, fmt.Errorf("invalid logLevel %q: want debug, info, warn or error", c.LogLevel)
		}
	}
	if c.LogFile != "" && !strings.HasPrefix(c.LogFile, "/") {
		return nil, fmt.Errorf("invalid logFile %q: must be an absolute path", c.LogFile)
	}
	if c.RawPrevResult != nil {
		if err := version.ParsePrevResult(&c.PluginConf); err != nil {
			return nil, fmt.Errorf("invalid prevResult: %w", err)
		}
	}
	return c, nil
}

// K8sArgs are the CNI_ARGS keys Kubernetes runtimes pass.
type K8sArgs struct {
	types.CommonArgs
	K8S_POD_NAMESPACE          types.UnmarshallableString //nolint:revive // CNI_ARGS key
	K8S_POD_NAME               types.UnmarshallableString //nolint:revive // CNI_ARGS key
	K8S_POD_UID                types.UnmarshallableString //nolint:revive // CNI_ARGS key
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString //nolint:revive // CNI_ARGS key
}

// ParseArgs decodes CNI_ARGS. As in the reference plugins, an unknown key is
// an error unless IgnoreUnknown=1 is set.
func ParseArgs(args string) (*K8sArgs, error) {
	a := &K8sArgs{}
	if err := types.LoadArgs(args, a); err != nil {
		return nil, fmt.Errorf("invalid CNI_ARGS: %w", err)
	}
	return a, nil
}
