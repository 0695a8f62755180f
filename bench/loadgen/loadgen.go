// Package loadgen is the benchmark's traffic: a server and clients for
// request/response latency, stream throughput and connection churn over
// plain TCP. Each connection starts with a one-byte mode and a 4-byte size,
// so one server serves every scenario.
package loadgen

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"time"
)

// Connection modes.
const (
	modeRR     = 'R' // echo size-byte messages until EOF
	modeSink   = 'S' // read until EOF, then reply with the byte count
	modeOnce   = 'C' // one size-byte request, one reply, close
	headerSize = 5
)

// Serve accepts connections on ln until ctx ends.
func Serve(ctx context.Context, ln net.Listener) error {
	context.AfterFunc(ctx, func() { ln.Close() })
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			_ = serveConn(c)
		}()
	}
}

func serveConn(c net.Conn) error {
	var hdr [headerSize]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return err
	}
	size := int(binary.BigEndian.Uint32(hdr[1:]))
	if size > 16<<20 {
		return fmt.Errorf("size %d too large", size)
	}
	switch hdr[0] {
	case modeRR, modeOnce:
		buf := make([]byte, size)
		for {
			if _, err := io.ReadFull(c, buf); err != nil {
				return nil
			}
			if _, err := c.Write(buf); err != nil {
				return err
			}
			if hdr[0] == modeOnce {
				return nil
			}
		}
	case modeSink:
		n, err := io.Copy(io.Discard, c)
		if err != nil {
			return err
		}
		var out [8]byte
		binary.BigEndian.PutUint64(out[:], uint64(n))
		_, err = c.Write(out[:])
		return err
	}
	return fmt.Errorf("unknown mode %q", hdr[0])
}

func header(mode byte, size int) []byte {
	h := make([]byte, headerSize)
	h[0] = mode
	binary.BigEndian.PutUint32(h[1:], uint32(size))
	return h
}

// Window marks the measured part of a run (after connecting and warming
// up, until the last byte is confirmed), e.g. to read CPU counters there;
// nil funcs are skipped.
type Window struct{ Begin, End func() }

func (w Window) begin() {
	if w.Begin != nil {
		w.Begin()
	}
}

func (w Window) end() {
	if w.End != nil {
		w.End()
	}
}

// RRConn is a persistent request/response connection: Run measures
// batches of round trips on it, so a long-lived client can alternate
// short batches with other contenders' on the same connection.
type RRConn struct {
	c   net.Conn
	buf []byte
}

// Network splits an address into net.Dial's network and address:
// "unix:PATH" is a Unix stream socket (the bench's transport floor),
// anything else TCP.
func Network(addr string) (network, address string) {
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		return "unix", p
	}
	return "tcp", addr
}

func dial(ctx context.Context, d *net.Dialer, addr string) (net.Conn, error) {
	network, address := Network(addr)
	return d.DialContext(ctx, network, address)
}

// DialRR connects to addr for size-byte round trips.
func DialRR(ctx context.Context, addr string, size int) (*RRConn, error) {
	var d net.Dialer
	c, err := dial(ctx, &d, addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	if _, err := c.Write(header(modeRR, size)); err != nil {
		c.Close()
		return nil, err
	}
	return &RRConn{c: c, buf: make([]byte, size)}, nil
}

// Close closes the connection.
func (r *RRConn) Close() error { return r.c.Close() }

// Run does warmup round trips (not recorded), then count, inside w.
func (r *RRConn) Run(ctx context.Context, warmup, count int, w Window) ([]time.Duration, error) {
	for i := range warmup {
		if err := r.once(); err != nil {
			return nil, fmt.Errorf("warm-up round trip %d: %w", i, err)
		}
	}
	out := make([]time.Duration, 0, count)
	w.begin()
	for i := range count {
		start := time.Now()
		if err := r.once(); err != nil {
			return nil, fmt.Errorf("round trip %d: %w", i, err)
		}
		out = append(out, time.Since(start))
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}
	w.end()
	return out, nil
}

func (r *RRConn) once() error {
	if _, err := r.c.Write(r.buf); err != nil {
		return err
	}
	_, err := io.ReadFull(r.c, r.buf)
	return err
}

// RR measures round trips of size-byte messages on one persistent
// connection: warmup round trips first (not recorded), then count.
func RR(ctx context.Context, addr string, size, warmup, count int, w Window) ([]time.Duration, error) {
	c, err := DialRR(ctx, addr, size)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return c.Run(ctx, warmup, count, w)
}

// Stream writes writeSize-byte chunks for d and returns the bytes per
// second the server confirmed receiving.
func Stream(ctx context.Context, addr string, writeSize int, d time.Duration, w Window) (float64, error) {
	var dialer net.Dialer
	c, err := dial(ctx, &dialer, addr)
	if err != nil {
		return 0, fmt.Errorf("dial %s: %w", addr, err)
	}
	defer c.Close()
	if _, err := c.Write(header(modeSink, 0)); err != nil {
		return 0, err
	}
	buf := make([]byte, writeSize)
	w.begin()
	start := time.Now()
	for time.Since(start) < d {
		if _, err := c.Write(buf); err != nil {
			return 0, err
		}
	}
	if hc, ok := c.(interface{ CloseWrite() error }); ok {
		_ = hc.CloseWrite()
	}
	var n [8]byte
	if _, err := io.ReadFull(c, n[:]); err != nil {
		return 0, fmt.Errorf("read byte count: %w", err)
	}
	w.end()
	return float64(binary.BigEndian.Uint64(n[:])) / time.Since(start).Seconds(), nil
}

// CRRResult is connection churn: a new connection per request.
type CRRResult struct {
	Conns     int             `json:"conns"`
	Errors    int             `json:"errors"`
	PerSecond float64         `json:"connsPerSecond"`
	Latencies []time.Duration `json:"-"`
}

// CRR runs parallel clients for d, each opening a connection, doing one
// size-byte request/response and closing.
func CRR(ctx context.Context, addr string, size, parallel int, d time.Duration, w Window) (CRRResult, error) {
	var mu sync.Mutex
	var res CRRResult
	var wg sync.WaitGroup
	w.begin()
	deadline := time.Now().Add(d)
	start := time.Now()
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, size)
			var lat []time.Duration
			errs := 0
			for time.Now().Before(deadline) && ctx.Err() == nil {
				t0 := time.Now()
				if err := once(ctx, addr, buf); err != nil {
					errs++
					continue
				}
				lat = append(lat, time.Since(t0))
			}
			mu.Lock()
			res.Latencies = append(res.Latencies, lat...)
			res.Errors += errs
			mu.Unlock()
		}()
	}
	wg.Wait()
	w.end()
	res.Conns = len(res.Latencies)
	res.PerSecond = float64(res.Conns) / time.Since(start).Seconds()
	if res.Conns == 0 {
		return res, fmt.Errorf("no connection to %s succeeded (%d errors)", addr, res.Errors)
	}
	return res, nil
}

func once(ctx context.Context, addr string, buf []byte) error {
	var d net.Dialer
	c, err := dial(ctx, &d, addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := c.Write(append(header(modeOnce, len(buf)), buf...)); err != nil {
		return err
	}
	_, err = io.ReadFull(c, buf)
	return err
}

// Percentiles summarises latencies.
type Percentiles struct {
	Count int     `json:"count"`
	P50us float64 `json:"p50us"`
	P90us float64 `json:"p90us"`
	P99us float64 `json:"p99us"`
}

// Summarize computes p50/p90/p99 in microseconds.
func Summarize(d []time.Duration) Percentiles {
	if len(d) == 0 {
		return Percentiles{}
	}
	s := slices.Clone(d)
	slices.Sort(s)
	at := func(q float64) float64 {
		i := int(q * float64(len(s)-1))
		return float64(s[i].Nanoseconds()) / 1e3
	}
	return Percentiles{Count: len(s), P50us: at(0.50), P90us: at(0.90), P99us: at(0.99)}
}

// Connect measures count TCP handshakes to addr (until connect returns).
// After each, untimed, it completes a 1-byte request/response before
// closing, so a proxy on the path has taken the connection through (read
// its original destination, connected upstream) before it goes away: a
// connection closed first would measure the proxy's handling of an
// abandoned connection instead (seen with haproxy under eBPF capture,
// where SO_ORIGINAL_DST is gone once the client closed: haproxy kept such
// connections until its maxconn was full).
func Connect(ctx context.Context, addr string, count int) ([]time.Duration, error) {
	out := make([]time.Duration, 0, count)
	var d net.Dialer
	buf := []byte{1}
	for range count {
		t0 := time.Now()
		c, err := dial(ctx, &d, addr)
		if err != nil {
			return nil, fmt.Errorf("dial %s: %w", addr, err)
		}
		out = append(out, time.Since(t0))
		_, err = c.Write(append(header(modeOnce, 1), buf...))
		if err == nil {
			_, err = io.ReadFull(c, buf)
		}
		c.Close()
		if err != nil {
			return nil, fmt.Errorf("request after connect %s: %w", addr, err)
		}
	}
	return out, nil
}
