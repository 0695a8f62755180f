//go:build linux

package bpf

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/sidelane/sidelane/istio/capture"
)

// The neighbour is another agent's program set on the same node, modelled
// on Cilium's socket load balancer: a cgroup/connect4 program that rewrites
// a Service VIP to a backend (what Cilium attaches at the cgroup root, next
// to sendmsg4/6, getpeername4/6 and sock_ops), a sock_ops program that only
// counts, and a tcx ingress program that counts and passes on (TCX_NEXT).
// It is built with the asm package, so the test needs no second object file.
var (
	serviceVIP  = netip.AddrPortFrom(netip.MustParseAddr("10.96.0.10"), 80)
	backend     = netip.AddrPortFrom(remoteIP, 8080)
	dnsVIP      = netip.AddrPortFrom(netip.MustParseAddr("10.96.0.10"), 53) // kube-dns
	dnsBackend  = netip.AddrPortFrom(remoteIP, 53)
	redirected4 = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), 15001)
)

// Slots of the neighbour's counter array.
const (
	sawVIP      = iota // connect4 saw the VIP (and rewrote it to the backend)
	sawRedirect        // connect4 saw sidelane's redirect to 127.0.0.1:15001
	sawSockops         // sock_ops callbacks
	sawTC              // tcx ingress packets
	sawDNSVIP          // sendmsg4 saw the DNS VIP (and rewrote it)
	nSlots
)

type neighbour struct {
	counts   *ebpf.Map
	connect4 *ebpf.Program
	sendmsg4 *ebpf.Program
	sockops  *ebpf.Program
	tcx      *ebpf.Program
}

// le32 is the 4 bytes as the context's u32 fields hold them (network order
// bytes, loaded little-endian).
func le32(b []byte) int32 { return int32(binary.LittleEndian.Uint32(b)) }

func ip4(a netip.AddrPort) int32 { b := a.Addr().As4(); return le32(b[:]) }

// port is a sock_addr user_port: the port in network order in the low bytes.
func port(a netip.AddrPort) int32 {
	return le32([]byte{byte(a.Port() >> 8), byte(a.Port()), 0, 0})
}

// bump adds one to counter slot; it clobbers R0-R5.
func bump(m *ebpf.Map, slot int32) asm.Instructions {
	label := fmt.Sprintf("bumped%d", slot)
	return asm.Instructions{
		asm.StoreImm(asm.RFP, -4, int64(slot), asm.Word),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -4),
		asm.LoadMapPtr(asm.R1, m.FD()),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, label),
		asm.Mov.Imm(asm.R1, 1),
		asm.StoreXAdd(asm.R0, asm.R1, asm.Word),
		asm.Mov.Imm(asm.R0, 0).WithSymbol(label),
	}
}

func newNeighbour(t *testing.T) *neighbour {
	t.Helper()
	counts, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: nSlots})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { counts.Close() })
	n := &neighbour{counts: counts}

	// connect4: VIP -> backend, as socket LB does; note what it was given.
	c4 := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.LoadMem(asm.R7, asm.R6, 4, asm.Word),  // user_ip4
		asm.LoadMem(asm.R8, asm.R6, 24, asm.Word), // user_port
		asm.JNE.Imm32(asm.R7, ip4(serviceVIP), "notvip"),
		asm.JNE.Imm32(asm.R8, port(serviceVIP), "notvip"),
	}
	c4 = append(c4, bump(counts, sawVIP)...)
	c4 = append(c4,
		asm.Mov.Imm32(asm.R1, ip4(backend)),
		asm.StoreMem(asm.R6, 4, asm.R1, asm.Word),
		asm.Mov.Imm32(asm.R1, port(backend)),
		asm.StoreMem(asm.R6, 24, asm.R1, asm.Word),
		asm.Ja.Label("out"),
		asm.JNE.Imm32(asm.R7, ip4(redirected4), "out").WithSymbol("notvip"),
		asm.JNE.Imm32(asm.R8, port(redirected4), "out"),
	)
	c4 = append(c4, bump(counts, sawRedirect)...)
	c4 = append(c4, asm.Mov.Imm(asm.R0, 1).WithSymbol("out"), asm.Return())

	// sendmsg4: the same for UDP to the DNS VIP.
	sm4 := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.LoadMem(asm.R7, asm.R6, 4, asm.Word),
		asm.LoadMem(asm.R8, asm.R6, 24, asm.Word),
		asm.JNE.Imm32(asm.R7, ip4(dnsVIP), "out"),
		asm.JNE.Imm32(asm.R8, port(dnsVIP), "out"),
	}
	sm4 = append(sm4, bump(counts, sawDNSVIP)...)
	sm4 = append(sm4,
		asm.Mov.Imm32(asm.R1, ip4(dnsBackend)),
		asm.StoreMem(asm.R6, 4, asm.R1, asm.Word),
		asm.Mov.Imm32(asm.R1, port(dnsBackend)),
		asm.StoreMem(asm.R6, 24, asm.R1, asm.Word),
		asm.Mov.Imm(asm.R0, 1).WithSymbol("out"), asm.Return(),
	)

	so := append(bump(counts, sawSockops), asm.Mov.Imm(asm.R0, 1), asm.Return())
	tc := append(bump(counts, sawTC), asm.Mov.Imm(asm.R0, -1), asm.Return()) // TCX_NEXT

	for _, p := range []struct {
		dst  **ebpf.Program
		typ  ebpf.ProgramType
		at   ebpf.AttachType
		insn asm.Instructions
	}{
		{&n.connect4, ebpf.CGroupSockAddr, ebpf.AttachCGroupInet4Connect, c4},
		{&n.sendmsg4, ebpf.CGroupSockAddr, ebpf.AttachCGroupUDP4Sendmsg, sm4},
		{&n.sockops, ebpf.SockOps, ebpf.AttachCGroupSockOps, so},
		{&n.tcx, ebpf.SchedCLS, ebpf.AttachTCXIngress, tc},
	} {
		prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: p.typ, AttachType: p.at, Instructions: p.insn, License: "GPL"})
		if err != nil {
			t.Fatalf("load neighbour %v program: %v", p.at, err)
		}
		t.Cleanup(func() { prog.Close() })
		*p.dst = prog
	}
	return n
}

func (n *neighbour) count(t *testing.T, slot uint32) uint32 {
	t.Helper()
	var v uint32
	if err := n.counts.Lookup(&slot, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

func (n *neighbour) reset(t *testing.T) {
	t.Helper()
	for s := uint32(0); s < nSlots; s++ {
		var zero uint32
		if err := n.counts.Update(&s, &zero, ebpf.UpdateAny); err != nil {
			t.Fatal(err)
		}
	}
}

// attachCgroup attaches the neighbour's cgroup programs to dir, as
// bpf_links or as legacy BPF_F_ALLOW_MULTI attachments, removed at cleanup.
func (n *neighbour) attachCgroup(t *testing.T, dir string, legacy bool) {
	t.Helper()
	for _, p := range []struct {
		prog *ebpf.Program
		at   ebpf.AttachType
	}{{n.connect4, ebpf.AttachCGroupInet4Connect}, {n.sendmsg4, ebpf.AttachCGroupUDP4Sendmsg}, {n.sockops, ebpf.AttachCGroupSockOps}} {
		if !legacy {
			l, err := link.AttachCgroup(link.CgroupOptions{Path: dir, Attach: p.at, Program: p.prog})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
			continue
		}
		fd, err := unix.Open(dir, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		if err := link.RawAttachProgram(link.RawAttachProgramOptions{Target: fd, Program: p.prog, Attach: p.at, Flags: unix.BPF_F_ALLOW_MULTI}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := link.RawDetachProgram(link.RawDetachProgramOptions{Target: fd, Program: p.prog, Attach: p.at}); err != nil {
				t.Errorf("detach neighbour: %v", err)
			}
		})
	}
}

// effective is the order the kernel runs the programs of attach type at
// for processes in cgroup dir (BPF_F_QUERY_EFFECTIVE lists them in run
// order), as "sidelane"/"neighbour"/"other".
func effective(t *testing.T, dir string, at ebpf.AttachType, sidelane, neighbour *ebpf.Program) []string {
	t.Helper()
	fd, err := unix.Open(dir, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	res, err := link.QueryPrograms(link.QueryOptions{Target: fd, Attach: at, QueryFlags: unix.BPF_F_QUERY_EFFECTIVE})
	if err != nil {
		t.Fatal(err)
	}
	id := func(p *ebpf.Program) ebpf.ProgramID {
		info, err := p.Info()
		if err != nil {
			t.Fatal(err)
		}
		i, _ := info.ID()
		return i
	}
	sid, nid := id(sidelane), id(neighbour)
	var out []string
	for _, p := range res.Programs {
		switch p.ID {
		case sid:
			out = append(out, "sidelane")
		case nid:
			out = append(out, "neighbour")
		default:
			out = append(out, "other")
		}
	}
	return out
}

// TestCoexistCgroup runs sidelane next to the neighbour in every placement
// a node sees: on a parent cgroup (Cilium attaches at the cgroup root, the
// chart attaches sidelane to the pods' subtree) and on the same cgroup
// before or after sidelane, each as bpf_link and as legacy multi-attach.
// The kernel runs a cgroup's own programs before its ancestors', and on
// one cgroup in attach order (links and multi-attach share one list). In
// every case sidelane still captures and the VIP still reaches the
// backend; what differs is the original destination the sidecar sees.
func TestCoexistCgroup(t *testing.T) {
	for _, tt := range []struct {
		name          string
		where         string // "parent", "before" (same cgroup, attached first), "after"
		legacy        bool
		sidelaneFirst bool
	}{
		{"parent cgroup, bpf_link", "parent", false, true},
		{"parent cgroup, multi-attach", "parent", true, true},
		{"same cgroup before sidelane, bpf_link", "before", false, false},
		{"same cgroup before sidelane, multi-attach", "before", true, false},
		{"same cgroup after sidelane, bpf_link", "after", false, true},
		{"same cgroup after sidelane, multi-attach", "after", true, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnvOpts(t, envOpts{nested: true, noLoad: true})
			n := newNeighbour(t)
			switch tt.where {
			case "parent":
				n.attachCgroup(t, e.parent, tt.legacy)
				e.load()
			case "before":
				n.attachCgroup(t, e.cgroup, tt.legacy)
				e.load()
			case "after":
				e.load()
				n.attachCgroup(t, e.cgroup, tt.legacy)
			}
			wantOrder := []string{"neighbour", "sidelane"}
			if tt.sidelaneFirst {
				wantOrder = []string{"sidelane", "neighbour"}
			}
			for _, at := range []struct {
				at       ebpf.AttachType
				sidelane *ebpf.Program
				n        *ebpf.Program
			}{
				{ebpf.AttachCGroupInet4Connect, e.cap.objs.SidelaneConnect4, n.connect4},
				{ebpf.AttachCGroupSockOps, e.cap.objs.SidelaneSockops, n.sockops},
				{ebpf.AttachCGroupUDP4Sendmsg, e.cap.objs.SidelaneSendmsg4, n.sendmsg4},
			} {
				if got := effective(t, e.cgroup, at.at, at.sidelane, at.n); !slices.Equal(got, wantOrder) {
					t.Errorf("%v run order for the pod = %v, want %v", at.at, got, wantOrder)
				}
			}
			e.enroll(defaultSettings())

			// The sidecar's view: the original destination it reads.
			wantOrig := backend
			if tt.sidelaneFirst {
				wantOrig = serviceVIP
			}
			l, out := e.startOrigDstHelper(t, "origdst", "0.0.0.0:15001")
			if o, err := e.app("dial", serviceVIP.String(), false).CombinedOutput(); err != nil {
				t.Fatalf("dial %s: %v: %s", serviceVIP, err, o)
			}
			l.Wait()
			if got := strings.Fields(out.String()); len(got) == 0 || got[0] != "v4="+wantOrig.String() {
				t.Errorf("sidecar's SO_ORIGINAL_DST: %q, want v4=%s", out.String(), wantOrig)
			}
			// sidelane's redirect is what the neighbour saw when it ran
			// second; when it ran first it saw (and rewrote) the VIP.
			if got, want := n.count(t, sawRedirect), map[bool]uint32{true: 1, false: 0}[tt.sidelaneFirst]; got != want {
				t.Errorf("neighbour saw sidelane's redirect %d times, want %d", got, want)
			}
			if n.count(t, sawSockops) == 0 {
				t.Error("neighbour's sock_ops never ran")
			}

			// End to end through a real sidecar: captured (the server sees
			// the sidecar's source), and the VIP reached the backend,
			// rewritten either in the app's connect or in the sidecar's.
			n.reset(t)
			e.startSidecar()
			r := e.dial(serviceVIP, false)
			if r.peer.Addr() != sidecarSrc {
				t.Errorf("server saw peer %s, want the sidecar's %s (captured)", r.peer, sidecarSrc)
			}
			if r.local != backend {
				t.Errorf("server reached at %s, want the backend %s", r.local, backend)
			}
			if r.appPeer != wantOrig {
				t.Errorf("application's getpeername = %s, want %s", r.appPeer, wantOrig)
			}
			// The VIP was rewritten once: in the sidecar's upstream connect
			// (sidelane first) or in the app's (neighbour first).
			if got := n.count(t, sawVIP); got != 1 {
				t.Errorf("neighbour rewrote the VIP %d times, want 1", got)
			}
			c, err := e.cap.Counters(e.cookie)
			if err != nil {
				t.Fatal(err)
			}
			if c.RedirectedOutbound != 2 || c.OrigDstAnswered < 2 {
				t.Errorf("sidelane counters %+v, want 2 redirected and answered", c)
			}
		})
	}
}

// TestCoexistTCX: sidelane's inbound capture (tcx ingress on the pod's
// interface) next to another tcx program there. A program attached before
// sidelane's that returns TCX_NEXT leaves inbound capture intact. One
// attached after sidelane's sees the packets sidelane leaves alone (it
// returns TCX_NEXT for them), not the SYN it hands to the proxy (that ends
// the chain), and capture holds either way.
func TestCoexistTCX(t *testing.T) {
	for _, tt := range []struct {
		name   string
		before bool
	}{{"neighbour attached first", true}, {"neighbour attached after sidelane", false}} {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			e.startSidecar()
			n := newNeighbour(t)
			attachN := func() {
				t.Helper()
				podNS, err := ns.GetNS(e.podPath)
				if err != nil {
					t.Fatal(err)
				}
				defer podNS.Close()
				var l link.Link
				err = podNS.Do(func(ns.NetNS) error {
					ifc, err := net.InterfaceByName("eth0")
					if err != nil {
						return err
					}
					l, err = link.AttachTCX(link.TCXOptions{Interface: ifc.Index, Program: n.tcx, Attach: ebpf.AttachTCXIngress})
					return err
				})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { l.Close() })
			}
			if tt.before {
				attachN()
			}
			e.enroll(defaultSettings())
			if err := e.cap.AttachInbound(e.podPath, e.cookie, "eth0"); err != nil {
				t.Fatal(err)
			}
			if !tt.before {
				attachN()
			}
			n.reset(t)
			dst := netip.AddrPortFrom(podIP, 8080)
			r, err := e.dialFromRemote(dst)
			if err != nil {
				t.Fatal(err)
			}
			// Captured: the app saw the sidecar's inbound source 127.0.0.6.
			if r.peer.Addr().Unmap() != netip.MustParseAddr("127.0.0.6") {
				t.Errorf("app saw peer %s, want 127.0.0.6 (through the sidecar)", r.peer)
			}
			got := n.count(t, sawTC)
			if tt.before && got == 0 {
				t.Error("neighbour attached first saw no packets")
			}
			if !tt.before && got == 0 {
				t.Error("neighbour attached after sidelane saw no packets: sidelane ended the tcx chain for packets it left alone")
			}
		})
	}
}

// TestCoexistDNS: DNS capture (sendmsg4/recvmsg4 to the pod's DNS proxy)
// next to a neighbour that rewrites the kube-dns VIP in sendmsg4, as
// Cilium's socket LB does. Either way the query reaches the DNS proxy; the
// reply's source is the address sidelane saw: the VIP when sidelane runs
// first, the backend when the neighbour does. A resolver that checks the
// reply's source against the server it asked drops the
// latter, one more reason for Cilium's socketLB.hostNamespaceOnly.
func TestCoexistDNS(t *testing.T) {
	for _, tt := range []struct {
		name          string
		sidelaneFirst bool
	}{{"neighbour on the parent cgroup", true}, {"neighbour on the same cgroup, attached first", false}} {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnvOpts(t, envOpts{nested: true, noLoad: true})
			n := newNeighbour(t)
			if tt.sidelaneFirst {
				n.attachCgroup(t, e.parent, false)
			} else {
				n.attachCgroup(t, e.cgroup, false)
			}
			e.load()
			podNS, err := ns.GetNS(e.podPath)
			if err != nil {
				t.Fatal(err)
			}
			defer podNS.Close()
			var pc net.PacketConn
			if err := podNS.Do(func(ns.NetNS) error {
				pc, err = net.ListenPacket("udp4", fmt.Sprintf("127.0.0.1:%d", capture.DNSPort))
				return err
			}); err != nil {
				t.Fatal(err)
			}
			defer pc.Close()
			go func() {
				buf := make([]byte, 100)
				for {
					k, from, err := pc.ReadFrom(buf)
					if err != nil {
						return
					}
					pc.WriteTo([]byte("proxied-"+string(buf[:k])), from)
				}
			}()
			s := defaultSettings()
			s.DNSCapture, s.DNSPort = true, capture.DNSPort
			e.enroll(s)
			out, err := e.app("udp", dnsVIP.String(), false).CombinedOutput()
			if err != nil {
				t.Fatalf("udp query to %s: %v: %s", dnsVIP, err, out)
			}
			from := dnsBackend
			if tt.sidelaneFirst {
				from = dnsVIP
			}
			if got, want := strings.TrimSpace(string(out)), "from="+from.String()+" data=proxied-query"; got != want {
				t.Errorf("UDP DNS to the VIP: %q, want %q", got, want)
			}
			if got, want := n.count(t, sawDNSVIP), map[bool]uint32{true: 0, false: 1}[tt.sidelaneFirst]; got != want {
				t.Errorf("neighbour rewrote the DNS VIP %d times, want %d", got, want)
			}
		})
	}
}
