//go:build linux

package bpf

import (
	"bufio"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// NetnsCookie returns the cookie of the network namespace at path (e.g.
// /var/run/netns/cni-...), the key the programs find a pod by. It opens a
// socket inside the netns (on a locked OS thread, via ns.Do) and asks for
// SO_NETNS_COOKIE, the same value bpf_get_netns_cookie returns there.
func NetnsCookie(path string) (uint64, error) {
	netns, err := ns.GetNS(path)
	if err != nil {
		return 0, fmt.Errorf("open netns %s: %w", path, err)
	}
	defer netns.Close()
	var cookie uint64
	err = netns.Do(func(ns.NetNS) error {
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("socket: %w", err)
		}
		defer unix.Close(fd)
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		if err != nil {
			return fmt.Errorf("getsockopt SO_NETNS_COOKIE: %w", err)
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("netns %s cookie: %w", path, err)
	}
	return cookie, nil
}

// CgroupV2Mount finds where cgroup v2 is mounted (it is /sys/fs/cgroup on
// most nodes, /sys/fs/cgroup/unified on hybrid ones), from /proc/mounts.
func CgroupV2Mount() (string, error) {
	f, err := os.Open("/proc/mounts")
	if err != nil {
		return "", fmt.Errorf("read mounts: %w", err)
	}
	defer f.Close()
	return parseCgroup2Mount(bufio.NewScanner(f))
}

func parseCgroup2Mount(sc *bufio.Scanner) (string, error) {
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 3 && fields[2] == "cgroup2" {
			return fields[1], nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("read mounts: %w", err)
	}
	return "", fmt.Errorf("no cgroup2 mount: %w", ErrNotSupported)
}

// PodRoutes reads the main routing table of the netns at path and marks
// the routes that leave by one of the excluded interfaces.
func PodRoutes(path string, excluded []string) ([]Route, error) {
	target, err := ns.GetNS(path)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", path, err)
	}
	defer target.Close()
	var routes []Route
	err = target.Do(func(ns.NetNS) error {
		links := map[int]string{}
		ls, err := netlink.LinkList()
		if err != nil {
			return fmt.Errorf("list links: %w", err)
		}
		for _, l := range ls {
			links[l.Attrs().Index] = l.Attrs().Name
		}
		rs, err := netlink.RouteList(nil, netlink.FAMILY_ALL)
		if err != nil {
			return fmt.Errorf("list routes: %w", err)
		}
		for _, r := range rs {
			var dst netip.Prefix
			switch {
			case r.Dst != nil:
				a, ok := netip.AddrFromSlice(r.Dst.IP)
				if !ok {
					continue
				}
				ones, _ := r.Dst.Mask.Size()
				dst = netip.PrefixFrom(a.Unmap(), ones)
			case r.Family == netlink.FAMILY_V6:
				dst = netip.MustParsePrefix("::/0")
			default:
				dst = netip.MustParsePrefix("0.0.0.0/0")
			}
			routes = append(routes, Route{Dst: dst, Excluded: slices.Contains(excluded, links[r.LinkIndex])})
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("routes of netns %s: %w", path, err)
	}
	return routes, nil
}
