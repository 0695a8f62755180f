//go:build !linux

package cnirpc

import (
	"fmt"
	"net"
)

// peerOf needs SO_PEERCRED (Linux): elsewhere every peer is refused.
func peerOf(net.Conn) (Peer, error) {
	return Peer{}, fmt.Errorf("%w on this system", errPeerUnknown)
}
