// Package keyedlock is one mutex per key, made on first use and dropped
// when its last holder or waiter is done, so callers on different keys
// never wait for each other and the set does not grow with keys seen.
package keyedlock

import "sync"

// Locks is a set of per-key mutexes. The zero value is ready to use.
type Locks[K comparable] struct {
	mu   sync.Mutex
	held map[K]*entry
}

type entry struct {
	mu    sync.Mutex
	users int // holders and waiters; dropped at 0
}

// Lock locks key and returns the unlock.
func (l *Locks[K]) Lock(key K) (unlock func()) {
	l.mu.Lock()
	if l.held == nil {
		l.held = map[K]*entry{}
	}
	e := l.held[key]
	if e == nil {
		e = &entry{}
		l.held[key] = e
	}
	e.users++
	l.mu.Unlock()
	e.mu.Lock()
	return func() {
		e.mu.Unlock()
		l.mu.Lock()
		if e.users--; e.users == 0 {
			delete(l.held, key)
		}
		l.mu.Unlock()
	}
}

// Len is how many keys have a lock now.
func (l *Locks[K]) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.held)
}
