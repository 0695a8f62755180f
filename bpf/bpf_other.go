//go:build !linux

package bpf

import "fmt"

// NetnsCookie needs Linux.
func NetnsCookie(path string) (uint64, error) {
	return 0, fmt.Errorf("netns %s cookie: %w", path, ErrNotSupported)
}

// CgroupV2Mount needs Linux.
func CgroupV2Mount() (string, error) { return "", fmt.Errorf("cgroup v2: %w", ErrNotSupported) }

// PodRoutes needs Linux.
func PodRoutes(path string, excluded []string) ([]Route, error) {
	return nil, fmt.Errorf("routes of netns %s: %w", path, ErrNotSupported)
}

// Capture is the loaded datapath; on this system it never exists.
type Capture struct{}

// Close does nothing here.
func (*Capture) Close() error { return nil }

// Uninstall does nothing here.
func (*Capture) Uninstall() error { return nil }

// Repair needs Linux.
func (*Capture) Repair([]Inbound) ([]Repaired, error) {
	return nil, fmt.Errorf("repair: %w", ErrNotSupported)
}
