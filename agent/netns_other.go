//go:build !linux

package agent

// podNetns: network namespaces are Linux's; elsewhere there is none to
// protect (and no datapath enrolls one), and no identity to keep.
func podNetns(string) (dev, ino uint64, err error) { return 0, 0, nil }
