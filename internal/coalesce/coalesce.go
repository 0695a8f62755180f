// Package coalesce lets callers that arrive while a run is under way share
// the next run: with a run that costs the same for one item as for many (a
// walk of a whole BPF map), n concurrent callers cost two runs, not n, and
// each caller still returns only once a run that covered its item is done.
package coalesce

import (
	"errors"
	"sync"
)

// ErrPanicked is what the callers waiting on a run get when it panicked
// (the caller that ran it gets the panic).
var ErrPanicked = errors.New("coalesce: the run panicked")

// Group gathers items for runs, one run at a time. The zero value is ready
// to use.
type Group[T any] struct {
	mu      sync.Mutex
	cond    sync.Cond
	running bool
	next    *batch[T] // items waiting for the next run
}

type batch[T any] struct {
	items       []T
	taken, done bool
	err         error
}

// Do adds item to the next run and returns that run's error once it is
// done. If no run is under way, this caller runs run with the batch's
// items (its own and those of callers that joined it); otherwise it waits
// until the current run ends, and then one caller of the batch runs it.
func (g *Group[T]) Do(item T, run func(items []T) error) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.cond.L == nil {
		g.cond.L = &g.mu
	}
	b := g.next
	if b == nil {
		b = &batch[T]{}
		g.next = b
	}
	b.items = append(b.items, item)
	for {
		if b.done {
			return b.err
		}
		if !b.taken && !g.running {
			g.next, b.taken, g.running = nil, true, true
			g.mu.Unlock()
			return g.lead(b, run) // returns with g.mu held again
		}
		g.cond.Wait()
	}
}

// lead runs b without g.mu and takes g.mu again to finish b, also when
// run panics: the group stays usable, b's waiters get ErrPanicked and the
// panic goes on in this caller.
func (g *Group[T]) lead(b *batch[T], run func([]T) error) (err error) {
	panicked := true
	defer func() {
		g.mu.Lock()
		if panicked {
			err = ErrPanicked
		}
		b.err, b.done, g.running = err, true, false
		g.cond.Broadcast()
	}()
	err = run(b.items)
	panicked = false
	return err
}

// Waiting is how many items wait for the next run (tests use it to know
// that callers have joined a batch).
func (g *Group[T]) Waiting() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.next == nil {
		return 0
	}
	return len(g.next.items)
}
