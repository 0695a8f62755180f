package run

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sidelane/sidelane/bench/loadgen"
	"github.com/sidelane/sidelane/internal/testenv"
)

// The probe runs the real sidelane-bench server and client over loopback
// (no privilege needed) and reports every round trip it asked for.
func TestHostProbe(t *testing.T) {
	bin := buildBench(t)
	r := New(Config{BenchBin: bin, PinCPUs: true}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	r.recordHostProbe(context.Background(), "start")
	note := r.res.Machine["host_probe"]
	if !strings.HasPrefix(note, "start: loopback 1 KiB rr p50 ") || !strings.Contains(note, "(5000 round trips") {
		t.Fatalf("host_probe = %q, want a start probe of 5000 round trips", note)
	}
	r.recordHostProbe(context.Background(), "end")
	if got := r.res.Machine["host_probe"]; !strings.HasPrefix(got, note+"; end: ") {
		t.Errorf("host_probe = %q, want the start note then the end one", got)
	}

	// A probe that cannot run says so and fails nothing.
	r = New(Config{BenchBin: filepath.Join(t.TempDir(), "missing")}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	r.recordHostProbe(context.Background(), "start")
	if got := r.res.Machine["host_probe"]; !strings.HasPrefix(got, "start: failed: ") {
		t.Errorf("host_probe with no binary = %q, want a failure note", got)
	}
}

func TestHostProbeNote(t *testing.T) {
	got := hostProbeNote("end", loadgen.Percentiles{Count: 5000, P50us: 26.04, P99us: 55.5}, nil)
	if want := "end: loopback 1 KiB rr p50 26.0 µs, p99 55.5 µs (5000 round trips, no pod or proxy)"; got != want {
		t.Errorf("note = %q, want %q", got, want)
	}
	if got := hostProbeNote("start", loadgen.Percentiles{}, errors.New("refused")); got != "start: failed: refused" {
		t.Errorf("failure note = %q", got)
	}
}

// buildBench builds sidelane-bench for a test and returns its path.
func buildBench(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "sidelane-bench")
	build := exec.Command("go", "build", "-o", bin, "./cmd/sidelane-bench")
	build.Dir = testenv.RepoRoot(t)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build sidelane-bench: %v\n%s", err, out)
	}
	return bin
}
