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
