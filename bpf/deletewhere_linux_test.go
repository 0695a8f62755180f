package bpf

import (
	"encoding/binary"
	"fmt"
	"slices"
	"testing"

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
