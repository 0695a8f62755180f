//go:build linux

package netnsgroup

import (
	"errors"

	"golang.org/x/sys/unix"
)

// netnsGone reports that path no longer names a network namespace: it is
// missing, or it is a plain file left after the runtime unmounted the netns
// (not on nsfs). Any other error is not proof, so it says no.
func netnsGone(path string) bool {
	var st unix.Statfs_t
	err := unix.Statfs(path, &st)
	if errors.Is(err, unix.ENOENT) {
		return true
	}
	return err == nil && st.Type != unix.NSFS_MAGIC
}
