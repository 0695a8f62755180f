//go:build linux

package bpf

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The shortcut's byte stream contract, on loopback pairs inside the
// enrolled pod (both ends join the shortcut once they have exchanged
// requests and responses): every byte arrives once and in order in both
// directions, across the switches between TCP and redirect (the late join,
// a stream detected, request/response again) while the reader lags
// behind, across half-close, with large writes, many connections at once,
// and connections closed mid-stream.
func TestShortcutByteExact(t *testing.T) {
	e := newEnv(t)
	e.enroll(defaultSettings())
	e.runPairs(t, "24", 2*18) // 18 of the 24 connections exchange requests and responses
	got, err := e.cap.Counters(e.cookie)
	if err != nil {
		t.Fatal(err)
	}
	// Both ways were taken: request/response redirected, streams back on TCP.
	if got.ShortcutMessages == 0 || got.ShortcutToTCP == 0 {
		t.Errorf("counters %+v: want redirected messages and switches to TCP", got)
	}
}

// A request/response exchange keeps the shortcut for every message once
// both ends joined: only the first send after the join goes TCP (the peer
// has not yet shown what it read), and no socket switches back to TCP.
func TestShortcutKeepsRequestResponse(t *testing.T) {
	e := newEnv(t)
	e.enroll(defaultSettings())
	e.runPairs(t, "rr", 2)
	got, err := e.cap.Counters(e.cookie)
	if err != nil {
		t.Fatal(err)
	}
	if want := uint64(2*rrRounds - 1); got.ShortcutMessages < want || got.ShortcutToTCP != 0 {
		t.Errorf("counters %+v: want >= %d redirected messages, 0 switches to TCP", got, want)
	}
}

// A socket that sent by TCP what its peer has not read yet never
// redirects until the peer has read it: the peer reads its redirect queue
// first, so the redirect would overtake those bytes. Here the peer sends
// (which ends the client's run of sends) without reading first; the
// client's next message must queue behind its unread TCP bytes. Once the
// peer has read everything, the client redirects again.
func TestShortcutNeverOvertakesUnreadTCP(t *testing.T) {
	e := newEnv(t)
	e.enroll(defaultSettings())
	e.runPairs(t, "overtake", 2)
	got, err := e.cap.Counters(e.cookie)
	if err != nil {
		t.Fatal(err)
	}
	if got.ShortcutMessages < 3 {
		t.Errorf("counters %+v: want >= 3 redirected messages (the server's two, the client's last)", got)
	}
}

// Only request/response sockets join: a stream and short connections
// (one request and response each) never ask, so they never pay for the
// sockhash.
func TestShortcutJoinsOnlyRequestResponse(t *testing.T) {
	e := newEnv(t)
	e.enroll(defaultSettings())
	e.runPairs(t, "kinds", 2)
	if got := e.cap.ShortcutJoins(); got.Joined != 2 || got.Missed != 0 || got.NoNetns != 0 {
		t.Errorf("joins %+v after a stream, 20 short connections and one request/response connection: want 2 joined, none missed", got)
	}
}

const rrRounds = 200

// runPairs runs pairsHelper in the pod (see runGated).
func (e *env) runPairs(t *testing.T, arg string, wantJoins uint64) {
	t.Helper()
	e.runGated(t, e.app("pairs", arg, false), wantJoins)
}

// runGated runs cmd, a helper that prints "gate" when every connection
// that will join has exchanged enough requests and responses, and then
// waits for a line on stdin: it waits until the agent side has joined
// wantJoins sockets before it lets the helper go on. It returns what the
// helper printed after the gate.
func (e *env) runGated(t *testing.T, cmd *exec.Cmd, wantJoins uint64) string {
	t.Helper()
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(stdout)
	line, _ := r.ReadString('\n')
	if strings.TrimSpace(line) == "gate" {
		deadline := time.Now().Add(10 * time.Second)
		for e.cap.ShortcutJoins().Joined < wantJoins && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if got := e.cap.ShortcutJoins(); got.Joined < wantJoins {
			t.Errorf("joins %+v at the gate: want %d joined", got, wantJoins)
		}
		line = ""
	}
	fmt.Fprintln(stdin, "go")
	stdin.Close()
	rest, _ := io.ReadAll(r)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("%v: %v: %s", cmd.Args, err, stderr.String())
	}
	return line + string(rest)
}

// gate holds n clients until the test lets them go: the last to arrive
// prints "gate" and waits for a line on stdin.
type gate struct {
	mu      sync.Mutex
	n       int
	release chan struct{}
}

func newGate(n int) *gate { return &gate{n: n, release: make(chan struct{})} }

func (g *gate) wait() {
	g.mu.Lock()
	g.n--
	last := g.n == 0
	g.mu.Unlock()
	if last {
		fmt.Println("gate")
		bufio.NewReader(os.Stdin).ReadString('\n')
		close(g.release)
	}
	<-g.release
}

// pairsHelper runs in the pod: a loopback server and clients exchanging
// seeded pseudo-random data, each side checking every byte. arg is the
// number of concurrent connections, "rr" for one request/response
// connection, "overtake" or "kinds" (see the tests).
func pairsHelper(arg string) int {
	switch arg {
	case "overtake":
		return report(overtakeHelper())
	case "kinds":
		return report(kindsHelper())
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer ln.Close()
	var mu sync.Mutex
	var serverErrs []error
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if err := pairServer(c.(*net.TCPConn)); err != nil {
					mu.Lock()
					serverErrs = append(serverErrs, fmt.Errorf("server: %w", err))
					mu.Unlock()
				}
			}()
		}
	}()
	addr := ln.Addr().String()
	serverErr := func() error {
		time.Sleep(100 * time.Millisecond) // the last handlers finish
		mu.Lock()
		defer mu.Unlock()
		return errors.Join(serverErrs...)
	}
	if arg == "rr" {
		return report(errors.Join(rrClient(addr, rrRounds, newGate(1)), serverErr()))
	}
	n, _ := strconv.Atoi(arg)
	g := newGate(n - n/4)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if i%4 == 3 {
				errs <- abortClient(addr, uint64(i))
			} else {
				errs <- pairClient(addr, uint64(i), g)
			}
		}()
	}
	wg.Wait()
	close(errs)
	all := []error{serverErr()}
	for err := range errs {
		all = append(all, err)
	}
	return report(errors.Join(all...))
}

// loopbackPair is a connected client and server socket on loopback.
func loopbackPair() (client, server *net.TCPConn, err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, nil, err
	}
	defer ln.Close()
	c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
	if err != nil {
		return nil, nil, err
	}
	s, err := ln.Accept()
	if err != nil {
		c.Close()
		return nil, nil, err
	}
	for _, x := range []net.Conn{c, s} {
		x.SetDeadline(time.Now().Add(60 * time.Second))
	}
	return c.(*net.TCPConn), s.(*net.TCPConn), nil
}

// exchange does rounds 100-byte round trips from a to b.
func exchange(a, b net.Conn, rounds int) error {
	buf := make([]byte, 100)
	for range rounds {
		if _, err := a.Write(buf); err != nil {
			return err
		}
		if _, err := io.ReadFull(b, buf); err != nil {
			return err
		}
		if _, err := b.Write(buf); err != nil {
			return err
		}
		if _, err := io.ReadFull(a, buf); err != nil {
			return err
		}
	}
	return nil
}

// overtakeHelper: after the join, the client sends 40 KiB-messages (all
// TCP: its peer has not sent since the join), the server sends a byte
// without reading them, the client reads that byte and sends a marker. The
// server must read the 40 messages, then the marker. Then the server,
// having read everything, sends again, and the client's next message
// may (and does) redirect.
func overtakeHelper() error {
	c, s, err := loopbackPair()
	if err != nil {
		return err
	}
	defer c.Close()
	defer s.Close()
	if err := exchange(c, s, 8); err != nil {
		return fmt.Errorf("before the join: %w", err)
	}
	newGate(1).wait()
	msg := func(b byte) []byte { return bytes.Repeat([]byte{b}, 1024) }
	for i := range 40 {
		if _, err := c.Write(msg(byte(i))); err != nil {
			return err
		}
	}
	one := make([]byte, 1)
	if _, err := s.Write([]byte("S")); err != nil {
		return err
	}
	if _, err := io.ReadFull(c, one); err != nil || one[0] != 'S' {
		return fmt.Errorf("client read %q, %v; want S", one, err)
	}
	if _, err := c.Write(msg(0xee)); err != nil {
		return err
	}
	got := make([]byte, 41*1024)
	if _, err := io.ReadFull(s, got); err != nil {
		return err
	}
	for i := range 41 {
		want := byte(i)
		if i == 40 {
			want = 0xee
		}
		if m := got[i*1024 : (i+1)*1024]; !bytes.Equal(m, msg(want)) {
			return fmt.Errorf("message %d read by the server is %#x..., want %#x (a redirect overtook bytes sent by TCP)", i, m[0], want)
		}
	}
	if _, err := s.Write([]byte("T")); err != nil {
		return err
	}
	if _, err := io.ReadFull(c, one); err != nil || one[0] != 'T' {
		return fmt.Errorf("client read %q, %v; want T", one, err)
	}
	if _, err := c.Write(msg(0xdd)); err != nil {
		return err
	}
	last := make([]byte, 1024)
	if _, err := io.ReadFull(s, last); err != nil || !bytes.Equal(last, msg(0xdd)) {
		return fmt.Errorf("last message: %#x..., %v", last[0], err)
	}
	return nil
}

// kindsHelper: a 4 MB stream (one byte back at the end), 20 short
// connections of one 100-byte request and response each, then one
// request/response connection of 20 round trips, the only one that joins.
func kindsHelper() error {
	c, s, err := loopbackPair()
	if err != nil {
		return err
	}
	go func() {
		buf := make([]byte, 64<<10)
		for read := 0; read < 4<<20; {
			n, err := s.Read(buf)
			if err != nil {
				return
			}
			read += n
		}
		s.Write([]byte("k"))
	}()
	chunk := make([]byte, 1024)
	for range 4 << 10 {
		if _, err := c.Write(chunk); err != nil {
			return err
		}
	}
	if _, err := io.ReadFull(c, chunk[:1]); err != nil {
		return fmt.Errorf("stream: %w", err)
	}
	c.Close()
	s.Close()
	for i := range 20 {
		c, s, err := loopbackPair()
		if err != nil {
			return err
		}
		err = exchange(c, s, 1)
		c.Close()
		s.Close()
		if err != nil {
			return fmt.Errorf("short connection %d: %w", i, err)
		}
	}
	c, s, err = loopbackPair()
	if err != nil {
		return err
	}
	defer c.Close()
	defer s.Close()
	if err := exchange(c, s, 20); err != nil {
		return err
	}
	newGate(1).wait()
	return exchange(c, s, 5)
}

func report(err error) int {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// gen is a seeded byte source both ends can replay.
type gen struct{ r *rand.ChaCha8 }

func newGen(seed uint64) *gen {
	var s [32]byte
	copy(s[:], strconv.FormatUint(seed, 10))
	return &gen{rand.NewChaCha8(s)}
}

func (g *gen) bytes(n int) []byte {
	b := make([]byte, n)
	g.r.Read(b)
	return b
}

// The connection's script, by its first byte: 'P' the full exchange, 'A'
// a client that closes mid-stream, 'R' request/response only. Then an
// 8-byte seed.
func pairServer(c *net.TCPConn) error {
	var hdr [9]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return err
	}
	seed, _ := strconv.ParseUint(strings.TrimLeft(string(hdr[1:]), "0"), 10, 64)
	switch hdr[0] {
	case 'R':
		return echo(c, rrRounds+10, newSizes(seed))
	case 'A':
		// Whatever arrives before the reset is a prefix of the stream.
		want := newGen(seed)
		buf := make([]byte, 100<<10)
		for {
			n, err := c.Read(buf)
			if n > 0 && !bytes.Equal(buf[:n], want.bytes(n)) {
				return fmt.Errorf("aborted stream %d: bytes differ", seed)
			}
			if err != nil {
				return nil
			}
		}
	}
	sz := newSizes(seed)
	if err := echo(c, 30, sz); err != nil {
		return err
	}
	// Lag behind the client's stream: its first sends wait in the
	// redirect queue while the later ones queue on TCP behind them.
	time.Sleep(100 * time.Millisecond)
	up := newGen(seed + 1000)
	total := streamTotal(seed)
	buf := make([]byte, 48<<10)
	for read := 0; read < total; {
		n, err := c.Read(buf[:min(len(buf), total-read)])
		if n > 0 && !bytes.Equal(buf[:n], up.bytes(n)) {
			return fmt.Errorf("stream %d: bytes differ at offset %d", seed, read)
		}
		read += n
		if err != nil {
			return fmt.Errorf("stream %d at %d of %d: %w", seed, read, total, err)
		}
	}
	if err := echo(c, 10, sz); err != nil {
		return err
	}
	// Stream down, then half-close; the client's half-close comes after.
	down := newGen(seed + 2000)
	for _, n := range writeSizes(seed + 2000) {
		if _, err := c.Write(down.bytes(n)); err != nil {
			return err
		}
	}
	if err := c.CloseWrite(); err != nil {
		return err
	}
	rest, err := io.ReadAll(c)
	if err != nil || string(rest) != "bye" {
		return fmt.Errorf("after half-close %d: %q, %v; want bye", seed, rest, err)
	}
	return nil
}

// echo answers rounds requests of the sizes sz gives with the same bytes.
func echo(c net.Conn, rounds int, sz *sizes) error {
	for range rounds {
		buf := make([]byte, sz.next())
		if _, err := io.ReadFull(c, buf); err != nil {
			return fmt.Errorf("echo: %w", err)
		}
		if _, err := c.Write(buf); err != nil {
			return err
		}
	}
	return nil
}

type sizes struct{ r *rand.Rand }

func newSizes(seed uint64) *sizes { return &sizes{rand.New(rand.NewPCG(seed, 1))} }

// next is a request size from 1 byte to 70 KB, mostly small.
func (s *sizes) next() int {
	if s.r.IntN(4) == 0 {
		return 1 + s.r.IntN(70000)
	}
	return 1 + s.r.IntN(2048)
}

// writeSizes is a stream's writes: 1 KiB ones, odd small ones, and large
// ones (up to 200 KB, more than one sk_msg).
func writeSizes(seed uint64) []int {
	r := rand.New(rand.NewPCG(seed, 2))
	var out []int
	for range 300 {
		switch r.IntN(10) {
		case 0:
			out = append(out, 1+r.IntN(200000))
		case 1:
			out = append(out, 1+r.IntN(100))
		default:
			out = append(out, 1024)
		}
	}
	return out
}

func streamTotal(seed uint64) int {
	t := 0
	for _, n := range writeSizes(seed + 1000) {
		t += n
	}
	return t
}

func dialScript(addr string, kind byte, seed uint64) (*net.TCPConn, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(60 * time.Second))
	if _, err := c.Write(append([]byte{kind}, fmt.Sprintf("%08d", seed)...)); err != nil {
		c.Close()
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// roundTrips sends rounds requests of the sizes sz gives and checks each
// echo.
func roundTrips(c net.Conn, g *gen, rounds int, sz *sizes) error {
	for i := range rounds {
		req := g.bytes(sz.next())
		if _, err := c.Write(req); err != nil {
			return err
		}
		got := make([]byte, len(req))
		if _, err := io.ReadFull(c, got); err != nil {
			return fmt.Errorf("round %d: %w", i, err)
		}
		if !bytes.Equal(got, req) {
			return fmt.Errorf("round %d: echo differs", i)
		}
	}
	return nil
}

// rrClient does 10 round trips, waits at g (both ends join), then rounds
// more; the server echoes rounds+10.
func rrClient(addr string, rounds int, g *gate) error {
	c, err := dialScript(addr, 'R', 7)
	if err != nil {
		return err
	}
	defer c.Close()
	gen, sz := newGen(7), newSizes(7)
	if err := roundTrips(c, gen, 10, sz); err != nil {
		return err
	}
	g.wait()
	return roundTrips(c, gen, rounds, sz)
}

func pairClient(addr string, seed uint64, gt *gate) error {
	c, err := dialScript(addr, 'P', seed)
	if err != nil {
		return err
	}
	defer c.Close()
	g, sz := newGen(seed+3000), newSizes(seed)
	if err := roundTrips(c, g, 30, sz); err != nil {
		gt.wait()
		return fmt.Errorf("conn %d before the stream: %w", seed, err)
	}
	gt.wait()
	up := newGen(seed + 1000)
	for _, n := range writeSizes(seed + 1000) {
		if _, err := c.Write(up.bytes(n)); err != nil {
			return fmt.Errorf("conn %d stream: %w", seed, err)
		}
	}
	if err := roundTrips(c, g, 10, sz); err != nil {
		return fmt.Errorf("conn %d after the stream: %w", seed, err)
	}
	down := newGen(seed + 2000)
	var total int
	for _, n := range writeSizes(seed + 2000) {
		total += n
	}
	got, err := io.ReadAll(c) // to the server's half-close
	if err != nil {
		return fmt.Errorf("conn %d download: %w", seed, err)
	}
	if len(got) != total || !bytes.Equal(got, down.bytes(total)) {
		return fmt.Errorf("conn %d download: %d bytes, want %d intact", seed, len(got), total)
	}
	if _, err := c.Write([]byte("bye")); err != nil {
		return err
	}
	return c.CloseWrite()
}

// abortClient streams and resets the connection in the middle.
func abortClient(addr string, seed uint64) error {
	c, err := dialScript(addr, 'A', seed)
	if err != nil {
		return err
	}
	g := newGen(seed)
	for i, n := range writeSizes(seed) {
		if i == 150 {
			break
		}
		if _, err := c.Write(g.bytes(n)); err != nil {
			return err
		}
	}
	c.SetLinger(0)
	return c.Close()
}

// The stream-run setting shares settings[0] with the shortcut switch:
// each setter keeps the other's bits, and a run too large is refused.
func TestShortcutSettings(t *testing.T) {
	e := newEnv(t)
	if err := e.cap.SetShortcutStreamRun(1 << 24); err == nil {
		t.Error("stream run 1<<24 accepted, want an error")
	}
	if err := e.cap.SetShortcutStreamRun(5); err != nil {
		t.Fatal(err)
	}
	if err := e.cap.SetShortcut(false); err != nil {
		t.Fatal(err)
	}
	var zero, v uint32
	if err := e.cap.objs.Settings.Lookup(&zero, &v); err != nil {
		t.Fatal(err)
	}
	if v != 5<<settingRunShift {
		t.Errorf("settings = %#x after run 5 and shortcut off, want %#x", v, 5<<settingRunShift)
	}
	if err := e.cap.SetShortcut(true); err != nil {
		t.Fatal(err)
	}
	if err := e.cap.SetShortcutStreamRun(0); err != nil {
		t.Fatal(err)
	}
	if err := e.cap.objs.Settings.Lookup(&zero, &v); err != nil {
		t.Fatal(err)
	}
	if v != settingShortcut {
		t.Errorf("settings = %#x after shortcut on and run 0, want %#x", v, settingShortcut)
	}
}

// The inbound hop: a client on another node reaches the app through the
// sidecar's inbound listener (sk_lookup), whose passthrough connection
// from 127.0.0.6 to the pod's own IP joins the shortcut with the app's
// accepted socket; the remote client's connection, not a same-node pair,
// never does.
func TestShortcutInboundPassthrough(t *testing.T) {
	e := newEnv(t)
	e.startSidecar()
	e.enroll(defaultSettings())
	if err := e.cap.AttachInbound(e.podPath, e.cookie, "eth0"); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("ip", "netns", "exec", e.remNS, os.Args[0], "-test.run=^$", ap(podIP, 8080).String())
	cmd.Env = append(os.Environ(), helperEnv+"=rr")
	r := parseReply(t, e.runGated(t, cmd, 2))
	if r.peer.Addr().Unmap() != netip.MustParseAddr("127.0.0.6") || r.bytes != 50*rrSize {
		t.Fatalf("rr: app saw %s, %d bytes; want the sidecar's passthrough 127.0.0.6, %d bytes", r.peer, r.bytes, 50*rrSize)
	}
	got, err := e.cap.Counters(e.cookie)
	if err != nil {
		t.Fatal(err)
	}
	if got.ShortcutMessages < 40 {
		t.Errorf("counters %+v: want the 40 round trips after the join shortcut between the sidecar and the app", got)
	}
	if j := e.cap.ShortcutJoins(); j.Joined != 2 {
		t.Errorf("joins %+v: want 2 (the passthrough pair only)", j)
	}
}
