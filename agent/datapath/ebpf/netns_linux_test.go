package ebpf

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/bpf"
	"github.com/sidelane/sidelane/internal/testenv"
	"github.com/sidelane/sidelane/istio/capture"
)

// putPods records Put (the rest of Pods is not used by Enroll here).
type putPods struct {
	Pods
	put []uint64
}

func (p *putPods) Put(netns uint64, _ bpf.Pod) error { p.put = append(p.put, netns); return nil }
func (p *putPods) Delete(uint64) error               { return nil }

// TestEnrollRefusesReplacedNetns: a pod's netns path that names another
// namespace than at ADD (a /proc/<pid>/ns/net whose pid now belongs to
// another process, here a symlink re-pointed) is not enrolled when the
// agent re-applies the pod (restart, reconcile, mode move): nothing is
// written for the other namespace, and the error names the path.
func TestEnrollRefusesReplacedNetns(t *testing.T) {
	testenv.Privileged(t)
	podNS, otherNS := testenv.NewNS(t), testenv.NewNS(t)
	path := filepath.Join(t.TempDir(), "ns-net")
	if err := os.Symlink(podNS.Path(), path); err != nil {
		t.Fatal(err)
	}
	s := capture.Settings{OutboundPort: 15001, InboundPort: 15006, OutboundAllCIDRs: true, ProxyUIDs: []uint32{1337}}
	e := store.Entry{Netns: path, Mode: modeSidecar, Capture: &s, IPs: []netip.Prefix{netip.MustParsePrefix("10.9.0.2/24")}}
	var err error
	if e.NetnsDev, e.NetnsIno, err = store.NetnsIdentity(path); err != nil {
		t.Fatal(err)
	}
	pods := &putPods{}
	d := New(pods, nil)
	if err := d.Enroll(context.Background(), &e); err != nil {
		t.Fatalf("enroll while the path names the pod's netns: %v", err)
	}
	podCookie, err := bpf.NetnsCookie(podNS.Path())
	if err != nil {
		t.Fatal(err)
	}
	if len(pods.put) != 1 || pods.put[0] != podCookie {
		t.Fatalf("put %v, want the pod's netns cookie %d", pods.put, podCookie)
	}

	// The pod's process is gone and its pid reused: the path now names
	// another namespace.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(otherNS.Path(), path); err != nil {
		t.Fatal(err)
	}
	pods.put = nil
	err = d.Enroll(context.Background(), &e)
	if !errors.Is(err, store.ErrNetnsReplaced) {
		t.Fatalf("re-enroll with the path naming another netns: %v, want ErrNetnsReplaced", err)
	}
	if len(pods.put) != 0 {
		t.Fatalf("re-enroll wrote state for netns cookies %v", pods.put)
	}
	if e.NetnsCookie != podCookie {
		t.Errorf("entry's cookie changed to %d, want the pod's %d", e.NetnsCookie, podCookie)
	}
}
