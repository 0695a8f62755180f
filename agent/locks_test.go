package agent

import (
	"sync"
	"testing"
)

// One sandbox's changes exclude each other; another sandbox's do not wait
// for them; every() waits for all; locks go when unused.
func TestAttachLocks(t *testing.T) {
	l := newAttachLocks()
	unlockA := l.sandbox("a")

	// Another sandbox proceeds while a is held.
	done := make(chan struct{})
	go func() { l.sandbox("b")(); close(done) }()
	<-done

	// A second change of a waits until the first is done.
	var order []string
	var mu sync.Mutex
	second := make(chan struct{})
	go func() {
		u := l.sandbox("a")
		mu.Lock()
		order = append(order, "second")
		mu.Unlock()
		u()
		close(second)
	}()
	// every() waits for the holder of a too.
	everyDone := make(chan struct{})
	go func() {
		u := l.every()
		mu.Lock()
		order = append(order, "every")
		mu.Unlock()
		u()
		close(everyDone)
	}()
	mu.Lock()
	if len(order) != 0 {
		t.Fatalf("ran while a was held: %v", order)
	}
	order = append(order, "first")
	mu.Unlock()
	unlockA()
	<-second
	<-everyDone
	if order[0] != "first" || len(order) != 3 {
		t.Fatalf("order %v, want first, then second and every", order)
	}
	if n := l.sandboxes(); n != 0 {
		t.Fatalf("%d sandbox locks kept after use", n)
	}
}
