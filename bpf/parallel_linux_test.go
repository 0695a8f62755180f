//go:build linux

package bpf

import (
	"os"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"
)

// checkAttached fails unless p's eth0 is captured: a sidecar pod's by its
// pinned inbound lookup link on the pod's copy of sidelane_in_lookup and no
// tcx link; any other's by exactly one tcx link, on c's inbound program
// and pinned, and its time-wait lookup pinned.
func checkAttached(t *testing.T, c *Capture, p podNetns) {
	t.Helper()
	if err := c.VerifyInbound(p.cookie, "eth0"); err != nil {
		t.Errorf("netns %d: %v", p.cookie, err)
	}
	if c.hasInIface(p.cookie, "eth0") {
		if ids := tcxLinkIDs(t, p.path, "eth0"); len(ids) != 0 {
			t.Errorf("netns %d: sidecar pod with %d tcx links on eth0, want none", p.cookie, len(ids))
		}
		l, err := link.LoadPinnedLink(c.inLookupPin(p.cookie), nil)
		if err != nil {
			t.Errorf("netns %d: %v", p.cookie, err)
			return
		}
		defer l.Close()
		info, err := l.Info()
		if want, ok := c.inProgs.get(p.cookie); err != nil || !ok || info.Program != want {
			t.Errorf("netns %d: inbound lookup link on program %v (%v), want the pod's %d", p.cookie, info, err, want)
		}
		return
	}
	want, err := progID(c.objs.SidelaneInbound)
	if err != nil {
		t.Fatal(err)
	}
	ids := tcxLinkIDs(t, p.path, "eth0")
	if len(ids) != 1 {
		t.Errorf("netns %d: %d tcx links on eth0, want 1", p.cookie, len(ids))
	}
	for _, id := range ids {
		byID(t, id, func(l link.Link) error {
			info, err := l.Info()
			if err == nil && info.Program != want {
				t.Errorf("netns %d: tcx link on program %d, want sidelane's %d", p.cookie, info.Program, want)
			}
			return err
		})
	}
}

// checkDetached fails unless nothing of c's is attached to or pinned for p.
func checkDetached(t *testing.T, c *Capture, p podNetns) {
	t.Helper()
	if ids := tcxLinkIDs(t, p.path, "eth0"); len(ids) != 0 {
		t.Errorf("netns %d: %d tcx links left on eth0 after Delete", p.cookie, len(ids))
	}
	for _, pin := range []string{c.inboundPin(p.cookie, "eth0"), c.twLookupPin(p.cookie), c.inLookupPin(p.cookie)} {
		if _, err := os.Stat(pin); err == nil {
			t.Errorf("pin %s left after Delete", pin)
		}
	}
}

// TestAttachInboundInParallel holds one pod's attach in the middle and
// attaches another pod meanwhile: attaches into different netns do not
// wait for each other (100 concurrent CNI ADDs used to queue on one lock
// for the whole attach). Failed before per-netns locking: the second
// attach waited for the first, which waited for the test.
func TestAttachInboundInParallel(t *testing.T) {
	c, pods := newAttachNode(t, 2)
	a, b := pods[0], pods[1]
	entered, release := make(chan struct{}), make(chan struct{})
	c.beforeAttach = func(netns uint64) {
		if netns == a.cookie {
			close(entered)
			<-release
		}
	}
	errA := make(chan error, 1)
	go func() { errA <- c.AttachInbound(a.path, a.cookie, "eth0") }()
	<-entered
	errB := make(chan error, 1)
	go func() { errB <- c.AttachInbound(b.path, b.cookie, "eth0") }()
	var err error
	select {
	case err = <-errB:
	case <-time.After(time.Minute):
		t.Error("attach into one netns waited for an attach into another")
		close(release)
		err = <-errB
		release = nil
	}
	if release != nil {
		close(release)
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := <-errA; err != nil {
		t.Fatal(err)
	}
	checkAttached(t, c, a)
	checkAttached(t, c, b)
}

// TestDeleteWaitsForAttach deletes a pod while its attach is held in the
// middle: Delete waits for it and then removes everything, so no link is
// left pinned for a deleted pod.
func TestDeleteWaitsForAttach(t *testing.T) {
	c, pods := newAttachNode(t, 1)
	p := pods[0]
	if err := c.Put(p.cookie, mustPlan(t)); err != nil {
		t.Fatal(err)
	}
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	c.beforeAttach = func(uint64) {
		once.Do(func() {
			close(entered)
			<-release
		})
	}
	errA := make(chan error, 1)
	go func() { errA <- c.AttachInbound(p.path, p.cookie, "eth0") }()
	<-entered
	errD := make(chan error, 1)
	go func() { errD <- c.Delete(p.cookie) }()
	// Give a Delete that did not wait time to finish first (it must not
	// matter for the result).
	time.Sleep(200 * time.Millisecond)
	close(release)
	if err := <-errA; err != nil {
		t.Fatal(err)
	}
	if err := <-errD; err != nil {
		t.Fatal(err)
	}
	checkDetached(t, c, p)
}

// TestAttachRepairDeleteConcurrently runs attaches into 12 netns, repair
// passes over all of them and deletes of half of them at once (run it
// with -race): every pod left is attached exactly once, pinned and on
// sidelane's programs; every deleted pod has nothing left (a repair never
// re-attaches a pod being deleted).
func TestAttachRepairDeleteConcurrently(t *testing.T) {
	const n = 12
	c, pods := newAttachNode(t, n)
	inbound := make([]Inbound, n)
	for i, p := range pods {
		if err := c.Put(p.cookie, mustPlan(t)); err != nil {
			t.Fatal(err)
		}
		inbound[i] = Inbound{NetnsPath: p.path, Netns: p.cookie, IfName: "eth0"}
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 2 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := c.Repair(inbound); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	var pw sync.WaitGroup
	for i, p := range pods {
		pw.Go(func() {
			if err := c.AttachInbound(p.path, p.cookie, "eth0"); err != nil {
				t.Error(err)
				return
			}
			if i%2 == 1 {
				if err := c.Delete(p.cookie); err != nil {
					t.Error(err)
				}
			}
		})
	}
	pw.Wait()
	close(stop)
	wg.Wait()
	for i, p := range pods {
		if i%2 == 1 {
			checkDetached(t, c, p)
		} else {
			checkAttached(t, c, p)
		}
	}
	if n := c.pods.Len(); n != 0 {
		t.Errorf("%d netns locks kept after every call returned", n)
	}
}
