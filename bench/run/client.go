package run

import (
	"fmt"
	"os"
	"time"
)

// ClientResult is what a `sidelane-bench` traffic subcommand prints (one
// JSON object on stdout) for the runner to read.
type ClientResult struct {
	LatNs       []int64 `json:"latNs,omitempty"`
	BytesPerSec float64 `json:"bytesPerSec,omitempty"`
	Errors      int     `json:"errors,omitempty"`
	Seconds     float64 `json:"seconds,omitempty"`
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
