//go:build linux

// Package podnet builds small networks of "pods" for capture tests: real
// network namespaces (made with `ip netns add`, so `ip netns exec` works in
// them) joined by a bridge that lives in its own namespace, so a test never
// touches the machine's own network. The capture tests and the benchmark
// runner use it; it takes a TB, not a *testing.T, so non-test code can.
package podnet

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// TB is what podnet needs from its caller: *testing.T satisfies it, and so
// does the benchmark runner's stand-in (whose Fatalf ends the scenario).
type TB interface {
	Helper()
	Fatalf(format string, args ...any)
	Logf(format string, args ...any)
	Cleanup(func())
	TempDir() string
}

// UniqueName returns prefix plus 8 random hex digits (as testenv's, which
// only tests may import).
func UniqueName(prefix string) string {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return prefix + hex.EncodeToString(b)
}

// Net is one bridged network: a router namespace holding the bridge, and
// namespaces attached to it with addresses from Subnet4 and Subnet6.
type Net struct {
	t       TB
	router  string
	bridge  string
	Subnet4 netip.Prefix
	Subnet6 netip.Prefix
	next    int
	// routed: pods get a default route via the gateway (see Join).
	routed bool
}

// NS is one network namespace on a Net.
type NS struct {
	Name string
	Path string
	// IP4 and IP6 are the addresses of its eth0 (IP4 is invalid in an
	// IPv6-only namespace).
	IP4, IP6 netip.Addr
	// CPUs, when set, is where Command runs its programs (Pinned): the
	// benchmarks pin each pod's processes so a run's placement on the
	// cores does not change from batch to batch.
	CPUs string
}

// Run runs cmd and fails the test with its output when it fails.
func Run(t TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// New makes a network. Addresses come from 10.<r>.<r>.0/24 and
// fd00:<r>:<r>::/64 for a random r; they exist only inside the test's
// namespaces.
func New(t TB) *Net {
	t.Helper()
	r := int(time.Now().UnixNano()%200) + 20
	n := &Net{
		t:       t,
		router:  UniqueName("pnr"),
		bridge:  "br0",
		Subnet4: netip.MustParsePrefix(fmt.Sprintf("10.%d.%d.0/24", r, r)),
		Subnet6: netip.MustParsePrefix(fmt.Sprintf("fd00:%x:%x::/64", r, r)),
		next:    2,
	}
	Run(t, "ip", "netns", "add", n.router)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", n.router).Run() })
	Run(t, "ip", "-n", n.router, "link", "add", n.bridge, "type", "bridge")
	Run(t, "ip", "-n", n.router, "link", "set", n.bridge, "up")
	Run(t, "ip", "netns", "exec", n.router, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0")
	return n
}

// Add makes a namespace on the network with the next addresses, one per
// family.
func (n *Net) Add(prefix string) *NS { return n.add(prefix, true) }

// AddIPv6Only makes a namespace with only an IPv6 address on eth0.
func (n *Net) AddIPv6Only(prefix string) *NS { return n.add(prefix, false) }

func (n *Net) add(prefix string, ipv4 bool) *NS {
	t := n.t
	t.Helper()
	name := UniqueName(prefix)
	Run(t, "ip", "netns", "add", name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	i := n.next
	n.next++
	s := &NS{
		Name: name,
		Path: filepath.Join("/run/netns", name),
		IP4:  nth(n.Subnet4, i),
		IP6:  nth(n.Subnet6, i),
	}
	host := fmt.Sprintf("v%d", i)
	Run(t, "ip", "-n", n.router, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", name)
	Run(t, "ip", "-n", n.router, "link", "set", host, "master", n.bridge, "up")
	Run(t, "ip", "-n", name, "link", "set", "lo", "up")
	Run(t, "ip", "-n", name, "link", "set", "eth0", "up")
	if ipv4 {
		Run(t, "ip", "-n", name, "addr", "add", fmt.Sprintf("%s/%d", s.IP4, n.Subnet4.Bits()), "dev", "eth0")
	} else {
		s.IP4 = netip.Addr{}
	}
	Run(t, "ip", "-n", name, "addr", "add", fmt.Sprintf("%s/%d", s.IP6, n.Subnet6.Bits()), "dev", "eth0", "nodad")
	if n.routed && ipv4 {
		Run(t, "ip", "-n", name, "route", "add", "default", "via", n.Gateway4().String())
	}
	return s
}

// Router is the name of the namespace holding the bridge: the "host"
// netns of the simulated node.
func (n *Net) Router() string { return n.router }

// Gateway4 is the network's IPv4 gateway once joined: the subnet's first
// address, on the bridge (pods start at the second).
func (n *Net) Gateway4() netip.Addr { return nth(n.Subnet4, 1) }

// Join links n and o like two nodes on one wire: each bridge gets its
// Gateway4, a veth joins the two router namespaces, and each router routes
// the other's IPv4 subnet over it, so pods added afterwards on either
// network reach the other's. The subnets must differ.
func (n *Net) Join(o *Net) {
	t := n.t
	t.Helper()
	if n.Subnet4.Overlaps(o.Subnet4) {
		t.Fatalf("join: subnets %s and %s overlap", n.Subnet4, o.Subnet4)
	}
	for _, x := range []*Net{n, o} {
		Run(t, "ip", "-n", x.router, "addr", "add", fmt.Sprintf("%s/%d", x.Gateway4(), x.Subnet4.Bits()), "dev", x.bridge)
		Run(t, "ip", "netns", "exec", x.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
		x.routed = true
	}
	// The wire's addresses exist only inside the two router namespaces.
	Run(t, "ip", "-n", n.router, "link", "add", "wire0", "type", "veth", "peer", "name", "wire0", "netns", o.router)
	for i, x := range []struct {
		self, peer *Net
	}{{n, o}, {o, n}} {
		Run(t, "ip", "-n", x.self.router, "addr", "add", fmt.Sprintf("192.168.255.%d/30", i+1), "dev", "wire0")
		Run(t, "ip", "-n", x.self.router, "link", "set", "wire0", "up")
		Run(t, "ip", "-n", x.self.router, "route", "add", x.peer.Subnet4.String(), "via", fmt.Sprintf("192.168.255.%d", 2-i))
	}
}

// AddAddr gives ns an extra address on eth0 (e.g. a destination inside or
// outside an excluded range).
func (s *NS) AddAddr(t TB, a netip.Addr, bits int) {
	t.Helper()
	args := []string{"-n", s.Name, "addr", "add", fmt.Sprintf("%s/%d", a, bits), "dev", "eth0"}
	if a.Is6() {
		args = append(args, "nodad")
	}
	Run(t, "ip", args...)
}

// Nth is the i-th address of p.
func nth(p netip.Prefix, i int) netip.Addr {
	a := p.Addr()
	for range i {
		a = a.Next()
	}
	return a
}

// Addr is the n-th address of the network's subnet of a's family.
func (n *Net) Addr(ipv6 bool, i int) netip.Addr {
	if ipv6 {
		return nth(n.Subnet6, i)
	}
	return nth(n.Subnet4, i)
}

// Do runs fn on a locked OS thread inside s.
func (s *NS) Do(fn func() error) error {
	return ns.WithNetNSPath(s.Path, func(ns.NetNS) error { return fn() })
}

// Listen opens a TCP listener inside s; the socket stays in s.
func (s *NS) Listen(t TB, network, addr string) net.Listener {
	t.Helper()
	var l net.Listener
	err := s.Do(func() error {
		// Plain TCP, as Envoy and haproxy listen (Go's default is MPTCP,
		// whose listeners cannot join the sockhash sidecar pods' inbound
		// capture takes the proxy's listener from).
		var lc net.ListenConfig
		lc.SetMultipathTCP(false)
		var err error
		l, err = lc.Listen(context.Background(), network, addr)
		return err
	})
	if err != nil {
		t.Fatalf("listen %s %s in %s: %v", network, addr, s.Name, err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// LoHas says whether s's lo holds the address cidr ("::6/128").
func (s *NS) LoHas(t TB, cidr string) bool {
	t.Helper()
	out := Run(t, "ip", "-n", s.Name, "addr", "show", "dev", "lo")
	return strings.Contains(out, " "+cidr+" ")
}

// Command returns cmd set to run inside s (`ip netns exec`), on s.CPUs
// when set.
func (s *NS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append(append([]string{"netns", "exec", s.Name}, Pinned(s.CPUs)...), append([]string{name}, args...)...)...)
}

// Pinned is the command prefix that runs a program on cpus (taskset's
// list, "0" or "0,1"), inherited by every thread and child it makes;
// none when cpus is empty.
func Pinned(cpus string) []string {
	if cpus == "" {
		return nil
	}
	return []string{"taskset", "-c", cpus}
}

// DialAs connects from inside s to addr with a socket owned by uid/gid,
// the way a process running as uid/gid would: the socket is made on a
// thread whose filesystem uid/gid (what iptables' owner match and cgroup
// programs see) are switched for the socket() call only. A refused or
// unreachable connection is returned as the error.
func (s *NS) DialAs(uid, gid uint32, addr netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	return s.DialAsProto(uid, gid, syscall.SOCK_STREAM, addr, timeout)
}

// DialAsProto is DialAs for a socket type: SOCK_STREAM (TCP) or
// SOCK_DGRAM (a connected UDP socket).
func (s *NS) DialAsProto(uid, gid uint32, sotype int, addr netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	var conn net.Conn
	err := s.Do(func() error {
		var family int
		var sa syscall.Sockaddr
		if addr.Addr().Is4() {
			family = syscall.AF_INET
			sa = &syscall.SockaddrInet4{Port: int(addr.Port()), Addr: addr.Addr().As4()}
		} else {
			family = syscall.AF_INET6
			sa = &syscall.SockaddrInet6{Port: int(addr.Port()), Addr: addr.Addr().As16()}
		}
		fd, err := socketAs(uid, gid, family, sotype)
		if err != nil {
			return err
		}
		tv := syscall.NsecToTimeval(timeout.Nanoseconds())
		if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_SNDTIMEO, &tv); err != nil {
			syscall.Close(fd)
			return fmt.Errorf("set connect timeout: %w", err)
		}
		if err := connectRetryingEINTR(fd, sa, timeout); err != nil {
			syscall.Close(fd)
			return fmt.Errorf("connect %s: %w", addr, err)
		}
		f := os.NewFile(uintptr(fd), "dial")
		defer f.Close()
		conn, err = net.FileConn(f)
		return err
	})
	return conn, err
}

// connectRetryingEINTR is a blocking connect that survives a signal (Go's
// runtime sends SIGURG to preempt goroutines): after EINTR the kernel goes
// on connecting, so wait for the socket to become writable and read the
// outcome from SO_ERROR instead of connecting again (EALREADY).
func connectRetryingEINTR(fd int, sa syscall.Sockaddr, timeout time.Duration) error {
	err := syscall.Connect(fd, sa)
	if err != syscall.EINTR {
		return err
	}
	deadline := time.Now().Add(timeout)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return syscall.ETIMEDOUT
		}
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		n, err := unix.Poll(fds, int(left.Milliseconds())+1)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return syscall.ETIMEDOUT
		}
		soerr, err := syscall.GetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_ERROR)
		if err != nil {
			return err
		}
		if soerr != 0 {
			return syscall.Errno(soerr)
		}
		return nil
	}
}

// socketAs makes a TCP socket owned by uid/gid. setfsuid/setfsgid act on
// the calling thread only (raw syscalls, not Go's all-threads wrappers),
// and the caller holds a locked thread; both are restored before return.
func socketAs(uid, gid uint32, family, sotype int) (int, error) {
	if _, _, e := syscall.RawSyscall(syscall.SYS_SETFSGID, uintptr(gid), 0, 0); e != 0 {
		return -1, fmt.Errorf("setfsgid: %w", e)
	}
	defer syscall.RawSyscall(syscall.SYS_SETFSGID, 0, 0, 0)
	if _, _, e := syscall.RawSyscall(syscall.SYS_SETFSUID, uintptr(uid), 0, 0); e != 0 {
		return -1, fmt.Errorf("setfsuid: %w", e)
	}
	defer syscall.RawSyscall(syscall.SYS_SETFSUID, 0, 0, 0)
	fd, err := syscall.Socket(family, sotype|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	return fd, nil
}

// ListenPacket opens a UDP socket inside s; it stays in s.
func (s *NS) ListenPacket(t TB, network, addr string) net.PacketConn {
	t.Helper()
	var c net.PacketConn
	err := s.Do(func() error {
		var err error
		c, err = net.ListenPacket(network, addr)
		return err
	})
	if err != nil {
		t.Fatalf("listen %s %s in %s: %v", network, addr, s.Name, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// ListenUDPAs opens a UDP socket on addr inside s owned by uid/gid, the
// way a process running as them would own it: owner matches (e.g. Istio's
// DNS conntrack zones for the proxy's answers) see uid/gid on what it
// sends.
func (s *NS) ListenUDPAs(t TB, uid, gid uint32, addr netip.AddrPort) net.PacketConn {
	t.Helper()
	var c net.PacketConn
	err := s.Do(func() error {
		var sa syscall.Sockaddr
		family := syscall.AF_INET
		if addr.Addr().Is4() {
			sa = &syscall.SockaddrInet4{Port: int(addr.Port()), Addr: addr.Addr().As4()}
		} else {
			family = syscall.AF_INET6
			sa = &syscall.SockaddrInet6{Port: int(addr.Port()), Addr: addr.Addr().As16()}
		}
		fd, err := socketAs(uid, gid, family, syscall.SOCK_DGRAM)
		if err != nil {
			return err
		}
		if err := syscall.Bind(fd, sa); err != nil {
			syscall.Close(fd)
			return fmt.Errorf("bind udp %s: %w", addr, err)
		}
		f := os.NewFile(uintptr(fd), "udp")
		defer f.Close()
		c, err = net.FilePacketConn(f)
		return err
	})
	if err != nil {
		t.Fatalf("listen udp %s in %s: %v", addr, s.Name, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// ReadLine reads one line from c with a deadline.
func ReadLine(c net.Conn, timeout time.Duration) (string, error) {
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

// Sidecar is how the haproxy sidecar stand-in runs.
type Sidecar struct {
	UID, GID        uint32
	OutPort, InPort uint16
	// SendProxy makes haproxy announce the original destination to the
	// upstream with a PROXY protocol v1 line (the capture tests read it;
	// the benchmark leaves it off, as Envoy does by default).
	SendProxy bool
	// Cgroup is a cgroup v2 directory to start haproxy in (eBPF capture
	// acts on processes below its cgroup); empty: the caller's cgroup.
	Cgroup string
	// StatsSocket, if set, is where haproxy serves its stats (see
	// FrontendSessions).
	StatsSocket string
	// LogConnections makes haproxy write one line per finished connection
	// to stdout: "conn <frontend> <client ip> <original dst ip:port>" (see
	// ParseConnLog), so tests can tell which proxy saw a connection and
	// where it sent it.
	LogConnections bool
}

// HAProxyConfig is the sidecar stand-in's config: a transparent TCP proxy
// playing Envoy's outbound (15001) and inbound (15006) listeners. `server
// orig 0.0.0.0` makes haproxy connect to the connection's original
// destination, which it reads with getsockopt(SO_ORIGINAL_DST) (IPv4 only:
// haproxy does not ask for the IPv6 one). Like Envoy's inbound
// passthrough, it connects to the app from 127.0.0.6.
func HAProxyConfig(sc Sidecar) string {
	var b strings.Builder
	fmt.Fprintf(&b, "global\n  uid %d\n  gid %d\n  maxconn 2000\n", sc.UID, sc.GID)
	if sc.StatsSocket != "" {
		fmt.Fprintf(&b, "  stats socket %s mode 600 level user\n", sc.StatsSocket)
	}
	logs := ""
	if sc.LogConnections {
		b.WriteString("  log stdout format raw local0\n")
		logs = "  log global\n  log-format \"conn %ft %ci %si:%sp\"\n"
	}
	proxy := ""
	if sc.SendProxy {
		proxy = " send-proxy"
	}
	fmt.Fprintf(&b, `defaults
  mode tcp
%[4]s  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend outbound
  bind 0.0.0.0:%[1]d
  default_backend orig_out
frontend inbound
  bind 0.0.0.0:%[2]d
  default_backend orig_in
backend orig_out
  server orig 0.0.0.0%[3]s
backend orig_in
  server orig 0.0.0.0%[3]s source 127.0.0.6
`, sc.OutPort, sc.InPort, proxy, logs)
	return b.String()
}

// NodeProxy is how the per-node proxy stand-in runs: haproxy in a node's
// host netns, outbound listener Addr:OutPort, Inbound listeners passed as
// fd@3, fd@4, ... (one per per-node pod, opened inside the pod's netns),
// every upstream connection from Addr (so inbound capture lets it through)
// to the original destination (SO_ORIGINAL_DST).
type NodeProxy struct {
	Addr           string
	OutPort        uint16
	Inbound        []string // frontend name suffix per inherited listener
	StatsSocket    string
	LogConnections bool   // as Sidecar.LogConnections
	CPUs           string // as NS.CPUs
}

// NodeProxyConfig is the node proxy stand-in's haproxy config.
func NodeProxyConfig(np NodeProxy) string {
	var b strings.Builder
	b.WriteString("global\n  maxconn 5000\n")
	if np.StatsSocket != "" {
		fmt.Fprintf(&b, "  stats socket %s mode 600 level user\n", np.StatsSocket)
	}
	if np.LogConnections {
		b.WriteString("  log stdout format raw local0\n")
	}
	b.WriteString("defaults\n  mode tcp\n")
	if np.LogConnections {
		b.WriteString("  log global\n  log-format \"conn %ft %ci %si:%sp\"\n")
	}
	fmt.Fprintf(&b, `  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend outbound
  bind %[1]s:%[2]d
  default_backend orig
backend orig
  server orig 0.0.0.0 source %[1]s
`, np.Addr, np.OutPort)
	for i, name := range np.Inbound {
		fmt.Fprintf(&b, "frontend inbound_%s\n  bind fd@%d\n  default_backend orig\n", name, 3+i)
	}
	return b.String()
}

// StartHAProxy runs the capture tests' sidecar: haproxy inside s as
// uid/gid, announcing original destinations with PROXY lines.
func (s *NS) StartHAProxy(t TB, uid, gid uint32, outPort, inPort uint16) {
	t.Helper()
	s.StartSidecar(t, Sidecar{UID: uid, GID: gid, OutPort: outPort, InPort: inPort, SendProxy: true})
}

// StartSidecar runs Debian's haproxy inside s as the pod's sidecar,
// dropping to sc.UID/GID after binding, and waits until both ports listen.
func (s *NS) StartSidecar(t TB, sc Sidecar) {
	t.Helper()
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		t.Fatalf("haproxy not installed (run make tools): %v", err)
	}
	cfg := filepath.Join(t.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(cfg, []byte(HAProxyConfig(sc)), 0o644); err != nil {
		t.Fatalf("write haproxy config: %v", err)
	}
	// Wait for both listeners by looking, not by connecting: a connection
	// that is not redirected would make haproxy proxy to itself.
	s.StartListening(t, sc.Cgroup, []string{fmt.Sprintf("0.0.0.0:%d", sc.OutPort), fmt.Sprintf("0.0.0.0:%d", sc.InPort)}, bin, "-db", "-f", cfg)
}

// StartListening runs name in s's netns, born in cgroup when it is set (so
// capture applies from its first instruction), stops it at cleanup, and
// returns once `ss` in the netns shows every address in listen (e.g.
// "0.0.0.0:8080", or ":8080" for any address). It looks instead of connecting: a test connection could
// itself be captured.
func (s *NS) StartListening(t TB, cgroup string, listen []string, name string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := s.Command(ctx, name, args...)
	var out Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	closeCg, err := InCgroup(cmd, cgroup)
	if err != nil {
		cancel()
		t.Fatalf("%s: %v", filepath.Base(name), err)
	}
	err = cmd.Start()
	closeCg()
	if err != nil {
		cancel()
		t.Fatalf("start %s: %v", filepath.Base(name), err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	for range 400 {
		select {
		case <-done:
			t.Fatalf("%s exited: %s", filepath.Base(name), out.String())
		default:
		}
		ss, _ := exec.Command("ip", "netns", "exec", s.Name, "ss", "-Hltn").Output()
		if allListening(string(ss), listen) {
			return
		}
		time.Sleep(25 * time.Millisecond)
	}
	t.Fatalf("%s not listening on %v: %s", filepath.Base(name), listen, out.String())
}

func allListening(ss string, listen []string) bool {
	for _, a := range listen {
		if !strings.Contains(ss, a+" ") {
			return false
		}
	}
	return true
}

// Buffer collects a child's output while tests read it.
type Buffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *Buffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *Buffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// InCgroup makes cmd start inside the cgroup v2 directory dir (clone3's
// CLONE_INTO_CGROUP), so it is captured from its first instruction; an
// empty dir changes nothing. Call the returned func after cmd.Start.
func InCgroup(cmd *exec.Cmd, dir string) (func(), error) {
	if dir == "" {
		return func() {}, nil
	}
	fd, err := syscall.Open(dir, syscall.O_DIRECTORY|syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open cgroup %s: %w", dir, err)
	}
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.UseCgroupFD = true
	cmd.SysProcAttr.CgroupFD = fd
	return func() { syscall.Close(fd) }, nil
}

// FrontendSessions reads, from a haproxy stats socket, how many sessions
// each frontend has accepted so far (the stats' "stot" column).
func FrontendSessions(socket string) (map[string]int, error) {
	c, err := net.DialTimeout("unix", socket, 2*time.Second)
	if err != nil {
		return nil, fmt.Errorf("haproxy stats: %w", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(c, "show stat\n"); err != nil {
		return nil, fmt.Errorf("haproxy stats: %w", err)
	}
	raw, err := io.ReadAll(c)
	if err != nil {
		return nil, fmt.Errorf("haproxy stats: %w", err)
	}
	return ParseFrontendSessions(string(raw))
}

// ParseFrontendSessions reads haproxy's `show stat` CSV: the header names
// the columns ("# pxname,svname,...,stot,..."), FRONTEND rows carry each
// frontend's total sessions.
func ParseFrontendSessions(csv string) (map[string]int, error) {
	lines := strings.Split(strings.TrimSpace(csv), "\n")
	if len(lines) == 0 || !strings.HasPrefix(lines[0], "# ") {
		return nil, fmt.Errorf("haproxy stats: no header line")
	}
	cols := strings.Split(strings.TrimPrefix(lines[0], "# "), ",")
	stot := -1
	for i, c := range cols {
		if c == "stot" {
			stot = i
		}
	}
	if stot < 2 {
		return nil, fmt.Errorf("haproxy stats: no stot column")
	}
	out := map[string]int{}
	for _, l := range lines[1:] {
		f := strings.Split(l, ",")
		if len(f) <= stot || f[1] != "FRONTEND" {
			continue
		}
		n, err := strconv.Atoi(f[stot])
		if err != nil {
			return nil, fmt.Errorf("haproxy stats: frontend %s stot %q: %w", f[0], f[stot], err)
		}
		out[f[0]] = n
	}
	return out, nil
}

// Conn is one connection a haproxy stand-in logged (Sidecar.LogConnections).
type Conn struct {
	Frontend string         // "outbound", "inbound", ...
	Client   netip.Addr     // the accepted connection's peer
	OrigDst  netip.AddrPort // where haproxy sent it: SO_ORIGINAL_DST
}

// ParseConnLog reads the "conn <frontend> <client> <dst ip:port>" lines
// from a haproxy stand-in's output and ignores everything else.
func ParseConnLog(out string) []Conn {
	var conns []Conn
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) != 4 || f[0] != "conn" {
			continue
		}
		c := Conn{Frontend: f[1]}
		c.Client, _ = netip.ParseAddr(f[2])
		c.OrigDst, _ = netip.ParseAddrPort(f[3])
		conns = append(conns, c)
	}
	return conns
}
