//go:build linux

// Package passthrough prepares a pod's netns for the source address of
// Envoy's inbound passthrough to the app.
package passthrough

import (
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// AddIPv6 puts ::6/128 on lo of the calling thread's netns, as Istio's
// capture does (istio-iptables' configureIPv6Addresses). ::6 is the source
// of Envoy's IPv6 inbound passthrough (Istio's counterpart of 127.0.0.6),
// which the capture rules exempt; IPv6's lo holds only ::1/128, so without
// it the proxy cannot bind ::6. Having it local also keeps the exemption
// safe: a SYN-ACK to a local address never leaves the pod, so a packet
// from outside claiming ::6 cannot complete a handshake. Already there is
// fine; a netns with IPv6 disabled (EACCES) has no IPv6 to pass through.
func AddIPv6() error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo: %w", err)
	}
	err = netlink.AddrAdd(lo, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP("::6"), Mask: net.CIDRMask(128, 128)}})
	if err == nil || errors.Is(err, unix.EEXIST) || errors.Is(err, unix.EACCES) {
		return nil
	}
	return fmt.Errorf("add ::6/128 to lo: %w", err)
}
