//go:build linux

package bpf

import "sync"

// netnsLocks is one mutex per netns cookie, made on first use and dropped
// when its last holder or waiter is done.
type netnsLocks struct {
	mu   sync.Mutex
	held map[uint64]*netnsLock
}

type netnsLock struct {
	mu    sync.Mutex
	users int // holders and waiters
}

// lock locks netns and returns the unlock.
func (l *netnsLocks) lock(netns uint64) (unlock func()) {
	l.mu.Lock()
	if l.held == nil {
		l.held = map[uint64]*netnsLock{}
	}
	n := l.held[netns]
	if n == nil {
		n = &netnsLock{}
		l.held[netns] = n
	}
	n.users++
	l.mu.Unlock()
	n.mu.Lock()
	return func() {
		n.mu.Unlock()
		l.mu.Lock()
		if n.users--; n.users == 0 {
			delete(l.held, netns)
		}
		l.mu.Unlock()
	}
}

// len is how many netns have a lock now (tests).
func (l *netnsLocks) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.held)
}

// lockPod takes c's shared lock and netns's own, and returns the unlock.
func (c *Capture) lockPod(netns uint64) (unlock func()) {
	c.mu.RLock()
	u := c.pods.lock(netns)
	return func() {
		u()
		c.mu.RUnlock()
	}
}
