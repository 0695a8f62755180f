package coalesce

import (
	"errors"
	"slices"
	"sync"
	"testing"
	"time"
)

// waitFor polls cond (the batching itself has no timing to assert).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// Callers that arrive during a run share the next one: 1 + 9 callers,
// two runs, every item in exactly one run, every caller back after the
// run that held its item.
func TestCallersDuringARunShareTheNext(t *testing.T) {
	var g Group[int]
	release := make(chan struct{})
	var mu sync.Mutex
	var runs [][]int
	run := func(items []int) error {
		mu.Lock()
		runs = append(runs, slices.Clone(items))
		first := len(runs) == 1
		mu.Unlock()
		if first {
			<-release
		}
		return nil
	}
	var wg sync.WaitGroup
	done := make([]bool, 10)
	var doneMu sync.Mutex
	call := func(i int) {
		defer wg.Done()
		if err := g.Do(i, run); err != nil {
			t.Errorf("Do(%d): %v", i, err)
		}
		doneMu.Lock()
		done[i] = true
		doneMu.Unlock()
	}
	wg.Add(1)
	go call(0)
	waitFor(t, "the first run", func() bool { mu.Lock(); defer mu.Unlock(); return len(runs) == 1 })
	for i := 1; i < 10; i++ {
		wg.Add(1)
		go call(i)
	}
	waitFor(t, "9 items to wait", func() bool { return g.Waiting() == 9 })
	doneMu.Lock()
	for i, d := range done {
		if d {
			t.Errorf("caller %d returned before its run", i)
		}
	}
	doneMu.Unlock()
	close(release)
	wg.Wait()
	if len(runs) != 2 {
		t.Fatalf("%d runs (%v), want 2", len(runs), runs)
	}
	second := slices.Sorted(slices.Values(runs[1]))
	if !slices.Equal(runs[0], []int{0}) || !slices.Equal(second, []int{1, 2, 3, 4, 5, 6, 7, 8, 9}) {
		t.Fatalf("runs %v, want [0] then 1..9", runs)
	}
	if g.Waiting() != 0 {
		t.Fatalf("%d items left waiting", g.Waiting())
	}
}

// A run's error reaches every caller of its batch, and no other.
func TestErrorGoesToItsBatch(t *testing.T) {
	var g Group[string]
	boom := errors.New("boom")
	release := make(chan struct{})
	started := make(chan struct{})
	var errs sync.Map
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		errs.Store("first", g.Do("first", func([]string) error { close(started); <-release; return nil }))
	}()
	<-started
	for _, n := range []string{"a", "b"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs.Store(n, g.Do(n, func([]string) error { return boom }))
		}()
	}
	waitFor(t, "two items to wait", func() bool { return g.Waiting() == 2 })
	close(release)
	wg.Wait()
	for n, want := range map[string]error{"first": nil, "a": boom, "b": boom} {
		got, _ := errs.Load(n)
		if err, _ := got.(error); !errors.Is(err, want) || (want == nil && err != nil) {
			t.Errorf("%s: %v, want %v", n, got, want)
		}
	}
}

// A run that panics releases its waiters with ErrPanicked, hands the panic
// to the caller that ran it, and leaves the group usable.
func TestPanicReleasesWaiters(t *testing.T) {
	var g Group[int]
	release := make(chan struct{})
	started := make(chan struct{})
	panicked := make(chan any, 1)
	go func() {
		defer func() { panicked <- recover() }()
		_ = g.Do(0, func([]int) error { close(started); <-release; return nil })
	}()
	<-started
	var wg sync.WaitGroup
	var mu sync.Mutex
	var panics []any
	var errs []error
	call := func(i int) {
		defer wg.Done()
		defer func() {
			if p := recover(); p != nil {
				mu.Lock()
				panics = append(panics, p)
				mu.Unlock()
			}
		}()
		err := g.Do(i, func([]int) error { panic("run failed") })
		mu.Lock()
		errs = append(errs, err)
		mu.Unlock()
	}
	wg.Add(2)
	go call(1)
	go call(2)
	waitFor(t, "two items to wait", func() bool { return g.Waiting() == 2 })
	close(release)
	wg.Wait()
	if p := <-panicked; p != nil {
		t.Fatalf("first run panicked: %v", p)
	}
	// One of the two callers ran the batch and got the panic; the other
	// got ErrPanicked. Which one ran it is the scheduler's choice.
	if len(panics) != 1 || len(errs) != 1 || !errors.Is(errs[0], ErrPanicked) {
		t.Fatalf("panics %v, errors %v: want one panic and one ErrPanicked", panics, errs)
	}
	if err := g.Do(3, func(items []int) error {
		if !slices.Equal(items, []int{3}) {
			t.Errorf("items %v", items)
		}
		return nil
	}); err != nil {
		t.Fatalf("after the panic: %v", err)
	}
}
