//go:build linux

package bpf

import (
	"encoding/binary"
	"net/netip"
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
	tcActOK   = 0
	tcActShot = 2
	tcpSYN    = 0x02
	protoTCP  = 6
	protoUDP  = 17
)

// The tc inbound program's decisions that need no socket: which packets
// it leaves alone, and that a captured port with no inbound listener is
// dropped (fail closed), never delivered around the proxy.
func TestInboundProgram(t *testing.T) {
	c := loadUnattached(t)
	pod := netip.MustParseAddr("10.77.0.2")
	client := netip.MustParseAddr("10.77.0.1")
	p, err := PlanPod([]netip.Prefix{netip.PrefixFrom(pod, 24)}, defaultSettings())
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Put(4242, p); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		pkt  []byte
		want uint32
	}{
		{"UDP is not inbound-captured", tcpPacket(client, pod, 40000, 8080, 0, protoUDP), tcActOK},
		{"another address is not this pod's", tcpPacket(client, netip.MustParseAddr("10.77.0.9"), 40000, 8080, tcpSYN, protoTCP), tcActOK},
		{"Istio's excluded 15021 passes", tcpPacket(client, pod, 40000, 15021, tcpSYN, protoTCP), tcActOK},
		{"the inbound port itself passes", tcpPacket(client, pod, 40000, 15006, tcpSYN, protoTCP), tcActOK},
		{"captured port without a listener is dropped", tcpPacket(client, pod, 40000, 8080, tcpSYN, protoTCP), tcActShot},
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
	if err := c.Delete(4242); err != nil {
		t.Fatal(err)
	}
	ret, err := c.objs.SidelaneInbound.Run(&ebpf.RunOptions{Data: tests[len(tests)-1].pkt})
	if err != nil || ret != tcActOK {
		t.Errorf("after Delete: verdict %d (%v), want %d", ret, err, tcActOK)
	}
}
