//go:build linux

package bpf

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The shortcut's byte stream contract, on loopback pairs inside the
// enrolled pod (both ends shortcut): every byte arrives once and in order
// in both directions, across the switch from redirect to TCP (a stream
// detected) while the reader lags behind, across half-close, with large
// writes, many connections at once, and connections closed mid-stream.
func TestShortcutByteExact(t *testing.T) {
	e := newEnv(t)
	e.enroll(defaultSettings())
	out, err := e.app("pairs", "24", false).CombinedOutput()
	if err != nil {
		t.Fatalf("pairs: %v: %s", err, out)
	}
	got, err := e.cap.Counters(e.cookie)
	if err != nil {
		t.Fatal(err)
	}
	// Both ways were taken: request/response redirected, streams back on TCP.
	if got.ShortcutMessages == 0 || got.ShortcutToTCP == 0 {
		t.Errorf("counters %+v: want redirected messages and sockets switched to TCP", got)
	}
}

// A request/response exchange keeps the shortcut for every message: no
// socket goes back to TCP when it never sends many messages in a row.
func TestShortcutKeepsRequestResponse(t *testing.T) {
	e := newEnv(t)
	e.enroll(defaultSettings())
	out, err := e.app("pairs", "rr", false).CombinedOutput()
	if err != nil {
		t.Fatalf("pairs rr: %v: %s", err, out)
	}
	got, err := e.cap.Counters(e.cookie)
	if err != nil {
		t.Fatal(err)
	}
	if want := uint64(2 * rrRounds); got.ShortcutMessages < want || got.ShortcutToTCP != 0 {
		t.Errorf("counters %+v: want >= %d redirected messages, 0 sockets switched to TCP", got, want)
	}
}

const rrRounds = 200

// pairsHelper runs in the pod: a loopback server and clients exchanging
// seeded pseudo-random data, each side checking every byte. arg is the
// number of concurrent connections, or "rr" for one request/response
// connection.
func pairsHelper(arg string) int {
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
		return report(errors.Join(rrClient(addr, rrRounds), serverErr()))
	}
	n, _ := strconv.Atoi(arg)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if i%4 == 3 {
				errs <- abortClient(addr, uint64(i))
			} else {
				errs <- pairClient(addr, uint64(i))
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
		return echo(c, rrRounds, newSizes(seed))
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

func rrClient(addr string, rounds int) error {
	c, err := dialScript(addr, 'R', 7)
	if err != nil {
		return err
	}
	defer c.Close()
	return roundTrips(c, newGen(7), rounds, newSizes(7))
}

func pairClient(addr string, seed uint64) error {
	c, err := dialScript(addr, 'P', seed)
	if err != nil {
		return err
	}
	defer c.Close()
	g, sz := newGen(seed+3000), newSizes(seed)
	if err := roundTrips(c, g, 30, sz); err != nil {
		return fmt.Errorf("conn %d before the stream: %w", seed, err)
	}
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
