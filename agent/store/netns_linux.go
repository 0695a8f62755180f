package store

import (
	"errors"
	"fmt"
	"os"
	"syscall"
)

// NetnsIdentity is the identity of the network namespace at path (device
// and inode of its nsfs file), which no path spelling or bind mount
// changes and which stays the namespace's own while it lives.
func NetnsIdentity(path string) (dev, ino uint64, err error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, 0, fmt.Errorf("netns %s: %w", path, err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, 0, fmt.Errorf("netns %s: no stat data", path)
	}
	return uint64(st.Dev), st.Ino, nil
}

// ErrNetnsReplaced: the entry's netns path names another namespace than
// the one the pod had at ADD.
var ErrNetnsReplaced = errors.New("netns path names another network namespace than at ADD")

// CheckNetns reports whether e.Netns still names the namespace recorded
// at ADD. A path such as /proc/<pid>/ns/net names whatever namespace the
// process now holding that pid is in once the pod's process is gone, so a
// datapath that re-opens the path (on restart, reconcile or a mode move)
// would capture, or rewrite the iptables rules of, someone else's netns,
// possibly the host's. Datapaths call this before entering e.Netns.
// Entries recorded before the identity was kept (NetnsIno 0) pass.
func (e Entry) CheckNetns() error {
	if e.NetnsIno == 0 {
		return nil
	}
	dev, ino, err := NetnsIdentity(e.Netns)
	if err != nil {
		return err
	}
	if dev != e.NetnsDev || ino != e.NetnsIno {
		return fmt.Errorf("%s: %w (inode %d, recorded %d): not touching it", e.Netns, ErrNetnsReplaced, ino, e.NetnsIno)
	}
	return nil
}
