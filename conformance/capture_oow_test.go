//go:build linux

package conformance

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sidelane/sidelane/internal/podnet"
)

// wantReset: the connection was reset by the pod.
const wantReset = "reset"

// inOOW is the INVALID_DROP probe: the remote namespace connects to the
// pod's port (IPv4), then injects a segment on that connection's 4-tuple
// whose sequence number is far out of window (conntrack marks it
// INVALID), acknowledging the pod's SYN-ACK exactly. With REDIRECT the
// INVALID segment escapes the reverse NAT, reaches the app's listener on
// the original port and draws a RST with the sequence number the client
// expects, which resets the connection: "reset". Dropped (INVALID_DROP),
// or met by the connection's own socket (eBPF: no NAT), it draws no RST
// and the connection then works: "in <original destination>".
func inOOW(port uint16, want string) capProbe {
	return capProbe{dir: toPodOOW, port: port, want: want}
}

const toPodOOW = "in-oow"

func (w *captureWorld) probeOOW(p capProbe, pod *capPod) (string, netip.AddrPort, error) {
	dst := netip.AddrPortFrom(pod.ns.IP4, p.port)
	var fd int
	err := w.remote.Do(func() error {
		var err error
		fd, err = syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_TCP)
		return err
	})
	if err != nil {
		return "", dst, fmt.Errorf("raw socket: %w", err)
	}
	defer syscall.Close(fd)
	if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &syscall.Timeval{Sec: 10}); err != nil {
		return "", dst, err
	}
	c, err := w.remote.DialAs(0, 0, dst, 5*time.Second)
	if err != nil {
		return "", dst, err
	}
	defer c.Close()
	local := c.LocalAddr().(*net.TCPAddr)
	src := netip.AddrPortFrom(netip.MustParseAddr(local.IP.String()).Unmap(), uint16(local.Port))

	// The pod's SYN-ACK gives both sides' next sequence numbers.
	var podSeq, clientSeq uint32
	buf := make([]byte, 1500)
	for {
		n, _, err := syscall.Recvfrom(fd, buf, 0)
		if err != nil {
			return "", dst, fmt.Errorf("wait for the SYN-ACK: %w", err)
		}
		ihl := int(buf[0]&0x0f) * 4
		if n < ihl+20 {
			continue
		}
		tcp := buf[ihl:n]
		const syn, ack = 0x02, 0x10
		if binary.BigEndian.Uint16(tcp[0:2]) == p.port && binary.BigEndian.Uint16(tcp[2:4]) == src.Port() && tcp[13]&(syn|ack) == syn|ack {
			podSeq, clientSeq = binary.BigEndian.Uint32(tcp[4:8])+1, binary.BigEndian.Uint32(tcp[8:12])
			break
		}
	}
	// The injected segment, then a barrier: a SYN to a port the pod
	// answers uncaptured (15021), from a port no socket uses. Both are sent
	// from one thread pinned to one CPU, so the pod handles them in order
	// and its answers come back in order: a RST drawn by the injected
	// segment arrives before the barrier's SYN-ACK.
	barrier := netip.AddrPortFrom(dst.Addr(), 15021)
	barrierSrc := netip.AddrPortFrom(src.Addr(), src.Port()^0x5a5a)
	sent := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the pinned thread ends with this goroutine
		var set unix.CPUSet
		set.Set(0)
		if err := unix.SchedSetaffinity(0, &set); err != nil {
			sent <- fmt.Errorf("pin thread: %w", err)
			return
		}
		for _, pkt := range []struct {
			to  netip.AddrPort
			seg []byte
		}{
			{dst, tcpSegment(src, dst, clientSeq+1<<30, podSeq, 0x18, []byte("x"))},
			{barrier, tcpSegment(barrierSrc, barrier, 1, 0, 0x02, nil)},
		} {
			if err := syscall.Sendto(fd, pkt.seg, 0, &syscall.SockaddrInet4{Addr: pkt.to.Addr().As4()}); err != nil {
				sent <- fmt.Errorf("inject: %w", err)
				return
			}
		}
		sent <- nil
	}()
	if err := <-sent; err != nil {
		return "", dst, err
	}
	for {
		n, _, err := syscall.Recvfrom(fd, buf, 0)
		if err != nil {
			return "", dst, fmt.Errorf("wait for the barrier's SYN-ACK: %w", err)
		}
		ihl := int(buf[0]&0x0f) * 4
		if n < ihl+20 {
			continue
		}
		tcp := buf[ihl:n]
		sport, dport, flags := binary.BigEndian.Uint16(tcp[0:2]), binary.BigEndian.Uint16(tcp[2:4]), tcp[13]
		const rst, syn, ackf = 0x04, 0x02, 0x10
		if sport == p.port && dport == src.Port() && flags&rst != 0 {
			return wantReset, dst, nil
		}
		if sport == barrier.Port() && dport == barrierSrc.Port() && flags&(syn|ackf) == syn|ackf {
			break
		}
	}
	if _, err := fmt.Fprintf(c, "hello\n"); err != nil {
		return "", dst, fmt.Errorf("write: %w", err)
	}
	line, err := podnet.ReadLine(c, 10*time.Second)
	if err != nil {
		return "", dst, fmt.Errorf("read reply: %w", err)
	}
	return line, dst, nil
}

// tcpSegment is a TCP segment with flags and payload, checksummed for
// IPv4.
func tcpSegment(src, dst netip.AddrPort, seq, ack uint32, flags byte, payload []byte) []byte {
	seg := make([]byte, 20+len(payload))
	binary.BigEndian.PutUint16(seg[0:], src.Port())
	binary.BigEndian.PutUint16(seg[2:], dst.Port())
	binary.BigEndian.PutUint32(seg[4:], seq)
	binary.BigEndian.PutUint32(seg[8:], ack)
	seg[12] = 5 << 4
	seg[13] = flags
	binary.BigEndian.PutUint16(seg[14:], 65535)
	copy(seg[20:], payload)
	var sum uint32
	add := func(b []byte) {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(b[i:]))
		}
		if len(b)%2 == 1 {
			sum += uint32(b[len(b)-1]) << 8
		}
	}
	s4, d4 := src.Addr().As4(), dst.Addr().As4()
	add(s4[:])
	add(d4[:])
	add([]byte{0, syscall.IPPROTO_TCP, byte(len(seg) >> 8), byte(len(seg))})
	add(seg)
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(seg[16:], ^uint16(sum))
	return seg
}
