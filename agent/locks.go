package agent

import "sync"

// attachLocks order changes to attachments. Changes to one sandbox
// (container ID: every attachment Multus makes for it shares its netns and
// so its datapath state) never interleave: an ADD, DEL or live move of it
// runs alone. Changes to different sandboxes run in parallel, so a burst of
// ADDs does not queue behind one lock. Whole-node operations (GC) take
// every sandbox at once.
type attachLocks struct {
	all sync.RWMutex // read: one sandbox's change; write: every sandbox

	mu   sync.Mutex
	held map[string]*sandboxLock
}

type sandboxLock struct {
	mu    sync.Mutex
	users int // holders and waiters; the lock is dropped at 0
}

func newAttachLocks() *attachLocks { return &attachLocks{held: map[string]*sandboxLock{}} }

// sandbox locks the attachments of container id and returns the unlock.
func (l *attachLocks) sandbox(id string) (unlock func()) {
	l.all.RLock()
	l.mu.Lock()
	s := l.held[id]
	if s == nil {
		s = &sandboxLock{}
		l.held[id] = s
	}
	s.users++
	l.mu.Unlock()
	s.mu.Lock()
	return func() {
		s.mu.Unlock()
		l.mu.Lock()
		if s.users--; s.users == 0 {
			delete(l.held, id)
		}
		l.mu.Unlock()
		l.all.RUnlock()
	}
}

// every locks every sandbox and returns the unlock.
func (l *attachLocks) every() (unlock func()) {
	l.all.Lock()
	return l.all.Unlock
}

// sandboxes is how many sandboxes have a lock now (tests).
func (l *attachLocks) sandboxes() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.held)
}
