package kubelet

import (
	"fmt"
	"os"
	"path/filepath"

	corev1 "k8s.io/api/core/v1"

	"github.com/sidelane/sidelane/internal/podnet"
)

// EchoCommand is the app stand-in: a TCP echo server on 8080 that first
// writes "peer=<address>" (the connection's source as the app sees it:
// the client, a sidecar's 127.0.0.6 or the node proxy) and then echoes.
var EchoCommand = []string{"socat", "TCP-LISTEN:8080,fork,reuseaddr", "SYSTEM:echo peer=$SOCAT_PEERADDR; exec cat"}

// StandIn says what a pod's containers run on the simulated nodes, which
// have no images: the app container becomes EchoCommand, and an injected
// istio-proxy container becomes haproxy playing Envoy (uid 1337, outbound
// 15001, inbound 15006, `server orig 0.0.0.0` so it asks sidelane's
// getsockopt hook for the original destination).
type StandIn struct {
	// Stats is the sidecar's haproxy stats socket ("" without a sidecar).
	Stats string
}

// WithStandIns rewrites p's containers as described on StandIn; the
// haproxy config and stats socket go to dir.
func WithStandIns(p *corev1.Pod, dir string) (StandIn, error) {
	var s StandIn
	for i := range p.Spec.Containers {
		c := &p.Spec.Containers[i]
		switch c.Name {
		case "istio-proxy":
			s.Stats = filepath.Join(dir, p.Namespace+"_"+p.Name+".stats")
			cfg := filepath.Join(dir, p.Namespace+"_"+p.Name+".haproxy.cfg")
			conf := podnet.HAProxyConfig(podnet.Sidecar{UID: 1337, GID: 1337, OutPort: 15001, InPort: 15006,
				StatsSocket: s.Stats, LogConnections: true})
			if err := os.WriteFile(cfg, []byte(conf), 0o644); err != nil {
				return StandIn{}, fmt.Errorf("sidecar stand-in config: %w", err)
			}
			c.Command, c.Args = []string{"haproxy", "-db", "-f", cfg}, nil
		case "app":
			c.Command, c.Args = EchoCommand, nil
		}
	}
	return s, nil
}

// ContainerLog is where the node writes a container's output.
func (n *Node) ContainerLog(namespace, pod, container string) string {
	return filepath.Join(n.opts.Dir, n.Name, fmt.Sprintf("%s_%s_%s.log", namespace, pod, container))
}
