package agent

import (
	"fmt"

	"github.com/sidelane/sidelane/agent/store"
)

// podNetns is the one trust decision about which netns an ADD may enroll:
// any but the node's own. The socket's peer is trusted (root), but the
// netns path is data it passes on; enrolling the host's netns would
// capture the node's own traffic (every hostNetwork pod, the kubelet, the
// node proxy's upstreams) into proxies, or have the iptables backend
// rewrite the host's rules. The comparison is by the namespace's identity
// (device and inode of its nsfs file), so no path spelling or bind mount
// of it gets through. It returns that identity for the store, so the
// datapath later enrolls exactly the namespace checked here
// (store.Entry.CheckNetns). A path that cannot be read has no identity
// (0, 0) and is left to the datapath, which fails on it if it needs the
// netns (mode none needs none).
func podNetns(path string) (dev, ino uint64, err error) {
	dev, ino, err = store.NetnsIdentity(path)
	if err != nil {
		return 0, 0, nil
	}
	// The agent's own netns and the host's (PID 1's): the same one while
	// the agent runs with hostNetwork, as the chart runs it, but not in
	// tests or a non-host deployment. Each where the agent can read it.
	for _, own := range []string{"/proc/self/ns/net", "/proc/1/ns/net"} {
		odev, oino, oerr := store.NetnsIdentity(own)
		if oerr == nil && odev == dev && oino == ino {
			return 0, 0, fmt.Errorf("netns %s is the node's own network namespace (that of %s): refusing to capture it", path, own)
		}
	}
	return dev, ino, nil
}
