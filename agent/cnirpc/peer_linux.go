package cnirpc

import (
	"fmt"
	"net"

	"golang.org/x/sys/unix"
)

// peerOf reads the kernel's record of who connected (SO_PEERCRED).
func peerOf(conn net.Conn) (Peer, error) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return Peer{}, fmt.Errorf("%w: not a unix socket", errPeerUnknown)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Peer{}, fmt.Errorf("%w: %w", errPeerUnknown, err)
	}
	var cred *unix.Ucred
	var gerr error
	if err := raw.Control(func(fd uintptr) {
		cred, gerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return Peer{}, fmt.Errorf("%w: %w", errPeerUnknown, err)
	}
	if gerr != nil {
		return Peer{}, fmt.Errorf("%w: getsockopt SO_PEERCRED: %w", errPeerUnknown, gerr)
	}
	return Peer{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid}, nil
}
