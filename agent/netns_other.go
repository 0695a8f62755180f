//go:build !linux

package agent

// refuseNodeNetns: network namespaces are Linux's; elsewhere there is none
// to protect (and no datapath enrolls one).
func refuseNodeNetns(string) error { return nil }
