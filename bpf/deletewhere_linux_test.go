package bpf

import (
	"encoding/binary"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
)

// fillTuples puts n connections of netns into orig_by_tuple.
func fillTuples(tb testing.TB, m *ebpf.Map, netns uint64, n int) []captureTupleKey {
	tb.Helper()
	keys := make([]captureTupleKey, n)
	vals := make([]captureOrigDst, n)
	for i := range keys {
		keys[i].Netns = netns
		binary.BigEndian.PutUint32(keys[i].Src[12:], uint32(i))
		keys[i].Sport, keys[i].Dport = uint16(i), 80
		vals[i].Netns = netns
	}
	if _, err := m.BatchUpdate(keys, vals, nil); err != nil {
		tb.Fatal(err)
	}
	return keys
}

// The batched walk finds exactly what the NextKey walk finds, and
// deleteWhere removes only those entries.
func TestDeleteWhereBatched(t *testing.T) {
	c, _ := newAttachNode(t, 1)
	m := c.objs.OrigByTuple
	fillTuples(t, m, 1001, 5000) // more than one batch
	mine := fillTuples(t, m, 1002, 300)
	t.Cleanup(func() { _ = deleteWhere(m, func(captureTupleKey, captureOrigDst) bool { return true }) })
	match := func(k captureTupleKey, _ captureOrigDst) bool { return k.Netns == 1002 }
	batched, err := matchBatched(m, match)
	if err != nil {
		t.Fatal(err)
	}
	iterated, err := matchIterated(m, match)
	if err != nil {
		t.Fatal(err)
	}
	key := func(k captureTupleKey) string { return fmt.Sprint(k.Netns, k.Src, k.Sport) }
	set := func(ks []captureTupleKey) []string {
		out := make([]string, len(ks))
		for i, k := range ks {
			out[i] = key(k)
		}
		slices.Sort(out)
		return out
	}
	if got, want := set(batched), set(mine); !slices.Equal(got, want) {
		t.Fatalf("batched walk found %d entries, want the pod's %d", len(got), len(want))
	}
	if got, want := set(iterated), set(mine); !slices.Equal(got, want) {
		t.Fatalf("NextKey walk found %d entries, want %d", len(got), len(want))
	}
	if err := deleteWhere(m, match); err != nil {
		t.Fatal(err)
	}
	if n := countEntries(t, m); n != 5000 {
		t.Fatalf("%d entries left, want the other pod's 5000", n)
	}
}

// BenchmarkDeleteWhere: a pod's DEL on a node with 50,000 tracked
// connections of other pods, batched against NextKey walks.
func BenchmarkDeleteWhere(b *testing.B) {
	c, _ := newAttachNode(b, 1)
	m := c.objs.OrigByTuple
	fillTuples(b, m, 2001, 50000)
	b.Cleanup(func() { _ = deleteWhere(m, func(captureTupleKey, captureOrigDst) bool { return true }) })
	match := func(k captureTupleKey, _ captureOrigDst) bool { return k.Netns == 2002 }
	for _, v := range []struct {
		name string
		walk func(*ebpf.Map, func(captureTupleKey, captureOrigDst) bool) ([]captureTupleKey, error)
	}{{"batched", matchBatched[captureTupleKey, captureOrigDst]}, {"nextkey", matchIterated[captureTupleKey, captureOrigDst]}} {
		b.Run(v.name, func(b *testing.B) {
			for b.Loop() {
				b.StopTimer()
				fillTuples(b, m, 2002, 100)
				b.StartTimer()
				stale, err := v.walk(m, match)
				if err != nil || len(stale) != 100 {
					b.Fatalf("%d entries, %v", len(stale), err)
				}
				for _, k := range stale {
					if err := m.Delete(&k); err != nil {
						b.Fatal(err)
					}
				}
			}
		})
	}
}

// fillCookies puts n UDP-style records of netns into orig_by_cookie, with
// cookies from base on.
func fillCookies(tb testing.TB, m *ebpf.Map, netns uint64, base uint64, n int) {
	tb.Helper()
	keys := make([]uint64, n)
	vals := make([]captureOrigDst, n)
	for i := range keys {
		keys[i], vals[i].Netns = base+uint64(i), netns
	}
	if _, err := m.BatchUpdate(keys, vals, nil); err != nil {
		tb.Fatal(err)
	}
}

// DELs that arrive while a walk is under way share the next walk, and
// each still returns only once its pod's connections are gone, the
// others' left alone.
func TestConcurrentDeletesShareOneWalk(t *testing.T) {
	c, _ := newAttachNode(t, 1)
	t.Cleanup(func() {
		_ = deleteWhere(c.objs.OrigByTuple, func(captureTupleKey, captureOrigDst) bool { return true })
		_ = deleteWhere(c.objs.OrigByCookie, func(uint64, captureOrigDst) bool { return true })
	})
	const pods, other = 10, uint64(5000)
	fillTuples(t, c.objs.OrigByTuple, other, 2000)
	fillCookies(t, c.objs.OrigByCookie, other, 1<<40, 200)
	for i := range uint64(pods) {
		fillTuples(t, c.objs.OrigByTuple, 5001+i, 100)
		fillCookies(t, c.objs.OrigByCookie, 5001+i, 1<<41+i*1000, 10)
	}
	// Hold the group with a walk of our own until every DEL has joined
	// the batch after it.
	release, held := make(chan struct{}), make(chan struct{})
	go func() {
		_ = c.sweeps.Do(sweepItem{}, func([]sweepItem) error { close(held); <-release; return nil })
	}()
	<-held
	errs := make(chan error, pods)
	for i := range uint64(pods) {
		go func() { errs <- c.Delete(5001 + i) }()
	}
	for deadline := time.Now().Add(10 * time.Second); c.sweeps.Waiting() < pods; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d DELs waiting for the walk", c.sweeps.Waiting(), pods)
		}
	}
	select {
	case err := <-errs:
		t.Fatalf("a DEL returned before its connections were swept: %v", err)
	default:
	}
	close(release)
	for range pods {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if n := c.connectionSweeps.Load(); n != 1 {
		t.Fatalf("%d walks for %d concurrent DELs, want 1", n, pods)
	}
	if n := countEntries(t, c.objs.OrigByTuple); n != 2000 {
		t.Fatalf("orig_by_tuple: %d entries left, want the other pod's 2000", n)
	}
	if n := countEntries(t, c.objs.OrigByCookie); n != 200 {
		t.Fatalf("orig_by_cookie: %d entries left, want the other pod's 200", n)
	}
}

// BenchmarkConcurrentDeletes: 10 DELs at once on a node with 50,000
// tracked connections of other pods (ns/op is per DEL, walks/op the
// walks each DEL cost).
func BenchmarkConcurrentDeletes(b *testing.B) {
	c, _ := newAttachNode(b, 1)
	fillTuples(b, c.objs.OrigByTuple, 6000, 50000)
	b.Cleanup(func() {
		_ = deleteWhere(c.objs.OrigByTuple, func(captureTupleKey, captureOrigDst) bool { return true })
	})
	const wave = 10
	netns := uint64(6001)
	dels := 0
	for b.Loop() {
		b.StopTimer()
		for i := range uint64(wave) {
			fillTuples(b, c.objs.OrigByTuple, netns+i, 100)
		}
		b.StartTimer()
		var wg sync.WaitGroup
		for i := range uint64(wave) {
			wg.Go(func() {
				if err := c.Delete(netns + i); err != nil {
					b.Error(err)
				}
			})
		}
		wg.Wait()
		netns += wave
		dels += wave
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(dels), "ns/del")
	b.ReportMetric(float64(c.connectionSweeps.Load())/float64(dels), "walks/del")
}
