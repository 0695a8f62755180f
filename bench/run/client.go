package run

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"
)

// ClientResult is what a `sidelane-bench` traffic subcommand prints (one
// JSON object on stdout) for the runner to read.
type ClientResult struct {
	LatNs       []int64 `json:"latNs,omitempty"`
	BytesPerSec float64 `json:"bytesPerSec,omitempty"`
	Errors      int     `json:"errors,omitempty"`
	Seconds     float64 `json:"seconds,omitempty"`
	// CPUUsec is the CPU time (cgroup v2 cpu.stat usage_usec: user +
	// system) that the cgroups handed to the client (-cpu-fds) used during
	// the measured window, which lasted WindowSec.
	CPUUsec   float64 `json:"cpuUsec,omitempty"`
	WindowSec float64 `json:"windowSec,omitempty"`
	// Error is a session command's failure (the session goes on).
	Error string `json:"error,omitempty"`
}

// ParseCPUUsage reads usage_usec from a cgroup v2 cpu.stat.
func ParseCPUUsage(b []byte) (int64, error) {
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "usage_usec "); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("cpu.stat usage_usec %q: %w", v, err)
			}
			return n, nil
		}
	}
	return 0, errors.New("cpu.stat has no usage_usec")
}

// CPUMeter sums usage_usec over open cpu.stat files (re-read in place).
type CPUMeter struct{ Files []*os.File }

// Read is the summed usage_usec now.
func (m CPUMeter) Read() (int64, error) {
	var sum int64
	buf := make([]byte, 4096)
	for _, f := range m.Files {
		n, err := f.ReadAt(buf, 0)
		if err != nil && !errors.Is(err, io.EOF) {
			return 0, fmt.Errorf("read %s: %w", f.Name(), err)
		}
		u, err := ParseCPUUsage(buf[:n])
		if err != nil {
			return 0, err
		}
		sum += u
	}
	return sum, nil
}

// Nanos turns latencies into nanoseconds for ClientResult.
func Nanos(d []time.Duration) []int64 {
	out := make([]int64, len(d))
	for i, x := range d {
		out[i] = x.Nanoseconds()
	}
	return out
}

func durations(ns []int64) []time.Duration {
	out := make([]time.Duration, len(ns))
	for i, x := range ns {
		out[i] = time.Duration(x)
	}
	return out
}

// fatal is how benchTB.Fatalf ends a scenario: Run recovers it.
type fatal struct{ err error }

// benchTB lets the runner use helpers written for tests (package podnet):
// Fatalf ends the current scenario, Cleanup runs when it ends.
type benchTB struct{ r *Runner }

func (benchTB) Helper() {}

func (b benchTB) Fatalf(format string, args ...any) { panic(fatal{fmt.Errorf(format, args...)}) }

func (b benchTB) Logf(format string, args ...any) { b.r.log.Debug(fmt.Sprintf(format, args...)) }

func (b benchTB) Cleanup(f func()) { b.r.cleanup(f) }

func (b benchTB) TempDir() string {
	d, err := os.MkdirTemp("", "sidelane-bench-")
	if err != nil {
		b.Fatalf("temp dir: %v", err)
	}
	b.r.cleanup(func() { os.RemoveAll(d) })
	return d
}

// guard runs f, turning a benchTB.Fatalf inside it into an error.
func guard(f func() error) (err error) {
	defer func() {
		if p := recover(); p != nil {
			f, ok := p.(fatal)
			if !ok {
				panic(p)
			}
			err = f.err
		}
	}()
	return f()
}
