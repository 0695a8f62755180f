//go:build linux

package bpf

import (
	"net/netip"
	"testing"
)

// podN is pod i's BPF state: its own address, the default settings plus
// one exclusion of its own.
func podN(t *testing.T, i int, extra int) Pod {
	t.Helper()
	s := defaultSettings()
	for j := range extra {
		s.ExcludeOutboundCIDRs = append(s.ExcludeOutboundCIDRs, netip.PrefixFrom(netip.AddrFrom4([4]byte{172, 20, byte(j), 0}), 24))
	}
	ip := netip.AddrFrom4([4]byte{10, 60, byte(i >> 8), byte(i)})
	p, err := PlanPod([]netip.Prefix{netip.PrefixFrom(ip, 16)}, s)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func entriesOf(t *testing.T, c *Capture, netns uint64) (n int) {
	t.Helper()
	lo, hi := splitCookie(netns)
	var ck captureCidrKey
	var v uint8
	it := c.objs.Cidrs.Iterate()
	for it.Next(&ck, &v) {
		if ck.NetnsLo == lo && ck.NetnsHi == hi {
			n++
		}
	}
	var pk capturePortKey
	it2 := c.objs.Ports.Iterate()
	for it2.Next(&pk, &v) {
		if pk.NetnsLo == lo && pk.NetnsHi == hi {
			n++
		}
	}
	var ik [16]byte
	var owner uint64
	it3 := c.objs.PodIps.Iterate()
	for it3.Next(&ik, &owner) {
		if owner == netns {
			n++
		}
	}
	if err := errorsOf(it.Err(), it2.Err(), it3.Err()); err != nil {
		t.Fatal(err)
	}
	return n
}

func errorsOf(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// Enrolling pod N+1 (and re-enrolling or deleting one pod) reads only that
// pod's keys: no walk of the other pods' rules. Before the index, every Put
// walked the CIDR, port and pod IP maps whole (O(pods)). A Capture over
// maps a previous agent filled walks them once, at its first change.
func TestPutTouchesOnlyThePod(t *testing.T) {
	c := loadUnattached(t)
	const n = 300
	for i := 1; i <= n; i++ {
		if err := c.Put(uint64(i), podN(t, i, 3)); err != nil {
			t.Fatal(err)
		}
	}
	if w := c.rules.walked.Load(); w != 0 {
		t.Fatalf("%d map entries walked while enrolling %d pods into empty maps, want 0", w, n)
	}
	if err := c.Put(n+1, podN(t, n+1, 3)); err != nil {
		t.Fatal(err)
	}
	if w := c.rules.walked.Load(); w != 0 {
		t.Fatalf("enrolling pod %d walked %d map entries, want 0", n+1, w)
	}

	// Re-enroll with fewer exclusions: the stale ones go, nothing else.
	before := entriesOf(t, c, 7)
	if err := c.Put(7, podN(t, 7, 1)); err != nil {
		t.Fatal(err)
	}
	if got := entriesOf(t, c, 7); got != before-2 {
		t.Fatalf("pod 7 has %d entries after dropping 2 exclusions, want %d", got, before-2)
	}
	if err := c.Verify(7, podN(t, 7, 1)); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(7); err != nil {
		t.Fatal(err)
	}
	if got := entriesOf(t, c, 7); got != 0 {
		t.Fatalf("pod 7 has %d entries after Delete", got)
	}
	if err := c.Verify(8, podN(t, 8, 3)); err != nil {
		t.Fatalf("another pod after pod 7's changes: %v", err)
	}
	if w := c.rules.walked.Load(); w != 0 {
		t.Fatalf("re-enroll and delete walked %d map entries, want 0", w)
	}

	// An address taken over by another pod stays that pod's when its old
	// owner is re-enrolled without it.
	p9 := podN(t, 9, 0)
	p9.IPs = append(p9.IPs, podN(t, 10, 0).IPs...)
	if err := c.Put(9, p9); err != nil {
		t.Fatal(err)
	}
	if err := c.Put(10, podN(t, 10, 0)); err != nil {
		t.Fatal(err)
	}
	if err := c.Put(9, podN(t, 9, 0)); err != nil {
		t.Fatal(err)
	}
	k := mapped(podN(t, 10, 0).IPs[0])
	var owner uint64
	if err := c.objs.PodIps.Lookup(&k, &owner); err != nil || owner != 10 {
		t.Fatalf("pod 10's address: owner %d, %v; want 10", owner, err)
	}

	// A restarted agent's Capture over the same maps indexes them once.
	again := &Capture{objs: c.objs}
	total := countEntries(t, c.objs.Cidrs) + countEntries(t, c.objs.Ports) + countEntries(t, c.objs.PodIps)
	if err := again.Put(n+2, podN(t, n+2, 3)); err != nil {
		t.Fatal(err)
	}
	if err := again.Put(3, podN(t, 3, 0)); err != nil {
		t.Fatal(err)
	}
	if w := again.rules.walked.Load(); w != int64(total) {
		t.Fatalf("restarted Capture walked %d entries for two Puts, want one walk of %d", w, total)
	}
	if got, want := entriesOf(t, c, 3), entriesOf(t, c, 2)-3; got != want {
		t.Fatalf("pod 3 re-enrolled by the restarted Capture has %d entries, want %d (stale exclusions of the previous agent removed)", got, want)
	}
}
