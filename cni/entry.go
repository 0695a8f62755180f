// Package cni installs sidelane-cni on a node as a chained plugin: it copies
// the binary, chains sidelane's entry into the runtime's primary CNI config,
// writes a kubeconfig, keeps all of that in place while it runs, and removes
// it again on uninstall.
//
// The config editing (conflist.go, entry.go) is pure: bytes in, bytes out.
// The file I/O (installer.go, files.go) and the fsnotify loop (watch.go) sit
// on top of it.
package cni

import (
	"encoding/json"
	"fmt"

	"github.com/sidelane/sidelane/plugin"
)

// PluginType is the "type" of sidelane's entry in a conflist, which is also
// the binary's file name in the CNI bin dir.
const PluginType = "sidelane-cni"

// IstioCNIType is the "type" of Istio's own CNI plugin entry.
const IstioCNIType = "istio-cni"

// meshCNI names the service mesh whose CNI plugin has type typ, and how
// to make room for sidelane, when that plugin redirects a pod's traffic to
// the mesh's own proxy: chained together with sidelane-cni the same pods
// would be captured twice. The types are those the meshes' installers
// write into the conflist: Istio (istio/istio cni), Linkerd
// (linkerd2-proxy-init cni-plugin), Kuma (kumahq/kuma app/cni) and Consul
// (hashicorp/consul-k8s control-plane/cni).
func meshCNI(typ string) (mesh, remedy string, ok bool) {
	switch typ {
	case IstioCNIType:
		return "Istio", "install Istio with its CNI component disabled (components.cni.enabled=false)", true
	case "linkerd-cni":
		return "Linkerd", "install Linkerd without its CNI plugin (cniEnabled=false, no linkerd-cni DaemonSet)", true
	case "kuma-cni":
		return "Kuma", "install Kuma without its CNI (cni.enabled=false)", true
	case "consul-cni":
		return "Consul", "install Consul without its CNI plugin (connectInject.cni.enabled=false)", true
	}
	return "", "", false
}

// Entry is sidelane's plugin entry as written into the conflist. Its fields
// are those of plugin.Config; empty ones are left out so the plugin's
// defaults apply. name and cniVersion are never written: the runtime injects
// the list's, which is how the entry inherits the list's cniVersion.
type Entry struct {
	AgentSocket  string `json:"agentSocket,omitempty"`
	AgentTimeout string `json:"agentTimeout,omitempty"`
	FailPolicy   string `json:"failPolicy,omitempty"`
	StatusPolicy string `json:"statusPolicy,omitempty"`
	LogLevel     string `json:"logLevel,omitempty"`
	LogFile      string `json:"logFile,omitempty"`
}

// Validate checks the entry with the plugin's own parser, so a value the
// plugin would reject at ADD time is rejected before anything is written.
func (e Entry) Validate() error {
	probe := struct {
		CNIVersion string `json:"cniVersion"`
		Name       string `json:"name"`
		Type       string `json:"type"`
		Entry
	}{"1.0.0", "probe", PluginType, e}
	b, err := json.Marshal(probe)
	if err != nil {
		return fmt.Errorf("encode sidelane-cni entry: %w", err)
	}
	if _, err := plugin.ParseConfig(b); err != nil {
		return fmt.Errorf("sidelane-cni entry: %w", err)
	}
	return nil
}

// raw is the entry as it appears in a plugins list.
func (e Entry) raw() (json.RawMessage, error) {
	b, err := json.Marshal(struct {
		Type string `json:"type"`
		Entry
	}{PluginType, e})
	if err != nil {
		return nil, fmt.Errorf("encode sidelane-cni entry: %w", err)
	}
	return b, nil
}
