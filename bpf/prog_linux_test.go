//go:build linux

package bpf

import (
	"encoding/binary"
	"net/netip"
	"runtime"
	"slices"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/sidelane/sidelane/internal/testenv"
)

// loadUnattached loads the programs and fresh, unpinned maps, attached to
// nothing: for BPF_PROG_TEST_RUN.
func loadUnattached(t *testing.T) *Capture {
	t.Helper()
	testenv.Privileged(t)
	spec, err := loadCapture()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	c := &Capture{}
	if err := spec.LoadAndAssign(&c.objs, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.objs.Close() })
	return c
}

// tcpPacket is an Ethernet + IPv4 + TCP header with the given flags.
func tcpPacket(src, dst netip.Addr, sport, dport uint16, flags byte, proto byte) []byte {
	b := make([]byte, 14+20+20)
	binary.BigEndian.PutUint16(b[12:], 0x0800)
	ip := b[14:]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], 40)
	ip[8] = 64
	ip[9] = proto
	s4, d4 := src.As4(), dst.As4()
	copy(ip[12:], s4[:])
	copy(ip[16:], d4[:])
	tcp := ip[20:]
	binary.BigEndian.PutUint16(tcp[0:], sport)
	binary.BigEndian.PutUint16(tcp[2:], dport)
	tcp[12] = 5 << 4
	tcp[13] = flags
	return b
}

const (
	tcNext    = 0xffffffff // sidelane's "left alone": TCX_NEXT (-1), the next tcx program runs
	tcActShot = 2
	tcpSYN    = 0x02
	protoTCP  = 6
	protoUDP  = 17
)

// ipv4TCP is an Ethernet + IPv4 + TCP packet; fragOff is the IPv4
// flags+offset field (0x2000: more fragments), tcpLen how much of the
// 20-byte TCP header to include.
func ipv4TCP(src, dst netip.Addr, dport uint16, flags byte, fragOff uint16, tcpLen int) []byte {
	b := tcpPacket(src, dst, 40000, dport, flags, protoTCP)
	binary.BigEndian.PutUint16(b[14+6:], fragOff)
	b = b[:14+20+tcpLen]
	binary.BigEndian.PutUint16(b[14+2:], uint16(20+tcpLen))
	return b
}

// ipv6TCP is an Ethernet + IPv6 packet whose next headers are exts (each
// an 8-byte extension header of that type; 44 is a fragment header with
// offset fragOff) and then proto (a 20-byte TCP header when TCP).
func ipv6TCP(src, dst netip.Addr, dport uint16, flags byte, exts []byte, fragOff uint16, proto byte) []byte {
	b := make([]byte, 14+40, 14+40+8*len(exts)+20)
	binary.BigEndian.PutUint16(b[12:], 0x86dd)
	ip := b[14:]
	ip[0] = 0x60
	ip[7] = 64
	s16, d16 := src.As16(), dst.As16()
	copy(ip[8:], s16[:])
	copy(ip[24:], d16[:])
	next := append(slices.Clone(exts), proto)
	ip[6] = next[0]
	for i := range exts {
		h := make([]byte, 8)
		h[0] = next[i+1]
		if exts[i] == 44 {
			binary.BigEndian.PutUint16(h[2:], fragOff)
		}
		b = append(b, h...)
	}
	tcp := make([]byte, 20)
	binary.BigEndian.PutUint16(tcp[0:], 40000)
	binary.BigEndian.PutUint16(tcp[2:], dport)
	tcp[12] = 5 << 4
	tcp[13] = flags
	b = append(b, tcp...)
	binary.BigEndian.PutUint16(b[14+4:], uint16(len(b)-14-40))
	return b
}

// The tc inbound program's decisions that need no socket: which packets
// it leaves alone, and that a captured connection with no inbound listener
// is dropped (fail closed), never delivered around the proxy. The pod is
// the netns the program runs in (BPF_PROG_TEST_RUN runs it on this
// netns's loopback device), whatever address the packet is for; what it
// cannot parse, it drops.
func TestInboundProgram(t *testing.T) {
	c := loadUnattached(t)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	self, err := NetnsCookie("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	pod, pod6 := netip.MustParseAddr("10.77.0.2"), netip.MustParseAddr("fd00:77::2")
	client, client6 := netip.MustParseAddr("10.77.0.1"), netip.MustParseAddr("fd00:77::1")
	linkLocal := netip.MustParseAddr("fe80::2")
	s := defaultSettings()
	s.DualStack = true
	p, err := PlanPod([]netip.Prefix{netip.PrefixFrom(pod, 24), netip.PrefixFrom(pod6, 64)}, s)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Put(self, p); err != nil {
		t.Fatal(err)
	}
	const hop, dstopts, routing, frag = 0, 60, 43, 44
	tests := []struct {
		name string
		pkt  []byte
		want uint32
	}{
		{"UDP is not inbound-captured", tcpPacket(client, pod, 40000, 8080, 0, protoUDP), tcNext},
		{"Istio's excluded 15021 passes", tcpPacket(client, pod, 40000, 15021, tcpSYN, protoTCP), tcNext},
		{"the inbound port itself passes (the sidecar's own listener)", tcpPacket(client, pod, 40000, 15006, tcpSYN, protoTCP), tcNext},
		{"captured port without a listener is dropped", tcpPacket(client, pod, 40000, 8080, tcpSYN, protoTCP), tcActShot},
		{"another address on the pod's interface is the pod too", tcpPacket(client, netip.MustParseAddr("10.77.0.9"), 40000, 8080, tcpSYN, protoTCP), tcActShot},
		{"IPv6 captured port without a listener is dropped", ipv6TCP(client6, pod6, 8080, tcpSYN, nil, 0, protoTCP), tcActShot},
		{"IPv6 link-local destination is the pod too", ipv6TCP(client6, linkLocal, 8080, tcpSYN, nil, 0, protoTCP), tcActShot},
		{"TCP behind a hop-by-hop header is TCP", ipv6TCP(client6, pod6, 8080, tcpSYN, []byte{hop}, 0, protoTCP), tcActShot},
		{"TCP behind hop-by-hop, routing and destination options", ipv6TCP(client6, pod6, 8080, tcpSYN, []byte{hop, routing, dstopts}, 0, protoTCP), tcActShot},
		{"UDP behind destination options is not TCP", ipv6TCP(client6, pod6, 8080, 0, []byte{dstopts}, 0, protoUDP), tcNext},
		{"more extension headers than walked: dropped", ipv6TCP(client6, pod6, 8080, tcpSYN, []byte{dstopts, dstopts, dstopts, dstopts, dstopts, dstopts, dstopts, dstopts, dstopts}, 0, protoTCP), tcActShot},
		{"IPv6 fragmented SYN (first fragment): dropped", ipv6TCP(client6, pod6, 8080, tcpSYN, []byte{frag}, 1 /* M flag */, protoTCP), tcActShot},
		{"IPv6 later fragment: no ports, passes", ipv6TCP(client6, pod6, 8080, tcpSYN, []byte{frag}, 8<<3, protoTCP), tcNext},
		{"IPv4 fragmented SYN (first fragment): dropped", ipv4TCP(client, pod, 8080, tcpSYN, 0x2000, 20), tcActShot},
		{"IPv4 fragmented SYN to an excluded port passes", ipv4TCP(client, pod, 15021, tcpSYN, 0x2000, 20), tcNext},
		{"IPv4 later fragment: no ports, passes", ipv4TCP(client, pod, 8080, tcpSYN, 0x2000|3, 20), tcNext},
		{"IPv4 TCP header cut short: dropped", ipv4TCP(client, pod, 8080, tcpSYN, 0x2000, 8), tcActShot},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ret, err := c.objs.SidelaneInbound.Run(&ebpf.RunOptions{Data: tt.pkt})
			if err != nil {
				t.Fatal(err)
			}
			if ret != tt.want {
				t.Errorf("verdict %d, want %d", ret, tt.want)
			}
		})
	}
	var drops uint32
	for _, tt := range tests {
		if tt.want == tcActShot {
			drops++
		}
	}
	if got, err := c.Counters(self); err != nil || got.DroppedInbound != uint64(drops) {
		t.Errorf("dropped_in counter %d (%v), want %d", got.DroppedInbound, err, drops)
	}

	t.Run("per-node pod: a direct connection to the node proxy's in-pod listener is dropped", func(t *testing.T) {
		np, err := PlanNodePod([]netip.Prefix{netip.PrefixFrom(pod, 24)}, NodePodSettings{InboundPort: 15006})
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Put(self, np); err != nil {
			t.Fatal(err)
		}
		gw := netip.MustParseAddr("10.77.0.1")
		if err := c.SetNodeProxy(NodeProxy{Netns: 1, IPv4: gw, Port: 15001}); err != nil {
			t.Fatal(err)
		}
		for _, tt := range []struct {
			name string
			pkt  []byte
			want uint32
		}{
			{"SYN to the inbound port", tcpPacket(netip.MustParseAddr("10.77.0.5"), pod, 40000, 15006, tcpSYN, protoTCP), tcActShot},
			{"from the node proxy's address: its own upstream leg", tcpPacket(gw, pod, 40000, 8080, tcpSYN, protoTCP), tcNext},
			{"from another pod: to the in-pod listener (none here: dropped)", tcpPacket(netip.MustParseAddr("10.77.0.5"), pod, 40000, 8080, tcpSYN, protoTCP), tcActShot},
		} {
			ret, err := c.objs.SidelaneInbound.Run(&ebpf.RunOptions{Data: tt.pkt})
			if err != nil || ret != tt.want {
				t.Errorf("%s: verdict %d (%v), want %d", tt.name, ret, err, tt.want)
			}
		}
	})

	if err := c.Delete(self); err != nil {
		t.Fatal(err)
	}
	ret, err := c.objs.SidelaneInbound.Run(&ebpf.RunOptions{Data: tests[3].pkt})
	if err != nil || ret != tcNext {
		t.Errorf("after Delete: verdict %d (%v), want %d", ret, err, tcNext)
	}
}
