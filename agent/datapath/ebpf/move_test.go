package ebpf

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	"github.com/sidelane/sidelane/agent/datapath"
	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/bpf"
	"github.com/sidelane/sidelane/istio/capture"
)

// fakePods is the maps and tc links of package bpf in memory: per netns
// cookie the pod written (a failed Put leaves a half-written one, a failed
// Delete a half-deleted netns) and, per interface, the inbound link's
// identity (a new one each time it is attached, the same when updated).
// fail names the method (and its nth call, from 1) that fails; with
// failAfter every call after that fails too.
type fakePods struct {
	pods      map[uint64]*bpf.Pod
	inbound   map[uint64]map[string]int
	links     int
	calls     []string
	fail      string
	failN     int
	failAfter bool
	failed    bool
	counts    map[string]int
}

var errInjected = errors.New("injected failure")

func newFakePods() *fakePods {
	return &fakePods{pods: map[uint64]*bpf.Pod{}, inbound: map[uint64]map[string]int{}, counts: map[string]int{}}
}

func (f *fakePods) call(name string) error {
	f.calls = append(f.calls, name)
	f.counts[name]++
	if f.failed && f.failAfter || name == f.fail && f.counts[name] == f.failN {
		f.failed = true
		return fmt.Errorf("%s: %w", name, errInjected)
	}
	return nil
}

var halfWritten = &bpf.Pod{InboundPort: 1}

func (f *fakePods) Put(netns uint64, p bpf.Pod) error {
	if err := f.call("Put"); err != nil {
		f.pods[netns] = halfWritten
		return err
	}
	f.pods[netns] = &p
	return nil
}

func (f *fakePods) Delete(netns uint64) error {
	delete(f.pods, netns) // the config goes first
	if err := f.call("Delete"); err != nil {
		return err
	}
	delete(f.inbound, netns)
	return nil
}

func (f *fakePods) AttachInbound(_ string, netns uint64, ifname string) error {
	if err := f.call("AttachInbound"); err != nil {
		return err
	}
	if f.inbound[netns] == nil {
		f.inbound[netns] = map[string]int{}
	}
	if f.inbound[netns][ifname] == 0 {
		f.links++
		f.inbound[netns][ifname] = f.links
	}
	return nil
}

func (f *fakePods) DetachInbound(netns uint64, ifname string) error {
	if err := f.call("DetachInbound"); err != nil {
		return err
	}
	delete(f.inbound[netns], ifname)
	return nil
}

func (f *fakePods) Verify(uint64, bpf.Pod) error            { return nil }
func (f *fakePods) VerifyInbound(uint64, string) error      { return nil }
func (f *fakePods) Enrolled() ([]uint64, error)             { return slices.Sorted(maps.Keys(f.pods)), nil }
func (f *fakePods) Counters(uint64) (bpf.Counters, error)   { return bpf.Counters{}, nil }
func (f *fakePods) NodeCounters() (bpf.NodeCounters, error) { return bpf.NodeCounters{}, nil }

// snapshot is what the datapath does for the pod: its pod state and its
// inbound links (identity included).
type snapshot struct {
	pods    map[uint64]bpf.Pod
	inbound map[uint64]map[string]int
}

func (f *fakePods) snapshot() snapshot {
	s := snapshot{pods: map[uint64]bpf.Pod{}, inbound: map[uint64]map[string]int{}}
	for k, p := range f.pods {
		s.pods[k] = *p
	}
	for k, m := range f.inbound {
		if len(m) > 0 {
			s.inbound[k] = maps.Clone(m)
		}
	}
	return s
}

// sameCapture compares two snapshots ignoring link identity (a restore
// after a failed Delete must attach again).
func sameCapture(a, b snapshot) bool {
	if !reflect.DeepEqual(a.pods, b.pods) || len(a.inbound) != len(b.inbound) {
		return false
	}
	for k, m := range a.inbound {
		if !slices.Equal(slices.Sorted(maps.Keys(m)), slices.Sorted(maps.Keys(b.inbound[k]))) {
			return false
		}
	}
	return true
}

const fakeCookie = 42

func newFakeDatapath(f *fakePods) *Datapath {
	d := New(f, slog.New(slog.DiscardHandler))
	d.cookie = func(string) (uint64, error) { return fakeCookie, nil }
	d.routes = func(string, []string) ([]bpf.Route, error) { return nil, nil }
	return d
}

func moveEntries() (sidecar, sidecarOther, sidecarNoEth0, node, none store.Entry) {
	s := capture.Settings{OutboundPort: 15001, InboundPort: 15006, OutboundAllCIDRs: true, InboundAllPorts: true,
		ProxyUIDs: []uint32{1337}}
	other := s
	other.ExcludeOutboundPorts = []capture.PortRange{{First: 20, Last: 30}}
	noEth0 := s
	noEth0.ExcludeInterfaces = []string{"eth0"}
	base := store.Entry{Key: store.Key{Network: "n", ContainerID: "c", IfName: "eth0"}, Netns: "/x",
		IPs: []netip.Prefix{netip.MustParsePrefix("10.9.0.2/24")}}
	sidecar, sidecarOther, sidecarNoEth0, node, none = base, base, base, base, base
	sidecar.Mode, sidecar.Capture = modeSidecar, &s
	sidecarOther.Mode, sidecarOther.Capture = modeSidecar, &other
	sidecarNoEth0.Mode, sidecarNoEth0.Capture = modeSidecar, &noEth0
	node.Mode = modeNode
	none.Mode = "none"
	return
}

// Move is one in-place update: a Put over the pod's state and the inbound
// link updated (or attached if missing), never detached first; only a move
// to none deletes.
func TestMoveInPlace(t *testing.T) {
	sidecar, other, noEth0, node, none := moveEntries()
	tests := []struct {
		name      string
		from, to  store.Entry
		wantCalls []string
	}{
		{"sidecar to node", sidecar, node, []string{"Put", "AttachInbound"}},
		{"node to sidecar", node, sidecar, []string{"Put", "AttachInbound"}},
		{"settings", sidecar, other, []string{"Put", "AttachInbound"}},
		{"interface now excluded", sidecar, noEth0, []string{"Put", "DetachInbound"}},
		{"interface no longer excluded", noEth0, sidecar, []string{"Put", "AttachInbound"}},
		{"none to sidecar", none, sidecar, []string{"Put", "AttachInbound"}},
		{"sidecar to none", sidecar, none, []string{"Delete"}},
		{"none to none", none, none, nil},
	}
	ctx := context.Background()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakePods()
			d := newFakeDatapath(f)
			from := tt.from
			if err := d.Enroll(ctx, &from); err != nil {
				t.Fatal(err)
			}
			link := f.inbound[fakeCookie]["eth0"]
			f.calls = nil
			next := tt.to
			if err := d.Move(ctx, from, &next); err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(f.calls, tt.wantCalls) {
				t.Errorf("calls %v, want %v", f.calls, tt.wantCalls)
			}
			want := newFakePods()
			wantNext := tt.to
			if err := newFakeDatapath(want).Enroll(ctx, &wantNext); err != nil {
				t.Fatal(err)
			}
			if !sameCapture(f.snapshot(), want.snapshot()) {
				t.Errorf("state after the move %+v, want what enrolling %s afresh writes %+v", f.snapshot(), tt.to.Mode, want.snapshot())
			}
			if next.NetnsCookie != wantNext.NetnsCookie {
				t.Errorf("next.NetnsCookie = %d, want %d", next.NetnsCookie, wantNext.NetnsCookie)
			}
			if got := f.inbound[fakeCookie]["eth0"]; link != 0 && got != 0 && got != link {
				t.Errorf("inbound link replaced (%d -> %d): detached and attached again", link, got)
			}
		})
	}
}

// A failure at any step of a move leaves the old state in place, or says
// it could not (ErrNotRestored) when the restore fails too; bad settings
// fail before anything is written.
func TestMoveFailureRestoresOld(t *testing.T) {
	sidecar, other, noEth0, node, none := moveEntries()
	moves := []struct {
		name     string
		from, to store.Entry
	}{
		{"sidecar to node", sidecar, node},
		{"node to sidecar", node, sidecar},
		{"settings", sidecar, other},
		{"interface now excluded", sidecar, noEth0},
		{"none to sidecar", none, sidecar},
		{"sidecar to none", sidecar, none},
		{"node to none", node, none},
	}
	ctx := context.Background()
	for _, mv := range moves {
		// Count the move's own calls, then fail each in turn.
		f := newFakePods()
		d := newFakeDatapath(f)
		from := mv.from
		if err := d.Enroll(ctx, &from); err != nil {
			t.Fatal(err)
		}
		f.calls = nil
		next := mv.to
		if err := d.Move(ctx, from, &next); err != nil {
			t.Fatal(err)
		}
		steps := slices.Clone(f.calls)
		for i, step := range steps {
			n := 0
			for _, s := range steps[:i+1] {
				if s == step {
					n++
				}
			}
			t.Run(fmt.Sprintf("%s/%s#%d", mv.name, step, n), func(t *testing.T) {
				f := newFakePods()
				d := newFakeDatapath(f)
				from := mv.from
				if err := d.Enroll(ctx, &from); err != nil {
					t.Fatal(err)
				}
				before := f.snapshot()
				f.fail, f.failN, f.counts = step, n, map[string]int{}
				next := mv.to
				err := d.Move(ctx, from, &next)
				if !errors.Is(err, errInjected) || errors.Is(err, datapath.ErrNotRestored) {
					t.Fatalf("Move with %s failing: %v, want the injected error, restored", step, err)
				}
				if got := f.snapshot(); !sameCapture(got, before) {
					t.Errorf("state after the failed move %+v, want the old %+v", got, before)
				}
			})
		}
		t.Run(mv.name+"/restore fails too", func(t *testing.T) {
			if len(steps) == 0 {
				t.Skip("nothing to fail")
			}
			f := newFakePods()
			d := newFakeDatapath(f)
			from := mv.from
			if err := d.Enroll(ctx, &from); err != nil {
				t.Fatal(err)
			}
			f.fail, f.failN, f.failAfter, f.counts = steps[0], 1, true, map[string]int{}
			next := mv.to
			if err := d.Move(ctx, from, &next); !errors.Is(err, datapath.ErrNotRestored) || !errors.Is(err, errInjected) {
				t.Fatalf("Move with %s and everything after failing: %v, want ErrNotRestored", steps[0], err)
			}
		})
	}

	t.Run("bad settings", func(t *testing.T) {
		f := newFakePods()
		d := newFakeDatapath(f)
		from := sidecar
		if err := d.Enroll(ctx, &from); err != nil {
			t.Fatal(err)
		}
		before := f.snapshot()
		f.calls = nil
		bad := *sidecar.Capture
		bad.OutboundPort = 0
		next := sidecar
		next.Capture = &bad
		if err := d.Move(ctx, from, &next); err == nil {
			t.Fatal("Move to invalid settings succeeded")
		}
		if len(f.calls) != 0 || !reflect.DeepEqual(f.snapshot(), before) {
			t.Errorf("a move to invalid settings wrote %v", f.calls)
		}
	})
}

// A failed Enroll has already recorded the cookie it wrote under, so the
// handler's Unenroll removes the half-written state.
func TestFailedEnrollCanBeUndone(t *testing.T) {
	sidecar, _, _, _, _ := moveEntries()
	for _, step := range []string{"Put", "AttachInbound"} {
		t.Run(step, func(t *testing.T) {
			f := newFakePods()
			d := newFakeDatapath(f)
			f.fail, f.failN = step, 1
			e := sidecar
			ctx := context.Background()
			if err := d.Enroll(ctx, &e); !errors.Is(err, errInjected) {
				t.Fatalf("Enroll: %v, want the injected error", err)
			}
			if err := d.Unenroll(ctx, e); err != nil {
				t.Fatal(err)
			}
			if s := f.snapshot(); len(s.pods) != 0 || len(s.inbound) != 0 {
				t.Errorf("left after Unenroll of a failed Enroll: %+v", s)
			}
		})
	}
}
