package keyedlock

import (
	"sync"
	"testing"
	"time"
)

func TestOtherKeyDoesNotWait(t *testing.T) {
	var l Locks[string]
	unlock := l.Lock("a")
	done := make(chan struct{})
	go func() { l.Lock("b")(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("lock of b waited for a")
	}
	unlock()
}

func TestSameKeyExcludesAndIsDropped(t *testing.T) {
	var l Locks[int]
	var mu sync.Mutex
	in, max := 0, 0
	var wg sync.WaitGroup
	for range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer l.Lock(7)()
			mu.Lock()
			in++
			max = maxInt(max, in)
			mu.Unlock()
			time.Sleep(time.Millisecond)
			mu.Lock()
			in--
			mu.Unlock()
		}()
	}
	wg.Wait()
	if max != 1 {
		t.Fatalf("%d holders of one key at once, want 1", max)
	}
	if n := l.Len(); n != 0 {
		t.Fatalf("%d locks left after every holder is done, want 0", n)
	}
}

func maxInt(a, b int) int {
	if a > b {
		return a
	}
	return b
}
