package main

import (
	"encoding/json"
	"strings"
	"testing"
)

func events(t *testing.T, evs ...event) string {
	t.Helper()
	var b strings.Builder
	for _, e := range evs {
		j, err := json.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		b.Write(j)
		b.WriteByte('\n')
	}
	return b.String()
}

// TestProgressShowsFailureMessages: with -progress a failing subtest's
// messages come at the end, a passing one's Logf does not, and the RUN
// and verdict lines come as they happen; -log gets the whole text.
func TestProgressShowsFailureMessages(t *testing.T) {
	p := "example.com/p"
	in := events(t,
		event{Action: "run", Package: p, Test: "TestA"},
		event{Action: "output", Package: p, Test: "TestA", Output: "=== RUN   TestA\n"},
		event{Action: "run", Package: p, Test: "TestA/ok"},
		event{Action: "output", Package: p, Test: "TestA/ok", Output: "=== RUN   TestA/ok\n"},
		event{Action: "output", Package: p, Test: "TestA/ok", Output: "    a_test.go:1: informational\n"},
		event{Action: "run", Package: p, Test: "TestA/bad"},
		event{Action: "output", Package: p, Test: "TestA/bad", Output: "=== RUN   TestA/bad\n"},
		event{Action: "output", Package: p, Test: "TestA/bad", Output: "    a_test.go:2: the stream broke\n"},
		event{Action: "output", Package: p, Test: "TestA/ok", Output: "    --- PASS: TestA/ok (0.00s)\n"},
		event{Action: "pass", Package: p, Test: "TestA/ok"},
		event{Action: "output", Package: p, Test: "TestA/bad", Output: "    --- FAIL: TestA/bad (0.00s)\n"},
		event{Action: "fail", Package: p, Test: "TestA/bad"},
		event{Action: "output", Package: p, Test: "TestA", Output: "--- FAIL: TestA (0.00s)\n"},
		event{Action: "fail", Package: p, Test: "TestA"},
		event{Action: "fail", Package: p},
	)
	var out, log strings.Builder
	if n := summarize(strings.NewReader(in), &out, options{progress: true, log: &log}); n != 1 {
		t.Errorf("failed = %d, want 1", n)
	}
	got := out.String()
	run := strings.Index(got, "=== RUN   TestA/bad\n")
	msg := strings.Index(got, "a_test.go:2: the stream broke")
	if run < 0 || msg < 0 || msg < strings.Index(got, "--- FAIL "+p+" TestA/bad") {
		t.Errorf("progress lines, then the failure with its message, expected:\n%s", got)
	}
	if strings.Contains(got, "informational") {
		t.Errorf("a passing test's log printed:\n%s", got)
	}
	if !strings.HasSuffix(got, "1 passed, 1 failed, 0 skipped\n") {
		t.Errorf("summary line:\n%s", got)
	}
	if !strings.Contains(log.String(), "informational") || !strings.Contains(log.String(), "--- FAIL: TestA (0.00s)") {
		t.Errorf("log lacks the text:\n%s", log.String())
	}
}
