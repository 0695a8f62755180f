//go:build linux

package bpf

// lockPod takes c's shared lock and netns's own, and returns the unlock.
func (c *Capture) lockPod(netns uint64) (unlock func()) {
	c.mu.RLock()
	u := c.pods.Lock(netns)
	return func() {
		u()
		c.mu.RUnlock()
	}
}
