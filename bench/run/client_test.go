package run

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// A helper's Fatalf ends the scenario with its message as the error;
// other panics are not swallowed.
func TestGuard(t *testing.T) {
	tb := benchTB{r: &Runner{}}
	err := guard(func() error {
		tb.Fatalf("pod %d: %v", 3, errors.New("boom"))
		return nil
	})
	if err == nil || !strings.Contains(err.Error(), "pod 3: boom") {
		t.Fatalf("guard = %v", err)
	}
	if err := guard(func() error { return nil }); err != nil {
		t.Fatalf("guard = %v", err)
	}
	defer func() {
		if recover() == nil {
			t.Fatal("a foreign panic was swallowed")
		}
	}()
	_ = guard(func() error { panic("not ours") })
}

func TestNanosRoundTrip(t *testing.T) {
	d := []time.Duration{time.Microsecond, 3 * time.Millisecond}
	got := durations(Nanos(d))
	if len(got) != 2 || got[0] != d[0] || got[1] != d[1] {
		t.Fatalf("got %v", got)
	}
}

func TestParseCPUUsage(t *testing.T) {
	got, err := ParseCPUUsage([]byte("usage_usec 12345\nuser_usec 10000\nsystem_usec 2345\n"))
	if err != nil || got != 12345 {
		t.Fatalf("got %d, %v", got, err)
	}
	for _, bad := range []string{"", "user_usec 1\n", "usage_usec x\n"} {
		if _, err := ParseCPUUsage([]byte(bad)); err == nil {
			t.Errorf("no error for %q", bad)
		}
	}
}
