package loadgen

import (
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"
)

func TestLoadgenOverLoopback(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	testLoadgen(t, ln, ln.Addr().String())
}

// The transport floor's apps speak the same protocol over Unix sockets.
func TestLoadgenOverUnixSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "app.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	testLoadgen(t, ln, "unix:"+path)
}

func TestNetwork(t *testing.T) {
	for addr, want := range map[string][2]string{
		"10.0.0.1:8080":    {"tcp", "10.0.0.1:8080"},
		"unix:/run/x.sock": {"unix", "/run/x.sock"},
		"[::1]:80":         {"tcp", "[::1]:80"},
	} {
		if n, a := Network(addr); n != want[0] || a != want[1] {
			t.Errorf("Network(%q) = %q, %q, want %q", addr, n, a, want)
		}
	}
}

func testLoadgen(t *testing.T, ln net.Listener, addr string) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- Serve(ctx, ln) }()
	defer func() { cancel(); <-done }()
	// Every run opens and closes its measured window exactly once.
	var begins, ends int
	w := Window{Begin: func() { begins++ }, End: func() { ends++ }}
	windows := func(what string, want int) {
		t.Helper()
		if begins != want || ends != want {
			t.Fatalf("%s: window begun %d and ended %d times, want %d", what, begins, ends, want)
		}
	}

	lat, err := RR(ctx, addr, 1024, 10, 100, w)
	if err != nil || len(lat) != 100 {
		t.Fatalf("rr: %d samples, %v", len(lat), err)
	}
	if p := Summarize(lat); p.Count != 100 || p.P50us <= 0 || p.P99us < p.P50us {
		t.Fatalf("summary: %+v", p)
	}
	windows("rr", 1)
	bps, err := Stream(ctx, addr, 64<<10, 100*time.Millisecond, w)
	if err != nil || bps <= 0 {
		t.Fatalf("stream: %v %v", bps, err)
	}
	windows("stream", 2)
	crr, err := CRR(ctx, addr, 1024, 2, 100*time.Millisecond, w)
	if err != nil || crr.Conns == 0 || crr.Errors != 0 {
		t.Fatalf("crr: %+v %v", crr, err)
	}
	windows("crr", 3)
	conns, err := Connect(ctx, addr, 20)
	if err != nil || len(conns) != 20 {
		t.Fatalf("connect: %d samples, %v", len(conns), err)
	}
	ln2, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln2.Addr().String()
	ln2.Close()
	if _, err := Connect(ctx, closed, 1); err == nil {
		t.Fatal("connect to a closed port succeeded")
	}
}

func TestSummarize(t *testing.T) {
	var d []time.Duration
	for i := 1; i <= 100; i++ {
		d = append(d, time.Duration(i)*time.Microsecond)
	}
	p := Summarize(d)
	if p.P50us != 50 || p.P90us != 90 || p.P99us != 99 {
		t.Fatalf("%+v", p)
	}
}
