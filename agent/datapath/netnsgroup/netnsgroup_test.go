package netnsgroup

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"testing"

	"github.com/sidelane/sidelane/agent/store"
)

// backend keeps one state per netns path, replaced by Enroll and removed
// by Unenroll, like the eBPF backend's per-cookie state.
type backend struct {
	state     map[string][]netip.Prefix
	failEnrol error
}

func (b *backend) Name() string { return "fake" }
func (b *backend) Enroll(_ context.Context, e *store.Entry) error {
	if b.failEnrol != nil {
		return b.failEnrol
	}
	if e.Mode == modeNone {
		delete(b.state, e.Netns)
		e.NetnsCookie = 0
		return nil
	}
	b.state[e.Netns] = slices.Clone(e.IPs)
	e.NetnsCookie = 7
	return nil
}
func (b *backend) Move(ctx context.Context, _ store.Entry, next *store.Entry) error {
	return b.Enroll(ctx, next)
}
func (b *backend) Unenroll(_ context.Context, e store.Entry) error {
	delete(b.state, e.Netns)
	return nil
}
func (b *backend) Verify(_ context.Context, e store.Entry) error {
	if !slices.Equal(b.state[e.Netns], e.IPs) {
		return errors.New("differs")
	}
	return nil
}

type entries struct{ m map[store.Key]store.Entry }

func (s *entries) list(containerID string) []store.Entry {
	var out []store.Entry
	for _, e := range s.m {
		if e.ContainerID == containerID {
			out = append(out, e)
		}
	}
	slices.SortFunc(out, func(a, b store.Entry) int { return cmpString(a.IfName, b.IfName) })
	return out
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func entry(ifname, ip, mode string) store.Entry {
	return store.Entry{Key: store.Key{Network: "net-" + ifname, ContainerID: "sb", IfName: ifname}, Netns: "/run/netns/x",
		IPs: []netip.Prefix{netip.MustParsePrefix(ip)}, Mode: mode}
}

func setup() (*Datapath, *backend, *entries) {
	b := &backend{state: map[string][]netip.Prefix{}}
	s := &entries{m: map[store.Key]store.Entry{}}
	d := New(b, s.list)
	d.gone = func(string) bool { return false }
	return d, b, s
}

// add does what the agent's ADD does: Enroll, then record.
func add(t *testing.T, d *Datapath, s *entries, e store.Entry) {
	t.Helper()
	if err := d.Enroll(context.Background(), &e); err != nil {
		t.Fatal(err)
	}
	s.m[e.Key] = e
}

func ips(b *backend) []string {
	var out []string
	for _, ip := range b.state["/run/netns/x"] {
		out = append(out, ip.String())
	}
	slices.Sort(out)
	return out
}

func TestUnion(t *testing.T) {
	ctx := context.Background()
	d, b, s := setup()
	eth0, net1 := entry("eth0", "10.0.0.2/24", "sidecar"), entry("net1", "10.9.0.2/24", "sidecar")
	add(t, d, s, eth0)
	add(t, d, s, net1)
	if got := ips(b); !slices.Equal(got, []string{"10.0.0.2/24", "10.9.0.2/24"}) {
		t.Fatalf("after two adds: %v", got)
	}
	if s.m[net1.Key].NetnsCookie != 7 {
		t.Error("the cookie is not recorded in the second attachment")
	}
	for _, e := range s.m {
		if err := d.Verify(ctx, e); err != nil {
			t.Errorf("verify %s: %v", e.IfName, err)
		}
	}
	// Another sandbox in another netns is not a sibling.
	other := entry("eth0", "10.0.0.3/24", "sidecar")
	other.ContainerID, other.Netns = "sb2", "/run/netns/y"
	add(t, d, s, other)
	if got := ips(b); len(got) != 2 {
		t.Errorf("another netns changed this one: %v", got)
	}

	// A sibling moving to none leaves the netns to the others.
	n := s.m[net1.Key]
	n.Mode = modeNone
	if err := d.Enroll(ctx, &n); err != nil {
		t.Fatal(err)
	}
	s.m[n.Key] = n
	if got := ips(b); !slices.Equal(got, []string{"10.0.0.2/24"}) || n.NetnsCookie != 0 {
		t.Errorf("after net1 moved to none: %v, cookie %d", got, n.NetnsCookie)
	}
	if err := d.Verify(ctx, n); err != nil {
		t.Errorf("verify of the none sibling: %v", err)
	}
	// Unenrolling the none attachment changes nothing.
	if err := d.Unenroll(ctx, n); err != nil {
		t.Fatal(err)
	}
	delete(s.m, n.Key)
	if got := ips(b); !slices.Equal(got, []string{"10.0.0.2/24"}) {
		t.Errorf("after the none attachment went: %v", got)
	}
	if err := d.Unenroll(ctx, s.m[eth0.Key]); err != nil {
		t.Fatal(err)
	}
	if _, ok := b.state["/run/netns/x"]; ok {
		t.Error("state left after the last attachment")
	}
}

func TestUnenrollFailure(t *testing.T) {
	ctx := context.Background()
	d, b, s := setup()
	eth0, net1 := entry("eth0", "10.0.0.2/24", "sidecar"), entry("net1", "10.9.0.2/24", "sidecar")
	add(t, d, s, eth0)
	add(t, d, s, net1)

	// The netns is alive but the others cannot be re-enrolled: fail
	// closed, the netns stays captured.
	b.failEnrol = errors.New("map full")
	if err := d.Unenroll(ctx, s.m[net1.Key]); err == nil {
		t.Fatal("unenroll succeeded though the others could not be re-enrolled")
	}
	if got := ips(b); len(got) != 2 {
		t.Errorf("a failed unenroll changed the state: %v", got)
	}
	// The netns is gone: nothing is left to keep, so the state goes.
	d.gone = func(string) bool { return true }
	if err := d.Unenroll(ctx, s.m[net1.Key]); err != nil {
		t.Fatalf("unenroll of a gone netns: %v", err)
	}
	if _, ok := b.state["/run/netns/x"]; ok {
		t.Error("state of a gone netns left")
	}
}

func TestNetnsGone(t *testing.T) {
	dir := t.TempDir()
	if !netnsGone(filepath.Join(dir, "missing")) {
		t.Error("a missing path is not gone")
	}
	if _, err := os.Stat("/proc/self/ns/net"); err == nil && netnsGone("/proc/self/ns/net") {
		t.Error("this process's netns is gone")
	}
	plain := filepath.Join(dir, "unmounted")
	if err := os.WriteFile(plain, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if runtime.GOOS == "linux" && !netnsGone(plain) {
		t.Error("a plain file left after the netns was unmounted is not gone")
	}
}
