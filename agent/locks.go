package agent

import (
	"sync"

	"github.com/sidelane/sidelane/internal/keyedlock"
)

// attachLocks order changes to attachments. Changes to one sandbox
// (container ID: every attachment Multus makes for it shares its netns and
// so its datapath state) never interleave: an ADD, DEL or live move of it
// runs alone. Changes to different sandboxes run in parallel, so a burst of
// ADDs does not queue behind one lock. Whole-node operations (GC) take
// every sandbox at once.
type attachLocks struct {
	all  sync.RWMutex // read: one sandbox's change; write: every sandbox
	held keyedlock.Locks[string]
}

func newAttachLocks() *attachLocks { return &attachLocks{} }

// sandbox locks the attachments of container id and returns the unlock.
func (l *attachLocks) sandbox(id string) (unlock func()) {
	l.all.RLock()
	u := l.held.Lock(id)
	return func() {
		u()
		l.all.RUnlock()
	}
}

// every locks every sandbox and returns the unlock.
func (l *attachLocks) every() (unlock func()) {
	l.all.Lock()
	return l.all.Unlock
}

// sandboxes is how many sandboxes have a lock now (tests).
func (l *attachLocks) sandboxes() int { return l.held.Len() }
