//go:build !linux

package netnsgroup

import (
	"errors"
	"io/fs"
	"os"
)

// netnsGone reports that path no longer exists.
func netnsGone(path string) bool {
	_, err := os.Stat(path)
	return errors.Is(err, fs.ErrNotExist)
}
