package run

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"
)

// An interrupt ends the run after the scenario it hit: no later scenario
// starts on the cancelled ctx, each left is listed as not run, and the
// machine notes say where the run stopped.
func TestRunScenariosStopsOnInterrupt(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var ran []string
	sc := func(name string, f func(context.Context) error) scenario {
		return scenario{name, func(ctx context.Context) error { ran = append(ran, name); return f(ctx) }}
	}
	ok := func(context.Context) error { return nil }
	r := New(Config{Only: []string{"a", "b", "d"}}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	interrupted := r.runScenarios(ctx, []scenario{
		sc("a", ok),
		sc("b", func(ctx context.Context) error { cancel(); return ctx.Err() }),
		sc("c", ok), // not selected
		sc("d", ok),
	})
	if !interrupted {
		t.Fatal("runScenarios = false after the ctx was cancelled")
	}
	if strings.Join(ran, ",") != "a,b" {
		t.Errorf("ran %v, want a,b (nothing after the interrupt)", ran)
	}
	if got := r.res.Machine["interrupted"]; !strings.HasPrefix(got, "during b: ") {
		t.Errorf(`Machine["interrupted"] = %q, want "during b: ..."`, got)
	}
	want := map[string]string{"b": "failed: interrupted: " + context.Canceled.Error(), "d": "not run: the run was interrupted"}
	if len(r.res.Pending) != len(want) {
		t.Fatalf("pending = %+v, want b and d", r.res.Pending)
	}
	for _, p := range r.res.Pending {
		if want[p.Scenario] != p.Reason {
			t.Errorf("pending %s: %q, want %q", p.Scenario, p.Reason, want[p.Scenario])
		}
	}
}

func TestRunScenariosUninterrupted(t *testing.T) {
	var ran []string
	r := New(Config{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	fail := errors.New("no route")
	interrupted := r.runScenarios(context.Background(), []scenario{
		{"a", func(context.Context) error { ran = append(ran, "a"); return fail }},
		{"b", func(context.Context) error { ran = append(ran, "b"); return nil }},
	})
	if interrupted || r.res.Machine["interrupted"] != "" {
		t.Errorf("interrupted = %v, note %q, want neither", interrupted, r.res.Machine["interrupted"])
	}
	if strings.Join(ran, ",") != "a,b" {
		t.Errorf("ran %v, want a,b (a failure is not an interrupt)", ran)
	}
	if len(r.res.Pending) != 1 || r.res.Pending[0].Reason != "failed: no route" {
		t.Errorf("pending = %+v, want a's failure only", r.res.Pending)
	}
}
