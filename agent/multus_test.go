package agent_test

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/sidelane/sidelane/agent"
	"github.com/sidelane/sidelane/agent/cnirpc"
	"github.com/sidelane/sidelane/agent/store"
)

// netnsDatapath models the eBPF backend's keying: one state per network
// namespace (its cookie), which Enroll replaces as a whole (Put: the pod's
// IPs are the entry's) and Unenroll removes as a whole (Delete).
type netnsDatapath struct {
	mu    sync.Mutex
	state map[uint64]netnsState
}

type netnsState struct {
	mode string
	ips  []netip.Prefix
}

func cookieOf(path string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(path))
	return h.Sum64() | 1
}

func (d *netnsDatapath) Name() string { return "netns" }
func (d *netnsDatapath) Enroll(_ context.Context, e *store.Entry) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if e.Mode == agent.ModeNone {
		if e.NetnsCookie != 0 {
			delete(d.state, e.NetnsCookie)
			e.NetnsCookie = 0
		}
		return nil
	}
	e.NetnsCookie = cookieOf(e.Netns)
	d.state[e.NetnsCookie] = netnsState{mode: e.Mode, ips: slices.Clone(e.IPs)}
	return nil
}

// Move is one in-place replacement, as the eBPF backend's Put.
func (d *netnsDatapath) Move(ctx context.Context, _ store.Entry, next *store.Entry) error {
	return d.Enroll(ctx, next)
}
func (d *netnsDatapath) Unenroll(_ context.Context, e store.Entry) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.state, e.NetnsCookie)
	return nil
}
func (d *netnsDatapath) Verify(_ context.Context, e store.Entry) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if e.Mode == agent.ModeNone {
		return nil
	}
	s, ok := d.state[e.NetnsCookie]
	if !ok {
		return errors.New("netns not enrolled")
	}
	for _, ip := range e.IPs {
		if !slices.Contains(s.ips, ip) {
			return fmt.Errorf("pod IP %s not enrolled", ip)
		}
	}
	return nil
}

// ips returns the enrolled IPs of netns (nil: not enrolled).
func (d *netnsDatapath) ips(netns string) []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	s, ok := d.state[cookieOf(netns)]
	if !ok {
		return nil
	}
	out := []string{}
	for _, ip := range s.ips {
		out = append(out, ip.String())
	}
	slices.Sort(out)
	return out
}

// TestMultusAttachmentsShareTheNetns is finding 10 of the security review:
// Multus makes one CNI ADD per network of a sandbox (eth0, net1, ... in the
// same netns), and the datapath keys a pod by its netns. The netns must be
// captured with the IPs of all its attachments, and stay captured until the
// last of them is deleted (DEL or GC).
func TestMultusAttachmentsShareTheNetns(t *testing.T) {
	dir := t.TempDir()
	dp := &netnsDatapath{state: map[uint64]netnsState{}}
	a := runAgent(t, dir, dp, agent.ModeSidecar)
	ctx := context.Background()
	c := cnirpc.Client{Socket: filepath.Join(dir, "s.sock"), Timeout: 5 * time.Second}
	const netns = "/var/run/netns/multus"
	pod := cnirpc.PodRef{Namespace: "ns", Name: "p", UID: "u"}
	do := func(r cnirpc.Request) {
		t.Helper()
		r.Netns, r.Pod = netns, pod
		if rep, err := c.Do(ctx, r); err != nil || !rep.OK {
			t.Fatalf("%s %s: %v %+v", r.Op, r.IfName, err, rep)
		}
	}
	attach := func(ifname string) cnirpc.Attachment {
		return cnirpc.Attachment{ContainerID: "sandbox", IfName: ifname}
	}
	addReq := func(network, ifname, ip string) cnirpc.Request {
		return cnirpc.Request{Op: cnirpc.OpAdd, Network: network, Attachment: attach(ifname), IPs: []netip.Prefix{netip.MustParsePrefix(ip)}}
	}
	want := func(what string, ips ...string) {
		t.Helper()
		if got := dp.ips(netns); !slices.Equal(got, ips) {
			t.Errorf("%s: netns enrolled with %v, want %v", what, got, ips)
		}
	}

	do(addReq("k8s", "eth0", "10.0.0.2/24"))
	do(addReq("macvlan", "net1", "192.168.5.7/24"))
	want("after two ADDs", "10.0.0.2/24", "192.168.5.7/24")
	for _, r := range []cnirpc.Request{addReq("k8s", "eth0", "10.0.0.2/24"), addReq("macvlan", "net1", "192.168.5.7/24")} {
		r.Op = cnirpc.OpCheck
		do(r)
	}

	do(cnirpc.Request{Op: cnirpc.OpDel, Network: "macvlan", Attachment: attach("net1")})
	want("after DEL of net1", "10.0.0.2/24")
	do(cnirpc.Request{Op: cnirpc.OpCheck, Network: "k8s", Attachment: attach("eth0")})

	// GC of one network keeps the netns captured for the other's attachment.
	do(addReq("macvlan", "net1", "192.168.5.7/24"))
	do(cnirpc.Request{Op: cnirpc.OpGC, Network: "k8s"})
	want("after GC removed eth0", "192.168.5.7/24")
	do(cnirpc.Request{Op: cnirpc.OpCheck, Network: "macvlan", Attachment: attach("net1")})

	// A live move of both attachments, one by one, keeps the netns captured.
	do(addReq("k8s", "eth0", "10.0.0.2/24"))
	for _, k := range []store.Key{{Network: "k8s", ContainerID: "sandbox", IfName: "eth0"}, {Network: "macvlan", ContainerID: "sandbox", IfName: "net1"}} {
		if _, _, err := a.SetMode(ctx, k, agent.Decision{Mode: agent.ModeNode, Reason: "ambient"}); err != nil {
			t.Fatal(err)
		}
		want("during the move of "+k.String(), "10.0.0.2/24", "192.168.5.7/24")
	}

	do(cnirpc.Request{Op: cnirpc.OpDel, Network: "macvlan", Attachment: attach("net1")})
	do(cnirpc.Request{Op: cnirpc.OpDel, Network: "k8s", Attachment: attach("eth0")})
	want("after the last DEL")
}
