package cni

import (
	"encoding/json"
	"errors"
	"fmt"
)

// Kubeconfig renders a kubeconfig for server that authenticates with the
// service-account token and trusts ca. install-cni writes one only when
// asked (--kubeconfig-file): nothing in sidelane reads it, and a token on
// the node's disk is one more place to steal it from. The token and CA are embedded, since
// the pod's token path does not exist on the host; the installer rewrites
// the file whenever the token rotates. It is written as JSON, which every
// kubeconfig loader reads (YAML is a superset), to keep client-go out of
// this package.
func Kubeconfig(server string, ca, token []byte) ([]byte, error) {
	if server == "" {
		return nil, errors.New("kubeconfig: API server address is empty")
	}
	if len(token) == 0 {
		return nil, errors.New("kubeconfig: service-account token is empty")
	}
	type cluster struct {
		Server string `json:"server"`
		CAData []byte `json:"certificate-authority-data,omitempty"`
	}
	const name = "sidelane"
	cfg := map[string]any{
		"apiVersion":      "v1",
		"kind":            "Config",
		"current-context": name,
		"clusters":        []map[string]any{{"name": name, "cluster": cluster{Server: server, CAData: ca}}},
		"users":           []map[string]any{{"name": name, "user": map[string]string{"token": string(token)}}},
		"contexts":        []map[string]any{{"name": name, "context": map[string]string{"cluster": name, "user": name}}},
	}
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encode kubeconfig: %w", err)
	}
	return append(b, '\n'), nil
}
