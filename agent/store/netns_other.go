//go:build !linux

package store

import (
	"errors"
	"fmt"
)

// NetnsIdentity needs Linux.
func NetnsIdentity(path string) (dev, ino uint64, err error) {
	return 0, 0, fmt.Errorf("netns %s: %w", path, errors.ErrUnsupported)
}

// ErrNetnsReplaced: the entry's netns path names another namespace than
// the one the pod had at ADD.
var ErrNetnsReplaced = errors.New("netns path names another network namespace than at ADD")

// CheckNetns: no network namespaces here; nothing to check.
func (e Entry) CheckNetns() error { return nil }
